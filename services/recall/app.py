"""Wiring: settings → store, feature store, version watcher, engine, servicer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from grpc import aio

from recsys.blocklist import Blocklist, BlocklistFile, VersionBlocklists
from recsys.feature_store import FeatureStore, InProcessFeatureStore
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from recsys.v1 import recall_pb2_grpc
from services.common.server import Readiness, ServiceSpec
from services.common.snapshots import SnapshotRepair
from services.common.tracing import Tracing
from services.common.versions import Loaded, ModelVersions, version_metrics
from services.common.wiring import (
    catalogue_watcher_for,
    feature_store_for,
    load_serving_model,
    local_copies_for,
    version_loaded,
)
from services.recall.engine import RecallEngine, RecallLimits, prepare_new_items
from services.recall.look_alike import LookAlikeIndex
from services.recall.metrics import recall_metrics
from services.recall.servicer import RecallServicer
from services.recall.settings import RecallSettings

log = logging.getLogger("recsys.recall")


def limits_from(settings: RecallSettings) -> RecallLimits:
    return RecallLimits(
        max_quota=settings.max_quota,
        max_candidates=settings.max_candidates,
        default_candidates=settings.default_candidates,
        channel_timeout=settings.channel_timeout_ms / 1000,
        channel_timeouts={name: ms / 1000 for name, ms in settings.channel_timeouts_ms.items()},
        workers=settings.channel_workers,
        default_deadline=settings.default_deadline_ms / 1000,
        new_items_quota=settings.new_items_quota,
        look_alike_quota=settings.look_alike_quota,
    )


class RecallApp:
    name = "recall"
    service_names = ("recsys.v1.Recall",)

    def __init__(self, settings: RecallSettings, features: FeatureStore | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store)
        self.features = feature_store_for(
            settings.redis,
            settings.redis_prefix,
            features,
            read_budget=settings.feature_store_timeout_ms / 1000,
        )
        self.executor = ThreadPoolExecutor(settings.channel_threads, thread_name_prefix="recall-channel")
        in_process = isinstance(self.features, InProcessFeatureStore)
        self.repair = (
            SnapshotRepair(settings.redis, settings.redis_prefix, version_metrics(self.name))
            if settings.redis and not in_process and settings.repush_lost_features
            else None
        )
        self.versions: ModelVersions[ServingModel] = ModelVersions(
            self.store,
            load_serving_model,
            version_metrics("recall"),
            poll_seconds=settings.poll_seconds,
            local_copies=local_copies_for(settings.local_model_dir),
            grace_seconds=settings.version_grace_seconds,
            # A Redis-backed process switches only once the version's features are pushed.
            ready_check=None if in_process else self.features.snapshot_ready,
            on_change=self._on_change,
            on_servable=self._on_servable,
            snapshot_check=None if in_process else self.features.snapshot_ready,
            on_snapshot_lost=None if self.repair is None else self.repair.lost,
        )
        self.blocklist_file = BlocklistFile(settings.blocklist_file) if settings.blocklist_file else None
        # Items upserted or withdrawn while serving, laid out per servable version.
        self.catalogue = catalogue_watcher_for(
            "recall", self.features, self.versions, settings.catalogue_poll_seconds, prepare_new_items
        )
        # The look-alike channel's vectors, from the engagers the gateway records.
        self.look_alike = LookAlikeIndex(
            self.features,
            lambda: [(version, self.versions.get(version).model) for version in self.versions.available()],
            self.catalogue,
            settings.look_alike_poll_seconds,
            engagers_per_item=settings.look_alike_engagers,
        )
        self.engine = RecallEngine(
            self.versions,
            self.features,
            self.executor,
            recall_metrics(),
            limits_from(settings),
            VersionBlocklists(self.blocklist_file.blocklist if self.blocklist_file else Blocklist.of(())),
            self.catalogue,
            self.look_alike,
        )
        self._blocklist_task: asyncio.Task[None] | None = None
        self._readiness: Readiness | None = None

    async def _on_change(self, loaded: Loaded[ServingModel]) -> None:
        await version_loaded(self.features, self._readiness, loaded)

    async def _on_servable(self, versions: list[str]) -> None:
        # The gateway switches to a version only once recall and rank say they serve it.
        if self._readiness is not None:
            await self._readiness.set_versions(versions)

    def attach_tracing(self, tracing: Tracing) -> None:
        """Tracing is on (GrpcHost): spans for the user state, each channel, the exposure
        filter and the merge."""
        self.engine.tracing = tracing

    def register(self, server: aio.Server) -> None:
        recall_pb2_grpc.add_RecallServicer_to_server(RecallServicer(self.engine), server)

    async def start(self, readiness: Readiness) -> None:
        self._readiness = readiness
        await self.versions.start()
        await self.catalogue.start()
        await self.look_alike.start()
        if self.blocklist_file is not None:
            self._blocklist_task = asyncio.create_task(self._watch_blocklist(self.blocklist_file))

    async def _watch_blocklist(self, source: BlocklistFile) -> None:
        """Re-read the blocklist when its file changes: a taken-down item leaves every answer
        within `blocklist_reload_seconds`, with no restart."""
        while True:
            await asyncio.sleep(self.settings.blocklist_reload_seconds)
            try:
                changed = await asyncio.to_thread(source.reload)
            except OSError as error:  # keep the last good one
                log.error("could not re-read the blocklist %s: %s", source.path, error)
                continue
            if changed:
                self.engine.blocklists.replace(source.blocklist)
                log.info("blocklist reloaded", extra={"items": len(source.blocklist)})

    async def stop(self) -> None:
        if self._blocklist_task is not None:
            self._blocklist_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._blocklist_task
        await self.look_alike.stop()
        await self.catalogue.stop()
        await self.versions.stop()
        if self.repair is not None:
            await self.repair.stop()
        await self.features.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def create_app(settings: Any) -> RecallApp:
    return RecallApp(settings)


SPEC = ServiceSpec("recall", create_app)
