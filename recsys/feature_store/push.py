"""Loading a model version's snapshot into Redis (`recsys store push-features`).

Every user's training history and region are packed (`Snapshot.pack`) and SET under the
version's keys in pipelined batches; only when every batch is in does the version's ready
marker appear, so a service never reads a half-loaded version. Re-running overwrites the same
keys with the same values: a push that failed half-way is finished by running it again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.artifacts import CoreArtifacts, load_core
from recsys.feature_store.base import Snapshot
from recsys.feature_store.redis_store import DEFAULT_PREFIX, RedisFeatureStore
from recsys.store import MANIFEST_FILE, ModelStore, StoreError

SNAPSHOT_FORMAT = 1
DEFAULT_PUSH_TIMEOUT = 30.0


@dataclass(frozen=True)
class PushProgress:
    version: str
    done: int  # users processed so far
    total: int
    written: int  # snapshots written so far (users with no history and no region are skipped)
    bytes: int


@dataclass(frozen=True)
class PushReport:
    version: str
    users: int
    written: int
    bytes: int
    batches: int
    seconds: float


ProgressCallback = Callable[[PushProgress], None]


def resolve_version(source: str | os.PathLike[str], version: str | None) -> tuple[Path, str]:
    """(version directory, version name) from a store (VERSION or its CURRENT) or from a
    version directory itself."""
    path = Path(source)
    if (path / MANIFEST_FILE).is_file():
        return path, version or path.name
    store = ModelStore(source)
    if version is None:
        version = store.current()
        if version is None:
            raise StoreError(f"{store} has no CURRENT version yet: name one")
    return store.version_path(version), version


async def push_features(
    source: str | os.PathLike[str],
    version: str | None,
    redis_url: str,
    prefix: str = DEFAULT_PREFIX,
    batch: int = 1_000,
    progress: ProgressCallback | None = None,
    *,
    redis_timeout: float = DEFAULT_PUSH_TIMEOUT,
) -> PushReport:
    """Push `version` of the store (or version directory) `source` into Redis at `redis_url`
    (CURRENT when `version` is None). Raises FeatureStoreUnavailable when Redis fails."""
    version_dir, name = resolve_version(source, version)
    core = load_core(version_dir)
    store = RedisFeatureStore(redis_url, prefix, read_timeout=redis_timeout, write_timeout=redis_timeout)
    try:
        return await push_core(store, name, core, batch=batch, progress=progress)
    finally:
        await store.close()


async def push_core(
    store: RedisFeatureStore,
    version: str,
    core: CoreArtifacts,
    *,
    batch: int = 1_000,
    progress: ProgressCallback | None = None,
) -> PushReport:
    """Push a version's snapshot from its core arrays, then mark the version ready."""
    if batch < 1:
        raise ValueError(f"batch: expected at least 1, got {batch}")
    started = time.monotonic()
    user_ids = core.users.user_ids
    regions = np.asarray(core.users.regions)
    history = core.history
    offsets = np.asarray(history.items.offsets)
    total = int(user_ids.shape[0])
    written = size = batches = 0
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        # One contiguous read of the batch's rows (the arrays may be memory-mapped).
        low, high = int(offsets[start]), int(offsets[stop])
        items = np.asarray(history.items.values[low:high], dtype=np.int32)
        times = np.asarray(history.times.values[low:high], dtype=np.int64)
        ratings = np.asarray(history.ratings.values[low:high], dtype=np.float32)
        packed: list[tuple[str, bytes]] = []
        for user in range(start, stop):
            first, last = int(offsets[user]) - low, int(offsets[user + 1]) - low
            region = int(regions[user])
            if first == last and region == 0:
                continue  # reads as empty, exactly as an unknown user
            snapshot = Snapshot(items[first:last], times[first:last], ratings[first:last], region)
            packed.append((str(user_ids[user]), snapshot.pack()))
        if packed:
            size += await store.write_snapshots(version, packed)
        written += len(packed)
        batches += 1
        if progress is not None:
            progress(PushProgress(version, stop, total, written, size))
    await store.mark_ready(
        version,
        {
            "format": SNAPSHOT_FORMAT,
            "users": total,
            "snapshots": written,
            "bytes": size,
            "pushed_at": round(time.time(), 3),
        },
    )
    return PushReport(version, total, written, size, batches, time.monotonic() - started)


REPUSH_LOCK_SECONDS = 600


async def repush_with_lock(
    store: RedisFeatureStore,
    version: str,
    core: CoreArtifacts,
    *,
    owner: str,
    lock_seconds: int = REPUSH_LOCK_SECONDS,
    batch: int = 1_000,
) -> PushReport | None:
    """Push `version` again from the core arrays a serving process has loaded, if no other
    process is doing so (the version's push lock in Redis); None when another holds the lock.
    How the services repair a snapshot lost in a Redis restart (see docs/operations.md)."""
    if not await store.acquire_push_lock(version, owner, lock_seconds):
        return None
    try:
        return await push_core(store, version, core, batch=batch)
    finally:
        await store.release_push_lock(version, owner)
