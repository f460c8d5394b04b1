"""`InProcessFeatureStore`: the feature store in the process's memory, with no Redis.

The embedded default for a one-command local start and for tests. Snapshots come straight
from the loaded versions' core arrays; live data lives in dicts with the same semantics as
`RedisFeatureStore` (capped live history, time-sliced exposure filters expiring with the
`now` given, cache entries bounded by uses and age, event ids remembered for a TTL).

Not shared between processes (each worker has its own live data) and not durable. Calls must
come from one event loop (nothing here awaits while it holds state half-updated).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from recsys.artifacts import CoreArtifacts
from recsys.feature_store.base import (
    CatalogueItem,
    CatalogueState,
    LiveDataPolicy,
    LiveEvent,
    Snapshot,
    StoredItem,
    UserState,
    best_first,
    cache_entry_alive,
    newest_last,
)
from recsys.feature_store.bloom import BloomFilter


@dataclass
class _CacheEntry:
    score: float
    added: float
    uses: int


@dataclass
class _LiveHistory:
    events: deque[LiveEvent]
    expires_at: float | None  # on the store's clock


class InProcessFeatureStore:
    """Snapshots from `versions` (version → its core artifacts; external user ids are those
    of `core.users.user_ids`), live data in memory. `clock` (unix seconds) dates what has no
    `now` argument: live-history and event-id expiry."""

    def __init__(
        self,
        versions: Mapping[str, CoreArtifacts] | None = None,
        *,
        policy: LiveDataPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy or LiveDataPolicy()
        self._clock = clock
        self._versions: dict[str, CoreArtifacts] = dict(versions or {})
        self._user_index: dict[str, dict[str, int]] = {}  # built on first use per version
        self._live: dict[str, _LiveHistory] = {}
        self._exposures: dict[str, dict[int, BloomFilter]] = {}  # user → slice id → filter
        self._cache: dict[str, dict[str, _CacheEntry]] = {}
        self._seen_events: dict[str, float] = {}  # event id → expiry on the clock
        self._seen_sweep_at = 1_024
        self._catalogue: dict[str, StoredItem] = {}
        self._withdrawn: set[str] = set()
        self._catalogue_revision = 0
        self._catalogue_state = CatalogueState.empty()  # rebuilt when read after a change
        self._engagers: dict[str, list[str]] = {}
        self._engagers_revision = 0
        self._impressions: dict[str, int] = {}  # upserted item id → times shown

    def __repr__(self) -> str:
        return f"InProcessFeatureStore(versions={sorted(self._versions)})"

    # --- versions -------------------------------------------------------------------------------
    def add_version(self, version: str, core: CoreArtifacts) -> None:
        """Make a version's snapshot available (the in-process counterpart of push-features)."""
        self._versions[version] = core
        self._user_index.pop(version, None)

    async def snapshot_ready(self, version: str) -> bool:
        return version in self._versions

    async def delete_version(self, version: str) -> int:
        core = self._versions.pop(version, None)
        self._user_index.pop(version, None)
        if core is None:
            return 0
        # Counted as Redis counts its keys: users with a history or a region, plus the marker.
        has_snapshot = (core.history.items.lengths() > 0) | (np.asarray(core.users.regions) != 0)
        return int(np.count_nonzero(has_snapshot)) + 1

    def _snapshot(self, version: str, user_id: str) -> Snapshot:
        core = self._versions.get(version)
        if core is None:
            return Snapshot.empty()
        index = self._user_index.get(version)
        if index is None:
            index = {str(user): position for position, user in enumerate(core.users.user_ids.tolist())}
            self._user_index[version] = index
        position = index.get(user_id)
        if position is None:
            return Snapshot.empty()
        history = core.history
        return Snapshot(
            items=np.array(history.items.row(position), dtype=np.int32),
            times=np.array(history.times.row(position), dtype=np.int64),
            ratings=np.array(history.ratings.row(position), dtype=np.float32),
            region=int(core.users.regions[position]),
        )

    # --- reads ----------------------------------------------------------------------------------
    async def user_state(self, version: str, user_id: str, *, now: float, live_limit: int = 200) -> UserState:
        exposures = self.policy.exposures
        slices = self._exposures.get(user_id, {})
        window = [slices.get(slice_id) for slice_id in exposures.window(now)]
        return UserState(
            snapshot=self._snapshot(version, user_id),
            live_events=newest_last(self._live_events(user_id), live_limit),
            exposure_filter=exposures.snapshot(
                [None if bloom is None else bloom.to_bytes() for bloom in window]
            ),
            cache_items=tuple(best_first(self._alive_cache(user_id, now))),
        )

    async def users_states(
        self, version: str, user_ids: Sequence[str], *, now: float, live_limit: int = 200
    ) -> list[UserState]:
        return [await self.user_state(version, user, now=now, live_limit=live_limit) for user in user_ids]

    def _live_events(self, user_id: str) -> list[LiveEvent]:
        history = self._live.get(user_id)
        if history is None:
            return []
        if history.expires_at is not None and self._clock() >= history.expires_at:
            del self._live[user_id]
            return []
        return list(history.events)

    def _alive_cache(self, user_id: str, now: float) -> list[tuple[str, float]]:
        entries = self._cache.get(user_id, {})
        return [
            (item, entry.score)
            for item, entry in entries.items()
            if cache_entry_alive(entry.added, entry.uses, now, self.policy)
        ]

    # --- writes ---------------------------------------------------------------------------------
    # `deadline` (of the event writes) is for Redis's retries: nothing here fails that way.
    async def append_events(
        self, user_id: str, events: Sequence[LiveEvent], *, deadline: float | None = None
    ) -> None:
        if not events:
            return
        self._live_events(user_id)  # drops an expired history first
        history = self._live.setdefault(
            user_id, _LiveHistory(deque(maxlen=self.policy.live_max_length), None)
        )
        history.events.extend(events)
        ttl = self.policy.live_ttl_seconds
        history.expires_at = None if ttl is None else self._clock() + ttl

    async def mark_events_seen(
        self, event_ids: Sequence[str], ttl_seconds: int, *, deadline: float | None = None
    ) -> list[bool]:
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds: expected at least 1, got {ttl_seconds}")
        now = self._clock()
        if len(self._seen_events) >= self._seen_sweep_at:
            self._seen_events = {key: expiry for key, expiry in self._seen_events.items() if expiry > now}
            self._seen_sweep_at = max(1_024, 2 * len(self._seen_events))
        first: list[bool] = []
        for event_id in event_ids:
            expiry = self._seen_events.get(event_id)
            is_new = expiry is None or expiry <= now
            if is_new:
                self._seen_events[event_id] = now + ttl_seconds
            first.append(is_new)
        return first

    async def forget_events(self, event_ids: Sequence[str], *, deadline: float | None = None) -> None:
        for event_id in event_ids:
            self._seen_events.pop(event_id, None)

    async def record_exposures(
        self, user_id: str, item_ids: Sequence[str], now: float, *, deadline: float | None = None
    ) -> None:
        if not item_ids:
            return
        exposures = self.policy.exposures
        slices = self._exposures.setdefault(user_id, {})
        for slice_id in [slice_id for slice_id in slices if exposures.is_expired(slice_id, now)]:
            del slices[slice_id]
        current = exposures.slice_of(now)
        if current not in slices:
            slices[current] = exposures.new_slice()
        slices[current].add_positions(exposures.positions(item_ids))

    async def put_cache(self, user_id: str, items: Sequence[tuple[str, float]], now: float) -> None:
        if not items:
            return
        for item, score in items:
            if not math.isfinite(score):
                raise ValueError(f"items: the score of {item!r} is not finite ({score!r})")
        entries = self._cache.setdefault(user_id, {})
        for item, score in items:
            previous = entries.get(item)
            entries[item] = _CacheEntry(float(score), now, 0 if previous is None else previous.uses)
        if len(entries) > self.policy.cache_max_items:
            alive = best_first(self._alive_cache(user_id, now))[: self.policy.cache_max_items]
            self._cache[user_id] = {item: entries[item] for item, _ in alive}

    async def take_cache(self, user_id: str, limit: int, now: float) -> list[tuple[str, float]]:
        entries = self._cache.get(user_id)
        if not entries:
            return []
        for item in [item for item, entry in entries.items() if not self._alive(entry, now)]:
            del entries[item]
        taken = best_first([(item, entry.score) for item, entry in entries.items()])[: max(limit, 0)]
        for item, _ in taken:
            entry = entries[item]
            entry.uses += 1
            if entry.uses >= self.policy.cache_max_uses:
                del entries[item]
        if not entries:
            del self._cache[user_id]
        return taken

    # --- the live catalogue -----------------------------------------------------------------------
    async def upsert_items(self, items: Sequence[CatalogueItem], now: float) -> list[tuple[int, bool]]:
        outcomes: list[tuple[int, bool]] = []
        for item in items:
            previous = self._catalogue.get(item.item_id)
            ordinal = len(self._catalogue) if previous is None else previous.ordinal
            self._catalogue[item.item_id] = StoredItem(item, ordinal, now)
            self._withdrawn.discard(item.item_id)
            outcomes.append((ordinal, previous is None))
        if items:
            self._catalogue_revision += 1
        return outcomes

    async def withdraw_items(self, item_ids: Sequence[str], now: float) -> list[bool]:
        fresh = []
        for item_id in item_ids:
            fresh.append(item_id not in self._withdrawn)
            self._withdrawn.add(item_id)
        if item_ids:
            self._catalogue_revision += 1
        return fresh

    async def catalogue_revision(self) -> int:
        return self._catalogue_revision

    async def catalogue_state(self) -> CatalogueState:
        if self._catalogue_state.revision != self._catalogue_revision:
            items = sorted(self._catalogue.values(), key=lambda stored: stored.ordinal)
            self._catalogue_state = CatalogueState(
                self._catalogue_revision, tuple(items), frozenset(self._withdrawn)
            )
        return self._catalogue_state

    async def record_engagers(
        self, engagements: Sequence[tuple[str, str]], limit: int, *, deadline: float | None = None
    ) -> int:
        if limit < 1:
            raise ValueError(f"limit: expected at least 1, got {limit}")
        added = 0
        for item_id, user_id in engagements:
            users = self._engagers.setdefault(item_id, [])
            if len(users) < limit and user_id not in users:
                users.append(user_id)
                added += 1
        if added:
            self._engagers_revision += 1
        return added

    async def engagers_revision(self) -> int:
        return self._engagers_revision

    async def engagers(self) -> dict[str, tuple[str, ...]]:
        return {item: tuple(users) for item, users in self._engagers.items() if users}

    async def add_item_impressions(self, counts: Mapping[str, int]) -> None:
        for item_id, count in counts.items():
            if item_id in self._catalogue:
                self._impressions[item_id] = self._impressions.get(item_id, 0) + int(count)

    async def item_impressions(self, item_ids: Sequence[str]) -> list[int]:
        return [self._impressions.get(item_id, 0) for item_id in item_ids]

    def _alive(self, entry: _CacheEntry, now: float) -> bool:
        return cache_entry_alive(entry.added, entry.uses, now, self.policy)

    async def close(self) -> None:
        return None
