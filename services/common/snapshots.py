"""Repairing a lost feature snapshot from a serving process.

A Redis that restarts without its data (or is flushed) loses every version's snapshot and
ready marker; the services notice at their next poll (`ModelVersions.check_snapshot`), flag
their answers `feature_snapshot_missing` and serve each user's snapshot from the loaded
version meanwhile (`recsys.feature_store.snapshot_loss`). This pushes the features again,
from the version already in memory, through a lock in Redis so that one process of the
tier does it. Why here rather than a Job the alert's runbook names: the repair starts within
one poll of the loss wherever the services run (Kubernetes or `recsys up`), needs no access
to the Kubernetes API from inside the cluster, and the process already holds the data
push-features would read from the model volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from recsys.feature_store.push import repush_with_lock
from recsys.feature_store.redis_store import RedisFeatureStore
from recsys.serving_model import ServingModel
from services.common.versions import Loaded, VersionMetrics

log = logging.getLogger("recsys.snapshots")

# A push writes batches far larger than a request's reads: its own client, with the timeouts
# of `recsys store push-features`.
PUSH_TIMEOUT_SECONDS = 30.0


class SnapshotRepair:
    """`on_snapshot_lost` for ModelVersions: one background re-push at a time."""

    def __init__(self, redis_url: str, prefix: str, metrics: VersionMetrics) -> None:
        self._url = redis_url
        self._prefix = prefix
        self._metrics = metrics
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._task: asyncio.Task[None] | None = None

    async def lost(self, loaded: Loaded[ServingModel]) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._repush(loaded), name="feature-snapshot-repush")

    async def _repush(self, loaded: Loaded[ServingModel]) -> None:
        store = RedisFeatureStore(
            self._url, self._prefix, read_timeout=PUSH_TIMEOUT_SECONDS, write_timeout=PUSH_TIMEOUT_SECONDS
        )
        try:
            report = await repush_with_lock(store, loaded.version, loaded.model.core, owner=self._owner)
        except Exception as error:  # retried at the next poll that still finds it missing
            self._metrics.repushes.labels("failed").inc()
            log.error("re-pushing the features of %s failed: %r", loaded.version, error)
            return
        finally:
            await store.close()
        if report is None:
            self._metrics.repushes.labels("locked").inc()
            log.info("another process is re-pushing the features", extra={"version": loaded.version})
        else:
            self._metrics.repushes.labels("pushed").inc()
            log.warning(
                "re-pushed the features of %s: %d users in %.1f s",
                loaded.version,
                report.users,
                report.seconds,
                extra={"version": loaded.version},
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
