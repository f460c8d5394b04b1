"""Merging channel outputs into one candidate list.

Channels score on incomparable scales (co-occurrence sums, cosines, counts), so the merge
uses their ranks: a weighted reciprocal-rank fusion, score(i) = Σ_c w_c / (k + rank_c(i)).
Overlapping channels (popular and geo share most of their lists) would otherwise waste the
candidate budget; the weights and the per-channel quotas are chosen on the validation split
and written into the model version (`Defaults`).

The merge also keeps each candidate's provenance: its rank in every channel's list and that
channel's score scaled by the list's largest absolute score. The ranker reads them as
features (`recsys.features.provenance_features`), computed from this one output offline
(training rows, evaluation) and in the services."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.features import Provenance
from recsys.stages.sources import Candidates


@dataclass(frozen=True)
class MergedCandidates:
    items: IntArray  # best merged score first
    scores: FloatArray
    channel_masks: npt.NDArray[np.uint64]  # bit b set: channel_names[b] produced the item
    channel_names: tuple[str, ...]
    # [n, len(channel_names)]: rank (0 = first) of the item in each channel's list, −1 when
    # the channel did not return it; the channel's score / max |score| of its list, 0 then.
    channel_ranks: npt.NDArray[np.int16]
    channel_scores: FloatArray

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def channels_of(self, position: int) -> list[str]:
        mask = int(self.channel_masks[position])
        return [name for bit, name in enumerate(self.channel_names) if mask >> bit & 1]

    def provenance(self) -> Provenance:
        return Provenance(self.channel_names, self.channel_ranks, self.channel_scores, self.scores)

    def take(self, positions: npt.NDArray[np.intp]) -> MergedCandidates:
        """The candidates at `positions`, in that order."""
        return MergedCandidates(
            self.items[positions],
            self.scores[positions],
            self.channel_masks[positions],
            self.channel_names,
            self.channel_ranks[positions],
            self.channel_scores[positions],
        )

    @classmethod
    def empty(cls, channel_names: tuple[str, ...]) -> MergedCandidates:
        columns = len(channel_names)
        return cls(
            np.zeros(0, np.int32),
            np.zeros(0, np.float32),
            np.zeros(0, np.uint64),
            channel_names,
            np.zeros((0, columns), np.int16),
            np.zeros((0, columns), np.float32),
        )


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
        columns: list[npt.NDArray[np.intp]] = []
        positions: list[npt.NDArray[np.intp]] = []
        scaled: list[npt.NDArray[np.float32]] = []
        for bit, name in enumerate(self.channel_names):
            candidates = lists.get(name)
            weight = self.weights[name]
            if candidates is None or len(candidates) == 0 or weight <= 0:
                continue
            ranks = np.arange(len(candidates), dtype=np.float64)
            items.append(candidates.items)
            contributions.append(weight / (self.rank_offset + ranks))
            bits.append(np.full(len(candidates), 1 << bit, dtype=np.uint64))
            columns.append(np.full(len(candidates), bit, dtype=np.intp))
            positions.append(np.arange(len(candidates), dtype=np.intp))
            top = float(np.abs(candidates.scores).max())
            scaled.append(
                (candidates.scores / top).astype(np.float32)
                if top > 0
                else np.zeros(len(candidates), np.float32)
            )
        if not items:
            return MergedCandidates.empty(self.channel_names)
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
        # Provenance of the kept groups: each entry lands in its group's row, its channel's column.
        group = np.cumsum(np.concatenate(([True], ordered[1:] != ordered[:-1]))) - 1
        row_of_group = np.full(unique.shape[0], -1, dtype=np.intp)
        row_of_group[best] = np.arange(best.shape[0])
        rows = row_of_group[group]
        kept = rows >= 0
        entry_rank = np.concatenate(positions)[order]
        entry_column = np.concatenate(columns)[order]
        channel_ranks = np.full((best.shape[0], len(self.channel_names)), -1, np.int16)
        channel_scores = np.zeros((best.shape[0], len(self.channel_names)), dtype=np.float32)
        # A channel lists an item once, so no (row, column) is written twice.
        channel_ranks[rows[kept], entry_column[kept]] = np.minimum(
            entry_rank[kept], np.iinfo(np.int16).max
        ).astype(np.int16)
        channel_scores[rows[kept], entry_column[kept]] = np.concatenate(scaled)[order][kept]
        return MergedCandidates(
            unique[best].astype(np.int32),
            scores[best].astype(np.float32),
            masks[best],
            self.channel_names,
            channel_ranks,
            channel_scores,
        )
