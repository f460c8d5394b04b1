"""The feature store: per-user version snapshots and live data (events, exposures, cache).

One interface (`FeatureStore`), two implementations chosen by a URL:

- `memory://` → `InProcessFeatureStore`, embedded, no Redis (register versions with
  `add_version`);
- `redis://HOST:PORT/DB` (also `rediss://`, `unix://`, `redis+cluster://`) →
  `RedisFeatureStore` (key schema in `recsys.feature_store.redis_store` and the README).

Exposures are remembered in time-sliced Bloom filters (`recsys.feature_store.bloom`).
"""

from __future__ import annotations

from typing import Any

from recsys.feature_store.base import (
    CONSUMING_KINDS,
    EVENT_KINDS,
    MAX_CATEGORIES,
    CatalogueItem,
    CatalogueState,
    FeatureStore,
    FeatureStoreUnavailable,
    LiveDataPolicy,
    LiveEvent,
    Snapshot,
    StoredItem,
    UserState,
)
from recsys.feature_store.bloom import BloomFilter, BloomParameters, ExposureFilterConfig, ExposureSnapshot
from recsys.feature_store.memory import InProcessFeatureStore

MEMORY_URL = "memory://"


def open_feature_store(url: str, **options: Any) -> FeatureStore:
    """The feature store a URL names: `memory://` or a Redis URL. `options` go to the
    implementation (`policy` for both; `prefix`, `read_timeout`, `write_timeout`,
    `max_connections` for Redis)."""
    if url.strip().lower() in (MEMORY_URL, "memory:", "memory"):
        return InProcessFeatureStore(policy=options.pop("policy", None), **options)
    from recsys.feature_store.redis_store import RedisFeatureStore

    return RedisFeatureStore(url, **options)


__all__ = [
    "CONSUMING_KINDS",
    "EVENT_KINDS",
    "MAX_CATEGORIES",
    "MEMORY_URL",
    "BloomFilter",
    "BloomParameters",
    "CatalogueItem",
    "CatalogueState",
    "ExposureFilterConfig",
    "ExposureSnapshot",
    "FeatureStore",
    "FeatureStoreUnavailable",
    "InProcessFeatureStore",
    "LiveDataPolicy",
    "LiveEvent",
    "Snapshot",
    "StoredItem",
    "UserState",
    "open_feature_store",
]
