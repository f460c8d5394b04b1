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

_COLUMN_BITS = 6  # channel masks are uint64: at most 64 channels, a column fits 6 bits


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
        if len(self.channel_names) > 1 << _COLUMN_BITS:
            raise ValueError(
                f"channel_names: at most {1 << _COLUMN_BITS} channels, got {len(self.channel_names)}"
            )
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.channel_names}
        self.rank_offset = rank_offset

    def merge(self, lists: Mapping[str, Candidates], budget: int) -> MergedCandidates:
        present = [
            (bit, self.weights[name], candidates)
            for bit, name in enumerate(self.channel_names)
            if (candidates := lists.get(name)) is not None and len(candidates) and self.weights[name] > 0
        ]
        if not present:
            return MergedCandidates.empty(self.channel_names)
        # Every channel's entries laid end to end, each with its channel (column) and its rank
        # in that channel's list: a fixed number of array operations per request whatever the
        # channel count (per-channel arrays cost ~7 numpy calls each, more than their math).
        lengths = np.fromiter((len(candidates) for _, _, candidates in present), np.intp, len(present))
        firsts = np.cumsum(lengths) - lengths
        column = np.repeat(np.fromiter((bit for bit, _, _ in present), np.intp, len(present)), lengths)
        entry_rank = np.arange(column.shape[0]) - np.repeat(firsts, lengths)
        weight = np.repeat(np.fromiter((w for _, w, _ in present), np.float64, len(present)), lengths)
        contribution = weight / (self.rank_offset + entry_rank)
        all_items = np.concatenate([candidates.items for _, _, candidates in present])
        raw = np.concatenate([candidates.scores for _, _, candidates in present]).astype(
            np.float32, copy=False
        )
        top = np.repeat(np.maximum.reduceat(np.abs(raw), firsts), lengths)  # its list's largest |score|
        # Group by item with one sort and reduceats (no np.unique, no ufunc.at). A source
        # lists an item once, so (item, column) is unique: the default sort on that key
        # orders as a stable sort by item would (channels in bit order), and faster. (An item
        # a channel listed twice would still have both contributions summed.)
        order = np.argsort((all_items.astype(np.int64) << _COLUMN_BITS) | column)
        ordered = all_items[order]
        boundary = np.empty(ordered.shape[0], dtype=bool)
        boundary[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=boundary[1:])
        starts = np.flatnonzero(boundary)
        unique = ordered[starts]
        entry_column = column[order]
        scores = np.add.reduceat(contribution[order], starts)
        masks = np.bitwise_or.reduceat(np.left_shift(np.uint64(1), entry_column.astype(np.uint64)), starts)
        # Score desc, ties by item index (`unique` ascends and the sort is stable), ties at
        # the budget's cut included; a full sort of ~1,000 groups costs what a partition does.
        best = np.argsort(-scores, kind="stable")[: min(budget, unique.shape[0])]
        # Provenance of the kept groups: each entry lands in its group's row, its channel's column.
        row_of_group = np.full(unique.shape[0], -1, dtype=np.intp)
        row_of_group[best] = np.arange(best.shape[0])
        rows = row_of_group[np.cumsum(boundary) - 1]
        kept = rows >= 0
        rows, entries = rows[kept], order[kept]
        channel_ranks = np.full((best.shape[0], len(self.channel_names)), -1, np.int16)
        channel_scores = np.zeros((best.shape[0], len(self.channel_names)), dtype=np.float32)
        channel_ranks[rows, entry_column[kept]] = np.minimum(entry_rank[entries], np.iinfo(np.int16).max)
        divisor = top[entries]
        channel_scores[rows, entry_column[kept]] = np.divide(
            raw[entries], divisor, out=np.zeros_like(divisor), where=divisor > 0
        )
        return MergedCandidates(
            unique[best].astype(np.int32),
            scores[best].astype(np.float32),
            masks[best],
            self.channel_names,
            channel_ranks,
            channel_scores,
        )
