"""EASE, the closed-form item-item baseline (Steck 2019, "Embarrassingly Shallow Autoencoders").

With X the binary users × items matrix of training interactions and λ the L2 weight:

    G = XᵀX + λI,   P = G⁻¹,   B = −P / diag(P) (column j divided by P[j, j]),   diag(B) = 0,

and a user's scores are `x_u · B`, the sum of the rows of B of the items they consumed. B is a dense
items × items matrix, so EASE is for catalogues of at most `MAX_ITEMS` items: float64 up to
`FLOAT64_MAX_ITEMS`, float32 above it to halve memory (at 20,000 items B takes 1.6 GB, and fitting peaks
at about three times that while G is inverted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.validation import check_index

MAX_ITEMS = 20_000
FLOAT64_MAX_ITEMS = 5_000
PAD = -1
"""The item index `top_k` returns in slots no candidate is left for."""

# The Gram matrix is accumulated from each user's item pairs, this many pairs at a time (8 bytes each).
_PAIRS_PER_BATCH = 10_000_000


@dataclass(frozen=True)
class EaseModel:
    """A fitted EASE model: `weights` is B, `[n_items, n_items]` with a zero diagonal."""

    weights: np.ndarray
    l2: float

    @property
    def n_items(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def fit(
        cls, user_index: np.ndarray, item_index: np.ndarray, n_users: int, n_items: int, l2: float
    ) -> EaseModel:
        """Fit B on the interactions (`user_index[n]`, `item_index[n]`, each pair at most once)."""
        if not isinstance(n_items, int | np.integer) or isinstance(n_items, bool) or n_items < 1:
            raise ValueError(f"n_items: expected a positive integer, got {n_items!r}")
        if n_items > MAX_ITEMS:
            raise ValueError(
                f"n_items: {n_items} is above EASE's MAX_ITEMS={MAX_ITEMS} (B is a dense "
                f"n_items × n_items matrix); use ItemCF or Swing for large catalogues"
            )
        if not isinstance(l2, int | float) or isinstance(l2, bool) or not (np.isfinite(l2) and l2 > 0):
            raise ValueError(f"l2: expected a finite number > 0, got {l2!r}")
        users = check_index("user_index", user_index, n_users, "n_users")
        items = check_index("item_index", item_index, n_items, "n_items")
        if users.size != items.size:
            raise ValueError(f"item_index: has {items.size} entries, user_index has {users.size}")

        by_user = np.lexsort((items, users))
        users, items = users[by_user], items[by_user]
        repeated = np.flatnonzero((users[1:] == users[:-1]) & (items[1:] == items[:-1]))
        if repeated.size:
            first = repeated[0]
            raise ValueError(
                f"user_index, item_index: the pair ({users[first]}, {items[first]}) occurs more than once"
            )

        dtype = np.float64 if n_items <= FLOAT64_MAX_ITEMS else np.float32
        gram = _gram(users, items, n_users, n_items, dtype)
        gram[np.diag_indices(n_items)] += l2
        weights = np.linalg.inv(gram)
        del gram
        weights /= -np.diag(weights)[np.newaxis, :]
        np.fill_diagonal(weights, 0.0)
        return cls(weights=weights, l2=float(l2))

    def score_users(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Scores `[len(histories), n_items]`: for each user, the sum of B's rows of their items.

        A history is the user's training item indexes (a set: repeats count once).
        """
        scores = np.zeros((len(histories), self.n_items), dtype=self.weights.dtype)
        for row, history in enumerate(histories):
            items = np.unique(check_index(f"histories[{row}]", history, self.n_items, "n_items"))
            if items.size:
                self.weights[items].sum(axis=0, out=scores[row])
        return scores

    def top_k(
        self,
        histories: Sequence[np.ndarray],
        k: int,
        exclude: Sequence[np.ndarray],
        *,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """The k best items of each user, best first, int32 `[len(histories), k]`.

        `exclude[r]` (usually user r's training items) is never returned; when fewer than k items are
        left, the row ends with `PAD`. Users are scored `batch_size` at a time, bounding memory to
        `batch_size × n_items` scores. Ties are ordered by item index, except at the k-th place, where
        which of equally scored items makes the cut is arbitrary.
        """
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or not 1 <= k <= self.n_items:
            raise ValueError(f"k: expected an integer in [1, n_items={self.n_items}], got {k!r}")
        if len(exclude) != len(histories):
            raise ValueError(f"exclude: has {len(exclude)} entries, histories has {len(histories)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")

        best = np.empty((len(histories), k), dtype=np.int32)
        for start in range(0, len(histories), batch_size):
            stop = min(start + batch_size, len(histories))
            scores = self.score_users(histories[start:stop])
            for row in range(stop - start):
                excluded = check_index(
                    f"exclude[{start + row}]", exclude[start + row], self.n_items, "n_items"
                )
                scores[row, excluded] = -np.inf
            if k < self.n_items:
                candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            else:
                candidates = np.broadcast_to(np.arange(self.n_items), scores.shape)
            candidate_scores = np.take_along_axis(scores, candidates, axis=1)
            ranked = np.lexsort((candidates, -candidate_scores), axis=1)
            top = np.take_along_axis(candidates, ranked, axis=1).astype(np.int32)
            top[np.take_along_axis(candidate_scores, ranked, axis=1) == -np.inf] = PAD
            best[start:stop] = top
        return best


def _gram(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, dtype: type) -> np.ndarray:
    """XᵀX for binary X, from each user's item pairs; `users` sorted, each (user, item) once."""
    gram: np.ndarray = np.zeros((n_items, n_items), dtype=dtype)
    flat = gram.reshape(-1)
    lengths = np.bincount(users, minlength=n_users)
    starts = np.cumsum(lengths) - lengths
    pairs = lengths.astype(np.int64) ** 2
    cumulative = np.cumsum(pairs)
    first_user = 0
    while first_user < n_users:
        before = cumulative[first_user - 1] if first_user else 0
        last_user = max(
            int(np.searchsorted(cumulative, before + _PAIRS_PER_BATCH, side="right")), first_user + 1
        )
        batch_lengths = lengths[first_user:last_user]
        begin, end = starts[first_user], starts[first_user] + int(batch_lengths.sum())
        batch_items = items[begin:end].astype(np.int64)
        # Entry e (of a user with L items, the first at s) pairs with the L entries s, ..., s + L - 1.
        entry_lengths = np.repeat(batch_lengths, batch_lengths)
        entry_starts = np.repeat(starts[first_user:last_user] - begin, batch_lengths)
        pair_ends = np.cumsum(entry_lengths)
        partner = np.repeat(entry_starts - (pair_ends - entry_lengths), entry_lengths) + np.arange(
            pair_ends[-1] if pair_ends.size else 0
        )
        np.add.at(flat, np.repeat(batch_items, entry_lengths) * n_items + batch_items[partner], 1.0)
        first_user = last_user
    return gram
