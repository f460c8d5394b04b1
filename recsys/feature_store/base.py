"""The feature store interface: what recall and the gateway read and write per user.

Two kinds of data:

- the **version snapshot**: what a model version was trained with, per user (history as dense
  item indexes of that version, unix times, ratings; region token). Loaded once per version
  (`recsys store push-features` for Redis), read-only while serving, and only used once the
  version is *ready*;
- **live data**, keyed by external ids and independent of versions: real-time events
  appended to the history, exposures (items shown, in time-sliced Bloom filters), the cache
  channel's items (ranked but not shown) and the ids of events already applied;
- the **live catalogue**, independent of versions too: items upserted while serving
  (`UpsertItems`) with their metadata and a stable *ordinal* each (0, 1, 2, … in the order
  they first arrived, never reused), and the withdrawn item ids (upserted ones or a
  version's own). A version serves new item `o` as dense index `n_items + o`
  (`recsys.catalogue`), so every process agrees on it without talking to the others.
  Each upserted item also has an impression count (how often the gateway showed it), which
  the new-item traffic control of scenes reads.

Implementations: `InProcessFeatureStore` (embedded, no Redis) and `RedisFeatureStore`. One
contract suite (tests/recsys/feature_store/test_contract.py) runs against both.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from recsys.artifacts import FloatArray, Int64Array, IntArray
from recsys.errors import DependencyUnavailable
from recsys.feature_store.bloom import ExposureFilterConfig, ExposureSnapshot

EVENT_KINDS = ("impression", "click", "like", "rating", "consume")
"""What a live event records. Everything but an impression consumes the item."""

CONSUMING_KINDS = frozenset(EVENT_KINDS) - {"impression"}

_MAX_ID_BYTES = 65_535  # lengths are packed as uint16


class FeatureStoreUnavailable(DependencyUnavailable):
    """The feature store (Redis) is down, refused the command or did not answer in time."""

    def __init__(self, problem: str, dependency: str = "feature store") -> None:
        super().__init__(dependency, problem)


@dataclass(frozen=True)
class LiveEvent:
    """One real-time event of a user, by external item id."""

    item_id: str
    kind: str  # one of EVENT_KINDS
    value: float  # the rating for "rating", else a weight (1.0)
    time: float  # unix seconds
    event_id: str  # the client's id, for idempotency ("" when none was given)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(EVENT_KINDS)}, got {self.kind!r}")
        if not self.item_id:
            raise ValueError("item_id: must not be empty")
        for name in ("item_id", "event_id"):
            if len(getattr(self, name).encode("utf-8")) > _MAX_ID_BYTES:
                raise ValueError(f"{name}: longer than {_MAX_ID_BYTES} bytes")

    @property
    def consumes(self) -> bool:
        return self.kind in CONSUMING_KINDS

    # Packed form (what Redis stores in a user's live list): a 21-byte header, then the two
    # ids in UTF-8. Little-endian: time float64, value float64, kind uint8, two uint16 lengths.
    _HEADER = struct.Struct("<ddBHH")

    def pack(self) -> bytes:
        item, event = self.item_id.encode("utf-8"), self.event_id.encode("utf-8")
        header = self._HEADER.pack(self.time, self.value, EVENT_KINDS.index(self.kind), len(item), len(event))
        return header + item + event

    @classmethod
    def unpack(cls, data: bytes) -> LiveEvent:
        time, value, kind, item_length, event_length = cls._HEADER.unpack_from(data)
        start = cls._HEADER.size
        if len(data) != start + item_length + event_length or kind >= len(EVENT_KINDS):
            raise ValueError(f"not a packed LiveEvent ({len(data)} bytes)")
        item = data[start : start + item_length].decode("utf-8")
        event = data[start + item_length :].decode("utf-8")
        return cls(item, EVENT_KINDS[kind], value, time, event)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A user's training data in one model version, oldest → newest."""

    items: IntArray  # dense item indexes of the version
    times: Int64Array  # unix seconds (0 when the data has no time)
    ratings: FloatArray  # NaN when the data has no rating
    region: int  # region token, 0 = unknown

    @classmethod
    def empty(cls) -> Snapshot:
        """What an unknown user has."""
        return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), 0)

    def __len__(self) -> int:
        return int(self.items.shape[0])

    # Packed form (one Redis string per user and version): a 16-byte header, then times int64[n],
    # items int32[n], ratings float32[n] (times first so that they are 8-byte aligned).
    # Header, little-endian: magic b"RSS1", n uint32, region int32, reserved uint32 (0).
    _HEADER = struct.Struct("<4sIiI")
    _MAGIC = b"RSS1"

    @classmethod
    def packed_size(cls, length: int) -> int:
        return cls._HEADER.size + 16 * length

    def pack(self) -> bytes:
        n = len(self)
        return b"".join(
            (
                self._HEADER.pack(self._MAGIC, n, self.region, 0),
                np.ascontiguousarray(self.times, dtype="<i8").tobytes(),
                np.ascontiguousarray(self.items, dtype="<i4").tobytes(),
                np.ascontiguousarray(self.ratings, dtype="<f4").tobytes(),
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> Snapshot:
        magic, n, region, _ = cls._HEADER.unpack_from(data)
        if magic != cls._MAGIC or len(data) != cls.packed_size(n):
            raise ValueError(f"not a packed Snapshot ({len(data)} bytes, magic {magic!r})")
        start = cls._HEADER.size
        times = np.frombuffer(data, dtype="<i8", count=n, offset=start)
        items = np.frombuffer(data, dtype="<i4", count=n, offset=start + 8 * n)
        ratings = np.frombuffer(data, dtype="<f4", count=n, offset=start + 12 * n)
        return cls(items.astype(np.int32), times.astype(np.int64), ratings.astype(np.float32), region)


@dataclass(frozen=True, eq=False)
class UserState:
    """Everything recall needs about one user, read in one go."""

    snapshot: Snapshot
    live_events: tuple[LiveEvent, ...]  # oldest → newest (by time), at most `live_limit`
    exposure_filter: ExposureSnapshot | None  # None: exposures could not be read (serve degraded)
    cache_items: tuple[tuple[str, float], ...]  # the cache channel's items, best first; not taken

    def consumed_live_items(self) -> tuple[str, ...]:
        """External ids of the items the live events consumed (impressions excluded)."""
        return tuple(event.item_id for event in self.live_events if event.consumes)


@dataclass(frozen=True)
class LiveDataPolicy:
    """Limits on live data, shared by every implementation."""

    live_max_length: int = 1_000  # events kept per user (older ones are dropped)
    live_ttl_seconds: int | None = 90 * 86_400  # a user's events go after this long without one
    cache_max_uses: int = 10  # a cached item is served at most this many times
    cache_max_age_seconds: float = 3 * 86_400  # and for at most this long after it was cached
    cache_max_items: int = 500  # per user; the lowest scores go first
    exposures: ExposureFilterConfig = field(default_factory=ExposureFilterConfig)

    def __post_init__(self) -> None:
        for name in ("live_max_length", "cache_max_uses", "cache_max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.live_ttl_seconds is not None and self.live_ttl_seconds < 1:
            raise ValueError(f"live_ttl_seconds: expected at least 1 or None, got {self.live_ttl_seconds}")
        if self.cache_max_age_seconds <= 0:
            raise ValueError(f"cache_max_age_seconds: expected > 0, got {self.cache_max_age_seconds}")


MAX_CATEGORIES = 16  # per catalogue item (a content tower's multi-hot input stays small)


@dataclass(frozen=True)
class CatalogueItem:
    """An item as `UpsertItems` gives it: what a content-based model (and the next build)
    needs to place an item nobody has interacted with yet. Bounds are checked at the edge."""

    item_id: str
    title: str = ""
    author: str = ""
    categories: tuple[str, ...] = ()
    publisher: str = ""
    published_at: float | None = None  # unix seconds; None: unknown

    def __post_init__(self) -> None:
        if not self.item_id:
            raise ValueError("item_id: must not be empty")
        if len(self.categories) > MAX_CATEGORIES:
            raise ValueError(f"categories: at most {MAX_CATEGORIES}, got {len(self.categories)}")
        if self.published_at is not None and not math.isfinite(self.published_at):
            raise ValueError(f"published_at: must be finite, got {self.published_at!r}")

    def to_json(self, upserted_at: float) -> str:
        """The stored form (a JSON object; the ordinal is kept beside it, assigned once)."""
        return json.dumps(
            {
                "title": self.title,
                "author": self.author,
                "categories": list(self.categories),
                "publisher": self.publisher,
                "published_at": self.published_at,
                "upserted_at": upserted_at,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, item_id: str, text: str | bytes) -> tuple[CatalogueItem, float]:
        """(the item, when it was last upserted) from `to_json`'s form."""
        data = json.loads(text)
        published = data.get("published_at")
        item = cls(
            item_id,
            str(data.get("title", "")),
            str(data.get("author", "")),
            tuple(str(name) for name in data.get("categories", ())),
            str(data.get("publisher", "")),
            None if published is None else float(published),
        )
        return item, float(data.get("upserted_at", 0.0))


@dataclass(frozen=True)
class StoredItem:
    """An upserted item as the store holds it."""

    item: CatalogueItem
    ordinal: int  # assigned on the item's first upsert, never changed or reused
    upserted_at: float  # unix seconds of its latest upsert


@dataclass(frozen=True)
class CatalogueState:
    """The whole live catalogue at one revision (what the services poll for)."""

    revision: int  # grows with every change; 0: nothing was ever upserted or withdrawn
    items: tuple[StoredItem, ...]  # by ordinal
    withdrawn: frozenset[str]  # item ids (upserted ones or a version's own)

    @classmethod
    def empty(cls) -> CatalogueState:
        return cls(0, (), frozenset())


class FeatureStore(Protocol):
    """Per-user features for serving. Every method may raise FeatureStoreUnavailable."""

    async def snapshot_ready(self, version: str) -> bool:
        """Whether `version`'s snapshot is completely loaded."""
        ...

    async def user_state(self, version: str, user_id: str, *, now: float, live_limit: int = 200) -> UserState:
        """The user's snapshot in `version` (empty for an unknown user), their latest
        `live_limit` live events, exposures in the window ending at `now` and cache items.
        One round trip for Redis."""
        ...

    async def users_states(
        self, version: str, user_ids: Sequence[str], *, now: float, live_limit: int = 200
    ) -> list[UserState]:
        """`user_state` for many users at once (one round trip for Redis)."""
        ...

    # The writes of events take a `deadline`: a `time.monotonic()` instant until which a write
    # that fails the way a failover makes it fail (no answer within the budget, a connection
    # lost, CLUSTERDOWN, …) may be made again; None: one attempt. A retried write is applied
    # once (the events are not appended twice, an id this call marked is not its duplicate).
    async def append_events(
        self, user_id: str, events: Sequence[LiveEvent], *, deadline: float | None = None
    ) -> None:
        """Append events to the user's live history (capped at the policy's length)."""
        ...

    async def mark_events_seen(
        self, event_ids: Sequence[str], ttl_seconds: int, *, deadline: float | None = None
    ) -> list[bool]:
        """For each id: True the first time it is seen within `ttl_seconds` (apply the event),
        False for a duplicate (skip it)."""
        ...

    async def forget_events(self, event_ids: Sequence[str], *, deadline: float | None = None) -> None:
        """Undo `mark_events_seen` for these ids (their events could not be applied, so a
        retry must apply them)."""
        ...

    async def record_exposures(
        self, user_id: str, item_ids: Sequence[str], now: float, *, deadline: float | None = None
    ) -> None:
        """Remember that these items were shown at `now`."""
        ...

    async def put_cache(self, user_id: str, items: Sequence[tuple[str, float]], now: float) -> None:
        """Add (item id, score) pairs to the user's cache, or refresh their score and time;
        an item's use count is kept."""
        ...

    async def take_cache(self, user_id: str, limit: int, now: float) -> list[tuple[str, float]]:
        """Up to `limit` cached items, best first; each one returned uses up one of its
        `cache_max_uses`. Items used up or older than `cache_max_age_seconds` are dropped."""
        ...

    async def delete_version(self, version: str) -> int:
        """Delete a version's snapshot and ready marker; return how many entries went."""
        ...

    async def upsert_items(self, items: Sequence[CatalogueItem], now: float) -> list[tuple[int, bool]]:
        """Add or update items (the last one wins for an id given twice); each gets its
        (ordinal, whether it is new). An upsert lifts an earlier withdrawal. Atomic per call."""
        ...

    async def withdraw_items(self, item_ids: Sequence[str], now: float) -> list[bool]:
        """Withdraw items (upserted or a version's own) until upserted again; for each id,
        whether it was not withdrawn already."""
        ...

    async def catalogue_revision(self) -> int:
        """The live catalogue's revision (one cheap read, for polling)."""
        ...

    async def catalogue_state(self) -> CatalogueState:
        """The whole live catalogue (read again only when the revision changed)."""
        ...

    async def record_engagers(
        self, engagements: Sequence[tuple[str, str]], limit: int, *, deadline: float | None = None
    ) -> int:
        """Note (item id, user id) engagements with new items for the look-alike channel: each
        item keeps its first `limit` distinct users, in order; later ones are ignored. Returns
        how many were new; the engagers' revision moves when any was. Atomic per call."""
        ...

    async def engagers_revision(self) -> int:
        """The engagers' revision (one cheap read, for polling); 0: none recorded."""
        ...

    async def engagers(self) -> dict[str, tuple[str, ...]]:
        """Every item's first engagers, first first (read again only when the revision moved)."""
        ...

    async def add_item_impressions(self, counts: Mapping[str, int]) -> None:
        """Add `counts` (item id → times shown, each ≥ 1) to the live catalogue's items'
        impression counts. Ids the catalogue does not hold are ignored, so the counts stay
        bounded by the catalogue. Traffic control for new items decays their boost with these."""
        ...

    async def item_impressions(self, item_ids: Sequence[str]) -> list[int]:
        """For each id, how many impressions `add_item_impressions` counted (0: none)."""
        ...

    async def close(self) -> None: ...


def newest_last(events: Sequence[LiveEvent], limit: int) -> tuple[LiveEvent, ...]:
    """The last `limit` events appended, ordered by time (ties keep their order)."""
    if limit <= 0:
        return ()
    return tuple(sorted(events[-limit:], key=lambda event: event.time))


def cache_entry_alive(added: float, uses: int, now: float, policy: LiveDataPolicy) -> bool:
    return uses < policy.cache_max_uses and now - added <= policy.cache_max_age_seconds


def best_first(entries: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Highest score first; ties by item id (the Redis script orders the same way)."""
    return sorted(entries, key=lambda entry: (-entry[1], entry[0]))
