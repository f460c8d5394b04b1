"""Taken-down items: never shown, whatever produced them.

A `Blocklist` holds external item ids (they outlive model versions, whose dense indexes
change); `BlocklistFilter` is the stage, built per model version from the ids it knows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.artifacts import IntArray
from recsys.stages.filters import Filtered
from recsys.stages.sources import Candidates, not_excluded


@dataclass(frozen=True)
class Blocklist:
    item_ids: frozenset[str]

    @classmethod
    def of(cls, item_ids: Iterable[str]) -> Blocklist:
        """From ids as they come (a Redis set, a store file): blanks are dropped."""
        return cls(frozenset(item for item in (str(raw).strip() for raw in item_ids) if item))

    @classmethod
    def parse(cls, text: str) -> Blocklist:
        """One external item id per line; `#` starts a comment (ids cannot contain `#`),
        surrounding whitespace and blank lines are ignored."""
        return cls.of(line.split("#", 1)[0] for line in text.splitlines())

    @classmethod
    def load(cls, path: Path | str) -> Blocklist:
        return cls.parse(Path(path).read_text(encoding="utf-8"))

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.item_ids

    def indexes(self, item_lookup: Mapping[str, int]) -> IntArray:
        """The blocked items a model version knows, as its sorted unique dense indexes
        (ids it does not know cannot be recommended by it and are skipped)."""
        known = [item_lookup[item] for item in self.item_ids if item in item_lookup]
        return np.unique(np.asarray(known, dtype=np.int32))


class BlocklistFilter:
    """Drops blocked items: a binary search of each candidate in the version's sorted
    blocked indexes. Build once per (blocklist, model version), reuse for every request."""

    identifier = "blocklist"

    def __init__(self, blocked_indexes: IntArray) -> None:
        self._blocked = np.unique(np.asarray(blocked_indexes, dtype=np.int32))

    @classmethod
    def for_version(cls, blocklist: Blocklist, item_lookup: Mapping[str, int]) -> BlocklistFilter:
        return cls(blocklist.indexes(item_lookup))

    @property
    def blocked(self) -> IntArray:
        """Sorted unique blocked item indexes (e.g. to add to recall's exclusions)."""
        return self._blocked

    def apply(self, candidates: Candidates) -> Filtered:
        if len(candidates) == 0 or self._blocked.shape[0] == 0:
            return Filtered(candidates, 0)
        keep = not_excluded(candidates.items, self._blocked)
        return Filtered(
            Candidates(candidates.items[keep], candidates.scores[keep]), int(len(candidates) - keep.sum())
        )


class BlocklistFile:
    """A blocklist file that can change while a service runs (a ConfigMap, an operator's
    edit): `reload()` reads it again when its modification time or size changed. A file that
    cannot be read keeps the last good blocklist (and says so), never an empty one."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self.blocklist = Blocklist.load(self.path)

    def _stat(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def reload(self) -> bool:
        """True when the file changed and was read again."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        blocklist = Blocklist.load(self.path)
        self._stamp = stamp
        changed = blocklist != self.blocklist
        self.blocklist = blocklist
        return changed


class VersionBlocklists:
    """The `BlocklistFilter` of each model version for the current blocklist: built on a
    version's first call after a (re)load, then reused by every call (indexes are per model
    version, ids are not). Filters of versions no longer servable are dropped."""

    def __init__(self, blocklist: Blocklist) -> None:
        self._blocklist = blocklist
        self._filters: dict[str, BlocklistFilter] = {}

    @property
    def blocklist(self) -> Blocklist:
        return self._blocklist

    def replace(self, blocklist: Blocklist) -> None:
        # One assignment each: a call that already took a filter keeps using it.
        self._filters = {}
        self._blocklist = blocklist

    def for_version(
        self, version: str, item_lookup: Mapping[str, int], servable: Iterable[str] = ()
    ) -> BlocklistFilter:
        stage = self._filters.get(version)
        if stage is None:
            stage = BlocklistFilter.for_version(self._blocklist, item_lookup)
            keep = set(servable)
            self._filters = {
                **{name: kept for name, kept in self._filters.items() if name in keep},
                version: stage,
            }
        return stage
