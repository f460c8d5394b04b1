"""Wiring: settings → store, feature store, event log, version watcher, downstream channels
with circuit breakers, scenes and experiments, blocklist → engine, gRPC servicer, HTTP."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.blocklist import Blocklist
from recsys.feature_store import FeatureStore, FeatureStoreUnavailable, InProcessFeatureStore
from recsys.feature_store.event_log import event_log_for
from recsys.probe import check_item_embeddings
from recsys.scenes import ExperimentConfig, Scene, load_scenes
from recsys.serving_model import ALL_CHANNELS, ServingModel
from recsys.store import ModelStore
from recsys.v1 import catalogue_pb2_grpc, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from services.common.auth import caller_auth_from, server_ssl_context
from services.common.breaker import BreakerState, CircuitBreaker
from services.common.channels import create_channel
from services.common.interceptor import CallGuard
from services.common.server import Readiness, ServiceSpec, version_health_name
from services.common.tracing import Tracing
from services.common.versions import ModelVersions, version_metrics
from services.common.wiring import (
    ConfigReloader,
    catalogue_watcher_for,
    config_metrics,
    feature_store_for,
    local_copies_for,
)
from services.gateway.catalogue import CatalogueEditor
from services.gateway.clients import RankClient, RecallClient
from services.gateway.downstream import Downstream
from services.gateway.engine import GatewayEngine, GatewayLimits
from services.gateway.events import EventIngestor
from services.gateway.history import UserHistoryHydrator
from services.gateway.http import GatewayHttp
from services.gateway.metrics import GatewayMetrics, gateway_metrics
from services.gateway.servicer import CatalogueServicer, RecommenderServicer
from services.gateway.settings import GatewaySettings

log = logging.getLogger("recsys.gateway")

# Recall and rank calls have no side effects the caller can observe twice (recall's cache
# takes are bounded reuses), so the channel may retry them on UNAVAILABLE.
RECALL, RANK = "recsys.v1.Recall", "recsys.v1.Rank"
IDEMPOTENT = (RECALL, RANK)
HEALTH_CHECK_SECONDS = 1.0


def limits_from(settings: GatewaySettings) -> GatewayLimits:
    return GatewayLimits(
        max_count=settings.max_count,
        default_deadline=settings.default_deadline_ms / 1000,
        recall_timeout=settings.recall_timeout_ms / 1000,
        rank_timeout=settings.rank_timeout_ms / 1000,
        margin=settings.margin_ms / 1000,
        fallback_items=settings.fallback_items,
        cache_items=settings.cache_items,
        side_effect_queue=settings.side_effect_queue,
        side_effect_writers=settings.side_effect_writers,
    )


def load_gateway_model(store: ModelStore, version: str) -> ServingModel:
    """Only what the gateway uses: the catalogue (ids, titles, categories, authors: answers
    and rerank), popularity and histories (the fallback), item embeddings (pre-rank without
    rank, rerank's similarity) and the id lookups. The user tower, the ranker and the ANN
    index are never loaded (recall and rank run them), and the pair tables, mapped, are never
    read. No `warm()`: the feature tables, item digests and channel sources it builds, item by
    item while holding the GIL, are recall's and rank's, not the gateway's."""
    model = ServingModel.load(store.version_path(version), version=version, defer_models=True)
    # Of the probe, what the gateway uses: recall and rank probe the models they run and
    # refuse a version that fails, and the gateway switches only once both serve it.
    check_item_embeddings(model)
    # The two lookups every call uses, built here in the loading thread, not on a call.
    _ = model.user_lookup, model.item_lookup
    return model


@dataclass(frozen=True)
class GatewayConfig:
    """What the configuration files declare; re-read when they change (ConfigReloader)."""

    scenes: Mapping[str, Scene]
    experiments: ExperimentConfig
    blocklist: Blocklist

    @property
    def arm_names(self) -> set[str]:
        return {arm.name for experiment in self.experiments.experiments.values() for arm in experiment.arms}


def load_config(settings: GatewaySettings) -> GatewayConfig:
    """Scenes, experiments (checked against those scenes) and the blocklist from their files;
    ValueError or OSError naming the file and field when one is invalid."""
    scenes = (
        load_scenes(settings.scenes_file, channels=ALL_CHANNELS)
        if settings.scenes_file
        else {"default": Scene(name="default")}
    )
    experiments = (
        ExperimentConfig.load(settings.experiments_file, scenes=scenes, channels=ALL_CHANNELS)
        if settings.experiments_file
        else ExperimentConfig.empty()
    )
    blocklist = Blocklist.load(settings.blocklist_file) if settings.blocklist_file else Blocklist.of(())
    return GatewayConfig(scenes, experiments, blocklist)


def _link(name: str, settings: GatewaySettings, metrics: GatewayMetrics) -> Downstream:
    gauge = metrics.breaker_state.labels(name)

    def transition(_breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        gauge.set(new.level)
        # A state change is rare and says a dependency went bad or came back: worth a line.
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "circuit breaker %s: %s -> %s",
            name,
            old.value,
            new.value,
            extra={"dependency": name, "from": old.value, "to": new.value},
        )

    breaker = CircuitBreaker(
        name,
        failure_threshold=settings.breaker_failures,
        open_seconds=settings.breaker_open_seconds,
        on_transition=transition,
    )
    return Downstream(name, breaker)


class GatewayApp:
    name = "gateway"
    service_names = ("recsys.v1.Recommender", "recsys.v1.CatalogueService")

    def __init__(self, settings: GatewaySettings, features: FeatureStore | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(settings.store)
        self.features = feature_store_for(settings.redis, settings.redis_prefix, features)
        self.event_log = event_log_for(self.features, settings.event_log, settings.event_log_max_bytes)
        metrics = gateway_metrics()
        self.versions: ModelVersions[ServingModel] = ModelVersions(
            self.store,
            load_gateway_model,
            version_metrics("gateway"),
            poll_seconds=settings.poll_seconds,
            local_copies=local_copies_for(settings.local_model_dir),
            grace_seconds=settings.version_grace_seconds,
            ready_check=self._servable_downstream,
            on_change=self._on_change,
            on_poll=lambda: self.config.poll(),
        )
        # The clients set the request id themselves (no interceptor on the busiest path).
        self._recall_channel = create_channel(
            settings.recall_addr, settings.client, idempotent_services=IDEMPOTENT, forward_request_id=False
        )
        self._rank_channel = create_channel(
            settings.rank_addr, settings.client, idempotent_services=IDEMPOTENT, forward_request_id=False
        )
        config = load_config(settings)
        # Items upserted or withdrawn while serving: answers name them, filters drop the withdrawn;
        # and the impressions of the young ones, for the scenes' new-item traffic control (the
        # scenes as reloaded: the horizon is asked at every poll).
        self.catalogue = catalogue_watcher_for(
            "gateway",
            self.features,
            self.versions,
            settings.catalogue_poll_seconds,
            impressions_horizon=lambda: self.engine.new_item_horizon(),
        )
        self.editor = CatalogueEditor(
            self.features, self._catalogued_item, max_items=settings.max_catalogue_items
        )
        self.engine = GatewayEngine(
            self.versions,
            self.features,
            RecallClient(
                recall_pb2_grpc.RecallStub(self._recall_channel),
                _link("recall", settings, metrics),
                settings.recall_timeout_ms / 1000,
            ),
            RankClient(
                rank_pb2_grpc.RankStub(self._rank_channel),
                _link("rank", settings, metrics),
                settings.rank_timeout_ms / 1000,
            ),
            config.scenes,
            config.experiments,
            config.blocklist,
            metrics,
            limits_from(settings),
            catalogue=self.catalogue,
        )
        self.config = ConfigReloader(
            (settings.scenes_file, settings.experiments_file, settings.blocklist_file),
            lambda: load_config(settings),
            self._apply_config,
            config_metrics("gateway"),
        )
        self.ingestor = EventIngestor(
            self.features,
            self.event_log,
            metrics,
            known_item=self._known_item,
            dedupe_seconds=settings.event_dedupe_seconds,
            new_item=self._new_item,
            engagers_per_item=settings.look_alike_engagers,
            write_seconds=settings.event_write_retry_ms / 1000,
            scenes=config.scenes,
            arms=config.arm_names,
        )
        self._readiness: Readiness | None = None
        # One authenticator and one rate limiter for both ports: a caller's budget is the same
        # whether it calls over gRPC or HTTP (GrpcHost hands it to the CallGuard).
        self.caller_auth = caller_auth_from(settings, settings)
        self.http = GatewayHttp(
            self.engine,
            self.ingestor,
            settings.max_events,
            self._serving,
            max_body_bytes=settings.http_max_body_bytes,
            read_timeout=settings.http_read_timeout_ms / 1000,
            idle_timeout=settings.http_idle_timeout_ms / 1000,
            auth=self.caller_auth,
            history=UserHistoryHydrator(self.versions, self.features, settings.http_history_max_entries)
            if settings.http_ui
            else None,
        )

    async def _servable_downstream(self, version: str) -> bool:
        """Whether to switch to `version`: only once recall and rank serve it. They switch
        only once push-features marked its features ready (with Redis), so until then the
        whole tier stays on the version it has, with its features: no call names a version
        a dependency refuses (which would double the Recall calls, then fall back to the
        popular list once the previous version's grace is over). The first version is loaded
        on the ready marker alone, so that a gateway whose dependencies are down still
        answers (from its fallback)."""
        if not isinstance(self.features, InProcessFeatureStore):
            try:
                if not await self.features.snapshot_ready(version):
                    return False
            except FeatureStoreUnavailable:
                return False
        if self.versions.current is None:
            return True
        for channel, service in ((self._recall_channel, RECALL), (self._rank_channel, RANK)):
            if not await _serves(channel, version_health_name(service, version)):
                return False
        return True

    def _apply_config(self, config: GatewayConfig) -> None:
        self.engine.scenes = dict(config.scenes)
        self.engine.experiments = config.experiments
        self.engine.blocklist = config.blocklist
        # The engine keeps one blocklist filter per model version, built from the blocklist
        # it had then: drop them so that the next call builds them from the new one.
        self.engine._blocklist_filters = {}
        self.ingestor.set_label_values(config.scenes, config.arm_names)

    def _known_item(self, item_id: str) -> bool:
        """Whether an event may name the item: the current version's (not withdrawn) or a new
        item it serves from the live catalogue."""
        loaded = self.versions.get()
        return item_id in loaded.model.item_lookup or self.catalogue.known_item(item_id, loaded.version)

    def _new_item(self, item_id: str) -> bool:
        """Whether an event's item is a new one of the live catalogue (not the current
        version's own): its events make engagers for the look-alike channel."""
        loaded = self.versions.current
        return loaded is not None and self.catalogue.known_item(item_id, loaded.version)

    def _catalogued_item(self, item_id: str) -> bool:
        """For WithdrawItems' `unknown` count: in the current version or upserted (as of the
        last poll)."""
        current = self.versions.current
        in_version = current is not None and item_id in current.model.item_lookup
        return in_version or self.catalogue.upserted(item_id)

    def _serving(self) -> bool:
        return self._readiness is not None and self._readiness.serving

    async def _on_change(self, loaded: Any) -> None:
        if self._readiness is not None:
            await self._readiness.set_serving(True)

    def attach_guard(self, guard: CallGuard) -> None:
        """The HTTP port admits its calls through the gRPC port's limit and queue."""
        self.http.guard = guard

    def attach_tracing(self, tracing: Tracing) -> None:
        """Tracing is on (GrpcHost): stage spans, client spans carrying the trace to recall
        and rank, and a server span per HTTP request."""
        self.engine.tracing = tracing
        self.engine.recall_client.tracing = tracing
        self.engine.rank_client.tracing = tracing
        self.http.attach_tracing(tracing)

    def register(self, server: aio.Server) -> None:
        gateway_pb2_grpc.add_RecommenderServicer_to_server(
            RecommenderServicer(self.engine, self.ingestor, self.settings.max_events), server
        )
        catalogue_pb2_grpc.add_CatalogueServiceServicer_to_server(CatalogueServicer(self.editor), server)

    async def start(self, readiness: Readiness) -> None:
        self._readiness = readiness
        await self.versions.start()
        await self.catalogue.start()
        if self.settings.http_port is not None:
            # The same TLS as the gRPC port: with --tls-client-ca, HTTP requires client certificates too.
            await self.http.start(
                self.settings.host,
                self.settings.http_port,
                reuse_port=self.settings.workers > 1,
                ssl_context=server_ssl_context(self.settings),
            )
            log.info(
                "HTTP listening",
                extra={
                    "http_port": self.http.port,
                    "tls": self.settings.tls_enabled,
                    "ui": self.settings.http_ui,
                },
            )

    async def stop(self) -> None:
        await self.http.stop()
        await self.engine.drain()
        await self.catalogue.stop()
        await self.versions.stop()
        await self._recall_channel.close()
        await self._rank_channel.close()
        await self.event_log.close()
        await self.features.close()


async def _serves(channel: aio.Channel, health_name: str) -> bool:
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=health_name), timeout=HEALTH_CHECK_SECONDS
        )
    except aio.AioRpcError:  # down, or NOT_FOUND: it never had the version
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def create_app(settings: Any) -> GatewayApp:
    return GatewayApp(settings)


SPEC = ServiceSpec("gateway", create_app)
