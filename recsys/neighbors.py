"""Item-to-item neighbour tables: the artifact ItemCF and Swing training writes and recall reads.

A table holds, for every item (dense item index), its `k` most similar items, best first. Rows with
fewer than `k` neighbours are padded at the end with item `-1` and score `0`. Ties are ordered by the
smaller item index, so a table built twice from the same data is identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1
"""The neighbour index that pads rows with fewer than `k` neighbours."""


@dataclass(frozen=True)
class NeighborTable:
    """`neighbors[i]` are the items most similar to item `i`, best first, `scores[i]` their similarities.

    `neighbors` is int32 `[n_items, k]`, `scores` float32 `[n_items, k]`. Padding (`PAD`) only follows
    real neighbours, and its score is 0. No item is its own neighbour, and no row repeats an item.
    """

    neighbors: np.ndarray
    scores: np.ndarray

    @property
    def k(self) -> int:
        """The number of neighbour slots per item."""
        return int(self.neighbors.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.neighbors.shape[0])

    def row(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """The neighbours of `item` and their scores, without the padding (views, not copies)."""
        if not 0 <= item < self.n_items:
            raise ValueError(f"item: {item} is outside [0, {self.n_items})")
        neighbors = self.neighbors[item]
        count = int(np.count_nonzero(neighbors != PAD))
        return neighbors[:count], self.scores[item, :count]

    def validate(self) -> None:
        """Check the format invariants; raise ValueError naming the first one that fails."""
        neighbors, scores = self.neighbors, self.scores
        if not isinstance(neighbors, np.ndarray) or neighbors.dtype != np.int32 or neighbors.ndim != 2:
            raise ValueError(f"neighbors: expected a 2-D int32 array, got {_describe(neighbors)}")
        if not isinstance(scores, np.ndarray) or scores.dtype != np.float32 or scores.ndim != 2:
            raise ValueError(f"scores: expected a 2-D float32 array, got {_describe(scores)}")
        if scores.shape != neighbors.shape:
            raise ValueError(f"scores: shape {scores.shape} differs from neighbors' {neighbors.shape}")
        n_items, k = neighbors.shape
        if k < 1:
            raise ValueError("neighbors: k (the number of columns) must be at least 1")
        if neighbors.size == 0:
            return
        out_of_range = (neighbors < PAD) | (neighbors >= n_items)
        if out_of_range.any():
            item, slot = _first(out_of_range)
            raise ValueError(
                f"neighbors: item {item} slot {slot} holds {neighbors[item, slot]}, "
                f"outside [0, {n_items}) and not the padding {PAD}"
            )
        padded = neighbors == PAD
        # Padding must be a suffix: once a slot is padding, every later slot is too.
        real_after_padding = ~padded[:, 1:] & padded[:, :-1]
        if real_after_padding.any():
            item, slot = _first(real_after_padding)
            raise ValueError(f"neighbors: item {item} has a neighbour in slot {slot + 1} after padding")
        own = neighbors == np.arange(n_items, dtype=np.int32)[:, None]
        if own.any():
            item, slot = _first(own)
            raise ValueError(f"neighbors: item {item} lists itself as a neighbour (slot {slot})")
        if k > 1:
            ordered = np.sort(np.where(padded, PAD, neighbors), axis=1)
            repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD)
            if repeated.any():
                item, slot = _first(repeated)
                raise ValueError(f"neighbors: item {item} lists item {ordered[item, slot]} more than once")
        if not np.isfinite(scores).all():
            item, slot = _first(~np.isfinite(scores))
            raise ValueError(f"scores: item {item} slot {slot} is not finite ({scores[item, slot]})")
        if (scores[padded] != 0).any():
            item, slot = _first(padded & (scores != 0))
            raise ValueError(f"scores: item {item} slot {slot} is padding but scores {scores[item, slot]}")
        if k > 1:
            increasing = (scores[:, 1:] > scores[:, :-1]) & ~padded[:, 1:]
            if increasing.any():
                item, slot = _first(increasing)
                raise ValueError(
                    f"scores: item {item} is not best first: slot {slot + 1} ({scores[item, slot + 1]}) "
                    f"> slot {slot} ({scores[item, slot]})"
                )


def _first(mask: np.ndarray) -> tuple[int, int]:
    item, slot = np.argwhere(mask)[0]
    return int(item), int(slot)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.ndim}-D {value.dtype} array"
    return type(value).__name__
