"""Merging channel outputs into one candidate list.

Channels score on incomparable scales (co-occurrence sums, cosines, counts), so the merge
uses their ranks: a weighted reciprocal-rank fusion, score(i) = Σ_c w_c / (k + rank_c(i)).
Overlapping channels (popular and geo share most of their lists) would otherwise waste the
candidate budget; the weights and the per-channel quotas are chosen on the validation split
and written into the model version (`Defaults`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.stages.sources import Candidates


@dataclass(frozen=True)
class MergedCandidates:
    items: IntArray  # best merged score first
    scores: FloatArray
    channel_masks: npt.NDArray[np.uint64]  # bit b set: channel_names[b] produced the item
    channel_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def channels_of(self, position: int) -> list[str]:
        mask = int(self.channel_masks[position])
        return [name for bit, name in enumerate(self.channel_names) if mask >> bit & 1]


class WeightedMerge:
    identifier = "merge"

    def __init__(
        self, channel_names: Sequence[str], weights: Mapping[str, float], rank_offset: float = 60.0
    ) -> None:
        self.channel_names = tuple(channel_names)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.channel_names}
        self.rank_offset = rank_offset

    def merge(self, lists: Mapping[str, Candidates], budget: int) -> MergedCandidates:
        items: list[npt.NDArray[np.int32]] = []
        contributions: list[npt.NDArray[np.float64]] = []
        bits: list[npt.NDArray[np.uint64]] = []
        for bit, name in enumerate(self.channel_names):
            candidates = lists.get(name)
            weight = self.weights[name]
            if candidates is None or len(candidates) == 0 or weight <= 0:
                continue
            ranks = np.arange(len(candidates), dtype=np.float64)
            items.append(candidates.items)
            contributions.append(weight / (self.rank_offset + ranks))
            bits.append(np.full(len(candidates), 1 << bit, dtype=np.uint64))
        if not items:
            return MergedCandidates(
                np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.uint64), self.channel_names
            )
        # Group by item with one sort and two reduceats (no np.unique, no ufunc.at: both
        # cost far more than the arithmetic on a request's ~1,000 entries).
        all_items = np.concatenate(items)
        order = np.argsort(all_items, kind="stable")
        ordered = all_items[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        unique = ordered[starts]
        scores = np.add.reduceat(np.concatenate(contributions)[order], starts)
        masks = np.bitwise_or.reduceat(np.concatenate(bits)[order], starts)
        count = min(budget, unique.shape[0])
        best = (
            np.argpartition(-scores, count - 1)[:count]
            if count < unique.shape[0]
            else np.arange(unique.shape[0])
        )
        best = best[np.lexsort((unique[best], -scores[best]))]  # score desc, ties by item index
        return MergedCandidates(
            unique[best].astype(np.int32), scores[best].astype(np.float32), masks[best], self.channel_names
        )
