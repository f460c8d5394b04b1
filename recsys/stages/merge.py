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
        unique, inverse = np.unique(np.concatenate(items), return_inverse=True)
        scores = np.bincount(inverse, weights=np.concatenate(contributions))
        masks = np.zeros(unique.shape[0], dtype=np.uint64)
        np.bitwise_or.at(masks, inverse, np.concatenate(bits))
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
