"""EASE, the closed-form item-item baseline (Steck 2019, "Embarrassingly Shallow Autoencoders").

With X the binary users × items matrix of training interactions and λ the L2 weight:

    G = XᵀX + λI,   P = G⁻¹,   B = −P / diag(P) (column j divided by P[j, j]),   diag(B) = 0,

and a user's scores are `x_u · B`, the sum of the rows of B of the items they consumed. B is a dense
items × items matrix, so EASE is for catalogues of at most `MAX_ITEMS` items: float64 up to
`FLOAT64_MAX_ITEMS`, float32 above it to halve memory (at 20,000 items B takes 1.6 GB, and fitting peaks
at about three times that while G is inverted).

`CatalogueEase` fits a version's whole catalogue, or its `MAX_DENSE` most-consumed items when it is
larger, and serves two uses of one fit: the full-scoring baseline (`top_k`) and the truncated
neighbour table the `ease` recall channel serves like ItemCF (`neighbor_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.artifacts import IntArray, Ragged
from recsys.neighbors import NeighborTable
from recsys.validation import check_index

MAX_ITEMS = 20_000
FLOAT64_MAX_ITEMS = 5_000
# EASE inverts an items × items matrix: O(n³). On this 2-core machine 18,000 items take about
# nine minutes per inversion, too slow to tune λ inside a ten-minute build, so larger
# catalogues are fitted on their MAX_DENSE most-consumed items (items outside it have so
# few interactions that EASE would hardly ever rank them; the report says so).
MAX_DENSE = 6_000
PAD = -1
"""The item index `top_k` returns in slots no candidate is left for."""

# The Gram matrix is XᵀX with X dense when X has at most this many cells (160 MB in float64);
# else it is accumulated from each user's item pairs, this many pairs at a time (8 bytes each).
_DENSE_GRAM_CELLS = 20_000_000
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
        return cls.from_gram(gram_matrix(user_index, item_index, n_users, n_items), l2)

    @classmethod
    def from_gram(cls, gram: np.ndarray, l2: float) -> EaseModel:
        """Fit B from XᵀX (`gram_matrix`; left unchanged, so one Gram matrix serves every λ tried)."""
        if not isinstance(l2, int | float) or isinstance(l2, bool) or not (np.isfinite(l2) and l2 > 0):
            raise ValueError(f"l2: expected a finite number > 0, got {l2!r}")
        regularised = gram.copy()
        regularised[np.diag_indices(gram.shape[0])] += l2
        weights = np.linalg.inv(regularised)
        del regularised
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


def gram_matrix(user_index: np.ndarray, item_index: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    """XᵀX for the binary users × items matrix X of the interactions (each pair at most once):
    float64 up to `FLOAT64_MAX_ITEMS` items, float32 above."""
    if not isinstance(n_items, int | np.integer) or isinstance(n_items, bool) or n_items < 1:
        raise ValueError(f"n_items: expected a positive integer, got {n_items!r}")
    if n_items > MAX_ITEMS:
        raise ValueError(
            f"n_items: {n_items} is above EASE's MAX_ITEMS={MAX_ITEMS} (B is a dense "
            f"n_items × n_items matrix); use ItemCF or Swing for large catalogues"
        )
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
    if n_users * n_items <= _DENSE_GRAM_CELLS:
        # Small enough to hold X densely: one BLAS product, several times faster than the pairs
        # (and exact: the entries are co-occurrence counts, integers far below 2^24).
        dense = np.zeros((n_users, n_items), dtype=dtype)
        dense[users, items] = 1.0
        product: np.ndarray = dense.T @ dense
        return product
    return _gram(users, items, n_users, n_items, dtype)


@dataclass(frozen=True)
class EaseGram:
    """XᵀX of a version's histories over `kept`, the catalogue's item indexes EASE covers
    (ascending; every item up to `max_dense` items, else the most consumed): computed once,
    then fitted for each λ tried."""

    gram: np.ndarray
    kept: IntArray
    n_items: int

    @classmethod
    def of(cls, history: Ragged, n_items: int, max_dense: int = MAX_DENSE) -> EaseGram:
        """From every user's items (`history`: user → item indexes; repeats count once)."""
        users = np.repeat(np.arange(history.n_rows), history.lengths()).astype(np.int64)
        items = np.asarray(history.values, dtype=np.int64)
        if n_items > max_dense:
            counts = np.bincount(items, minlength=n_items)
            kept = np.sort(np.argsort(-counts, kind="stable")[:max_dense]).astype(np.int32)
        else:
            kept = np.arange(n_items, dtype=np.int32)
        size = int(kept.shape[0])
        local = np.full(n_items, -1, dtype=np.int64)
        local[kept] = np.arange(size)
        in_scope = local[items] >= 0
        pairs = np.unique(users[in_scope] * size + local[items[in_scope]])  # X is binary
        return cls(gram_matrix(pairs // size, pairs % size, max(history.n_rows, 1), size), kept, n_items)

    def fit(self, l2: float) -> CatalogueEase:
        return CatalogueEase(EaseModel.from_gram(self.gram, l2), self.kept, self.n_items)


@dataclass(frozen=True)
class CatalogueEase:
    """EASE fitted on a version's histories over `kept` (see `EaseGram`). Item indexes in and out
    are the catalogue's; `model` works on positions in `kept`."""

    model: EaseModel
    kept: IntArray
    n_items: int

    @property
    def l2(self) -> float:
        return self.model.l2

    @classmethod
    def fit(cls, history: Ragged, n_items: int, l2: float, max_dense: int = MAX_DENSE) -> CatalogueEase:
        """Fit on every user's items (`history`: user → item indexes; repeats count once)."""
        return EaseGram.of(history, n_items, max_dense).fit(l2)

    def _local(self, items: np.ndarray) -> np.ndarray:
        local = np.full(self.n_items, -1, dtype=np.int64)
        local[self.kept] = np.arange(self.kept.shape[0])
        positions = local[np.asarray(items, dtype=np.int64)]
        return positions[positions >= 0]

    def top_k(self, histories: Sequence[np.ndarray], k: int) -> list[IntArray]:
        """Each user's best `k` items (catalogue indexes, best first), their own history excluded."""
        local = [self._local(history) for history in histories]
        top = self.model.top_k(local, min(k, self.model.n_items), exclude=local)
        return [self.kept[row[row >= 0]].astype(np.int32) for row in np.asarray(top)]

    def neighbor_table(self, k: int, *, signed: bool = False, block_rows: int = 512) -> NeighborTable:
        """B truncated: each item's `k` largest positive weights B[i, j] (what consuming i adds to
        j's score), or with `signed` its `k` largest weights in absolute value (the negative ones
        push items down, as in full EASE scoring), ordered best first by float32 weight, ties by
        the smaller item index. Items outside `kept` have no neighbours (an all-padding row)."""
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        neighbors = np.full((self.n_items, k), PAD, dtype=np.int32)
        scores = np.zeros((self.n_items, k), dtype=np.float32)
        weights = self.model.weights
        size = weights.shape[0]
        keep = min(k, size)
        for start in range(0, size, block_rows):
            block = np.asarray(weights[start : start + block_rows], dtype=np.float32)
            strength = np.abs(block) if signed else block
            if keep < size:
                # Every column tied with the k-th value stays a candidate, so the tie order holds.
                kth = -np.partition(-strength, keep - 1, axis=1)[:, keep - 1 : keep]
                candidate = strength >= kth
            else:
                candidate = np.ones(block.shape, dtype=bool)
            candidate &= strength > 0
            rows, columns = np.nonzero(candidate)
            by_strength = np.lexsort((columns, -strength[rows, columns], rows))
            rows, columns = rows[by_strength], columns[by_strength]
            top = _rank_in_row(rows, block.shape[0]) < k
            rows, columns = rows[top], columns[top]
            values = block[rows, columns]
            by_value = np.lexsort((columns, -values, rows))
            rows, columns, values = rows[by_value], columns[by_value], values[by_value]
            rank = _rank_in_row(rows, block.shape[0])
            targets = self.kept[start + rows]
            neighbors[targets, rank] = self.kept[columns]
            scores[targets, rank] = values
        return NeighborTable(neighbors, scores)


def _rank_in_row(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Each entry's position within its row, for entries grouped by ascending row."""
    counts = np.bincount(rows, minlength=n_rows)
    ranks: np.ndarray = np.arange(rows.shape[0]) - (np.cumsum(counts) - counts)[rows]
    return ranks


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
