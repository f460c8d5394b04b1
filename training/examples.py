"""Training rows for the towers and the ranker, built vectorised from interactions.

A row's user features use only what the user did *before* that interaction (its history
window), as the services will see it; negatives for the ranker are items drawn by
popularity (count^0.75) that the user never consumed in the training part."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.artifacts import Int64Array, IntArray
from recsys.features import CrossFeatures, FeatureSpec, Inputs, ItemFeatures, history_matrix
from training.encode import Interactions


@dataclass(frozen=True)
class SequenceRows:
    """Interactions sorted by (user, time), each with its history window."""

    order: Int64Array  # row indexes into the part, sorted
    user: IntArray
    item: IntArray
    liked: npt.NDArray[np.bool_]
    history: Int64Array  # [n, L] tokens, most recent first
    history_weight: npt.NDArray[np.float32]


def sequence_rows(part: Interactions, spec: FeatureSpec) -> SequenceRows:
    rows = np.arange(len(part))
    order = np.lexsort((rows, part.time, part.user)).astype(np.int64)
    user = part.user[order]
    item = part.item[order]
    liked = part.liked[order]
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    row_start = np.repeat(first, np.diff(np.r_[first, user.shape[0]])).astype(np.int64)
    row_end = np.arange(user.shape[0], dtype=np.int64)  # history: strictly before this row
    history, weights = history_matrix(spec, item, liked, row_start, row_end)
    return SequenceRows(order, user, item, liked, history, weights)


def user_rows(
    rows: SequenceRows,
    regions: IntArray,
    user_stats: npt.NDArray[np.float32],
) -> Inputs:
    return {
        "user_id": (rows.user.astype(np.int64) + 1),
        "region": np.asarray(regions, dtype=np.int64)[rows.user],
        "history": rows.history,
        "history_weight": rows.history_weight,
        "user_stats": np.asarray(user_stats, dtype=np.float32)[rows.user],
    }


class NegativeSampler:
    """Popularity-proportional (count^exponent) sampling of items a user never consumed."""

    def __init__(
        self,
        consumed_user: IntArray,
        consumed_item: IntArray,
        n_items: int,
        seed: int,
        exponent: float,
        popularity_items: IntArray | None = None,
    ) -> None:
        """`popularity_items` (default: the consumed items) are the interactions whose counts
        define popularity; the consumed pairs are never drawn."""
        popular = consumed_item if popularity_items is None else popularity_items
        counts = np.bincount(popular, minlength=n_items).astype(np.float64)
        weights = np.power(counts, exponent) + 1e-3  # every item can be drawn, popular ones more often
        self._cdf = np.cumsum(weights / weights.sum())
        self._n_items = n_items
        self._consumed = np.unique(consumed_user.astype(np.int64) * n_items + consumed_item)
        self._rng = np.random.default_rng(seed)

    def _draw(self, n: int) -> Int64Array:
        picks = np.searchsorted(self._cdf, self._rng.random(n), side="right")
        return np.minimum(picks, self._n_items - 1).astype(np.int64)

    def sample(self, users: IntArray, per_user_row: int) -> tuple[Int64Array, Int64Array]:
        """For each entry of `users`, `per_user_row` unconsumed items. Returns (row index
        into `users`, item); the rare rows whose draws all collide are fewer."""
        rows = np.repeat(np.arange(users.shape[0], dtype=np.int64), per_user_row)
        items = self._draw(rows.shape[0])
        for _ in range(3):
            bad = self._is_consumed(users[rows].astype(np.int64), items)
            if not bad.any():
                break
            items[bad] = self._draw(int(bad.sum()))
        keep = ~self._is_consumed(users[rows].astype(np.int64), items)
        return rows[keep], items[keep]

    def _is_consumed(self, users: Int64Array, items: Int64Array) -> npt.NDArray[np.bool_]:
        keys = users * self._n_items + items
        position = np.searchsorted(self._consumed, keys)
        position[position == self._consumed.shape[0]] = 0
        return np.asarray(self._consumed[position] == keys)


def ranker_rows(
    rows: SequenceRows,
    users: Inputs,
    items: ItemFeatures,
    sampler: NegativeSampler,
    negatives: int,
    cross: CrossFeatures,
    user_embeddings: npt.NDArray[np.float32],
) -> tuple[Inputs, dict[str, npt.NDArray[np.bool_]]]:
    """Positives (each interaction) and `negatives` sampled items per positive, sharing the
    positive's user features (`user_embeddings[r]`: the user tower on row r's inputs).
    Labels: click (consumed), like (consumed and liked)."""
    negative_rows, negative_items = sampler.sample(rows.user, negatives)
    source = np.concatenate([np.arange(rows.user.shape[0]), negative_rows])
    item = np.concatenate([rows.item.astype(np.int64), negative_items])
    inputs = {name: value[source] for name, value in users.items()}
    inputs.update(items.inputs(item))
    inputs.update(cross.inputs(inputs["history"], inputs["history_weight"], item, user_embeddings[source]))
    positive = np.zeros(source.shape[0], dtype=bool)
    positive[: rows.user.shape[0]] = True
    liked = positive & np.concatenate([rows.liked, np.zeros(negative_rows.shape[0], bool)])
    return inputs, {"click": positive, "like": liked}


def select(rows: SequenceRows, mask: npt.NDArray[np.bool_]) -> SequenceRows:
    return SequenceRows(
        rows.order[mask],
        rows.user[mask],
        rows.item[mask],
        rows.liked[mask],
        rows.history[mask],
        rows.history_weight[mask],
    )
