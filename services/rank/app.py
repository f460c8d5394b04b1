"""Wiring: settings → store, feature store, version watcher, micro-batcher, engine, servicer."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from grpc import aio

from recsys.feature_store import FeatureStore, InProcessFeatureStore
from recsys.probe import probe
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from recsys.v1 import rank_pb2_grpc
from services.common.server import Readiness, ServiceSpec
from services.common.snapshots import SnapshotRepair
from services.common.tracing import Tracing
from services.common.versions import Loaded, ModelVersions, version_metrics
from services.common.wiring import (
    ConfigReloader,
    catalogue_watcher_for,
    config_metrics,
    feature_store_for,
    local_copies_for,
    version_loaded,
)
from services.rank.batcher import MicroBatcher
from services.rank.engine import RankEngine, RankLimits
from services.rank.metrics import rank_metrics
from services.rank.scenes import SceneFusions
from services.rank.scorer import OnnxScorer
from services.rank.servicer import RankServicer
from services.rank.settings import RankSettings

log = logging.getLogger("recsys.rank")


def load_model(scenes: SceneFusions, store: ModelStore, version: str) -> ServingModel:
    """Load a version for ranking, or raise (the version is then refused and the loaded one
    keeps serving): it must have a ranker and the heads every configured scene fuses."""
    path = store.version_path(version)
    model = ServingModel.load(path, version=version)
    if model.ranker is None:
        raise ValueError(f"version {version} is retrieval-only: it has no ranker to serve")
    scenes.check(model)
    model.warm()
    # Every scene's fusion too: a weight that overflows a product is as unusable as NaN weights.
    probe(model, path, [scenes.fusion(name, model) for name in scenes.names])
    # The first onnxruntime runs allocate their buffers: pay that here, not on a call.
    known = np.arange(min(8, model.core.catalogue.n_items), dtype=np.int64)
    empty = np.zeros(0, np.int64)
    model.score(model.user_features.inputs(-1, empty, np.zeros(0, bool)), known)
    return model


def limits_from(settings: RankSettings) -> RankLimits:
    return RankLimits(max_candidates=settings.max_candidates)


class RankApp:
    name = "rank"
    service_names = ("recsys.v1.Rank",)

    def __init__(self, settings: RankSettings, features: FeatureStore | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store)
        self.scenes = SceneFusions.load(settings.scenes_file)
        self.features = feature_store_for(
            settings.redis,
            settings.redis_prefix,
            features,
            read_budget=settings.feature_store_timeout_ms / 1000,
        )
        self.executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="rank-inference")
        in_process = isinstance(self.features, InProcessFeatureStore)
        self.repair = (
            SnapshotRepair(settings.redis, settings.redis_prefix, version_metrics(self.name))
            if settings.redis and not in_process and settings.repush_lost_features
            else None
        )
        self.versions: ModelVersions[ServingModel] = ModelVersions(
            self.store,
            # The scenes at the time of the load: they may have been reloaded since start-up.
            lambda store, version: load_model(self.scenes, store, version),
            version_metrics("rank"),
            poll_seconds=settings.poll_seconds,
            local_copies=local_copies_for(settings.local_model_dir),
            grace_seconds=settings.version_grace_seconds,
            # A Redis-backed process switches only once the version's features are pushed.
            ready_check=None if in_process else self.features.snapshot_ready,
            on_change=self._on_change,
            on_servable=self._on_servable,
            on_poll=lambda: self.config.poll(),
            snapshot_check=None if in_process else self.features.snapshot_ready,
            on_snapshot_lost=None if self.repair is None else self.repair.lost,
            on_retire=rank_metrics().retire,
        )
        self.batcher = MicroBatcher(
            OnnxScorer(),
            self.executor,
            rank_metrics(),
            window=settings.batch_window_ms / 1000,
            max_rows=settings.max_batch_rows,
            collectors=settings.inference_threads,
        )
        # Items upserted or withdrawn while serving: new ones are scored from their content.
        self.catalogue = catalogue_watcher_for(
            "rank", self.features, self.versions, settings.catalogue_poll_seconds
        )
        self.engine = RankEngine(
            self.versions,
            self.features,
            self.batcher,
            rank_metrics(),
            self.scenes,
            limits_from(settings),
            self.catalogue,
        )
        self.config = ConfigReloader(
            (settings.scenes_file,), self._parse_scenes, self._apply_scenes, config_metrics("rank")
        )
        self._readiness: Readiness | None = None

    def _parse_scenes(self) -> SceneFusions:
        """The scenes file again, checked against every version being served: a fusion that
        names a head the current model lacks is refused, as it would be at a load."""
        scenes = SceneFusions.load(self.settings.scenes_file)
        for loaded in (self.versions.current, self.versions.previous):
            if loaded is not None:
                scenes.check(loaded.model)
        return scenes

    def _apply_scenes(self, scenes: SceneFusions) -> None:
        self.scenes = scenes
        self.engine.scenes = scenes

    async def _on_change(self, loaded: Loaded[ServingModel]) -> None:
        await version_loaded(self.features, self._readiness, loaded)

    async def _on_servable(self, versions: list[str]) -> None:
        # The gateway switches to a version only once recall and rank say they serve it.
        if self._readiness is not None:
            await self._readiness.set_versions(versions)

    def attach_tracing(self, tracing: Tracing) -> None:
        """Tracing is on (GrpcHost): spans for pre-rank, the user's features, each call's wait
        for its batch, and the micro-batch (feature assembly, onnxruntime)."""
        self.engine.tracing = tracing
        self.batcher.tracing = tracing

    def register(self, server: aio.Server) -> None:
        rank_pb2_grpc.add_RankServicer_to_server(RankServicer(self.engine), server)

    async def start(self, readiness: Readiness) -> None:
        self._readiness = readiness
        await self.batcher.start()
        await self.versions.start()
        await self.catalogue.start()

    async def stop(self) -> None:
        await self.catalogue.stop()
        await self.versions.stop()
        if self.repair is not None:
            await self.repair.stop()
        await self.batcher.stop()
        await self.features.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def create_app(settings: Any) -> RankApp:
    return RankApp(settings)


SPEC = ServiceSpec("rank", create_app)
