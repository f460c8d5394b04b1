"""Filters: stages that drop candidates and say how many they dropped (counted per filter
and channel by the services)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.feature_store.bloom import ExposureSnapshot
from recsys.stages.sources import Candidates


@dataclass(frozen=True)
class Filtered:
    kept: Candidates
    removed: int


class ExposureFilter:
    """Drops items the user was already shown: the user's time-sliced Bloom filters, read
    once per request (`ExposureSnapshot`), tested against each item's precomputed digest
    (`ServingModel.item_digests`), so a request hashes nothing. A false positive (about the
    configured error rate) hides an item that was not shown; an item shown is never kept."""

    identifier = "exposure"

    def __init__(self, snapshot: ExposureSnapshot, item_digests: npt.NDArray[np.uint64]) -> None:
        self._snapshot = snapshot
        self._digests = item_digests

    @property
    def active(self) -> bool:
        """False when nothing was shown in the window: filtering would remove nothing."""
        return self._snapshot.slice_count > 0

    def apply(self, candidates: Candidates) -> Filtered:
        if len(candidates) == 0 or not self.active:
            return Filtered(candidates, 0)
        shown = self._snapshot.contains_digests(self._digests[candidates.items])
        keep = ~shown
        return Filtered(Candidates(candidates.items[keep], candidates.scores[keep]), int(shown.sum()))
