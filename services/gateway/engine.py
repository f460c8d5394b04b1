"""Recommend: recall → (pre-rank +) rank → blocklist → rerank → `count` items, on one model
version end to end, degrading instead of failing while something useful can be returned.
No gRPC types here beyond the downstream stubs (see servicer.py and http.py for the edges).

Degradation ladder (each step flagged in `degraded_reasons` and counted):
- rank slow, down or its breaker open → the candidates in pre-rank order (the user embedding
  recall returned · the item embeddings) or, without an embedding, in recall's merged order;
- recall slow, down or its breaker open → the gateway's own popular list for the version
  (minus what the user consumed in the version's data and the request's exclusions);
- a downstream FAILED_PRECONDITION (it does not have the version) → one retry on the
  dependency's current version when the gateway has that version too, else the step above.
- a downstream that sheds the call (RESOURCE_EXHAUSTED: saturated, not down) → the caller gets
  RESOURCE_EXHAUSTED too: under overload clients see full answers or a fast refusal to retry,
  not a degraded answer that hides the overload.
After answering (never for `dry_run`): the shown items are recorded as exposures and the ranked
but unshown ones go to the cache channel, off the request's latency, through a bounded queue
(`AnswerRecorder`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.blocklist import Blocklist, BlocklistFilter
from recsys.errors import InvalidArgument, Overloaded
from recsys.feature_store import FeatureStore
from recsys.scenes import ExperimentConfig, Scene, scene_named
from recsys.serving_model import ServingModel
from recsys.stages.fusion import Fusion
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.sources import not_excluded
from recsys.v1 import common_pb2, rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc
from services.common.deadline import Deadline
from services.common.versions import Loaded, ModelVersions
from services.gateway.downstream import Downstream, DownstreamError
from services.gateway.metrics import GatewayMetrics
from services.gateway.side_effects import AnswerRecorder, AnswerWrites

log = logging.getLogger("recsys.gateway")

_FUSION_METHODS = {
    "weighted_sum": rank_pb2.FUSION_METHOD_WEIGHTED_SUM,
    "weighted_product": rank_pb2.FUSION_METHOD_WEIGHTED_PRODUCT,
}


@dataclass(frozen=True)
class GatewayLimits:
    max_count: int = 100
    max_exclusions: int = 1000
    default_deadline: float = 0.3
    recall_timeout: float = 0.12
    rank_timeout: float = 0.12
    margin: float = 0.01
    fallback_items: int = 500
    cache_items: int = 100
    side_effect_queue: int = 2000  # answers whose writes may wait; more are dropped and counted
    side_effect_writers: int = 4


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    scene: str = ""
    count: int = 10
    exclude_item_ids: Sequence[str] = ()
    region: str = ""
    request_time: float = 0.0  # unix seconds; 0 → now
    debug: bool = False
    dry_run: bool = False
    request_id: str = ""
    time_remaining: float | None = None


@dataclass(frozen=True)
class Recommended:
    item_id: str
    title: str
    score: float
    position: int
    channels: list[str]
    task_scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StageTrace:
    stage: str
    candidates_in: int
    candidates_out: int
    milliseconds: float
    detail: str = ""


@dataclass
class RecommendResult:
    items: list[Recommended]
    model_version: str
    scene: str
    experiment: str
    arm: str
    degraded: list[str]
    cold_start: bool
    trace: list[StageTrace]


@dataclass
class _Candidates:
    """The request's working set, aligned arrays of one model version."""

    items: IntArray
    scores: FloatArray
    masks: npt.NDArray[np.uint64]
    channel_names: tuple[str, ...]
    task_scores: dict[str, FloatArray] = field(default_factory=dict)
    # The user's history recall read (passed on to rank so it need not read it again).
    history: common_pb2.UserHistory | None = None

    def take(self, positions: npt.NDArray[np.intp]) -> _Candidates:
        return _Candidates(
            self.items[positions],
            self.scores[positions],
            self.masks[positions],
            self.channel_names,
            {task: values[positions] for task, values in self.task_scores.items()},
            self.history,
        )

    def __len__(self) -> int:
        return int(self.items.shape[0])


class GatewayEngine:
    def __init__(
        self,
        versions: ModelVersions[ServingModel],
        features: FeatureStore,
        recall: recall_pb2_grpc.RecallAsyncStub,
        rank: rank_pb2_grpc.RankAsyncStub,
        recall_link: Downstream,
        rank_link: Downstream,
        scenes: Mapping[str, Scene],
        experiments: ExperimentConfig,
        blocklist: Blocklist,
        metrics: GatewayMetrics,
        limits: GatewayLimits | None = None,
    ) -> None:
        self._versions = versions
        self._features = features
        self._recall = recall
        self._rank = rank
        self._recall_link = recall_link
        self._rank_link = rank_link
        self.scenes = dict(scenes)
        self.experiments = experiments
        self.blocklist = blocklist
        self._metrics = metrics
        self.limits = limits or GatewayLimits()
        self.recorder = AnswerRecorder(
            features,
            metrics,
            capacity=self.limits.side_effect_queue,
            writers=self.limits.side_effect_writers,
        )
        self._blocklist_filters: dict[str, BlocklistFilter] = {}  # per model version

    # -- the request --------------------------------------------------------------------
    async def recommend(self, query: RecommendQuery) -> RecommendResult:
        limits = self.limits
        if not query.user_id:
            raise InvalidArgument("user_id", "must not be empty")
        if len(query.exclude_item_ids) > limits.max_exclusions:
            raise InvalidArgument("exclude_item_ids", f"at most {limits.max_exclusions} items")
        base = scene_named(self.scenes, query.scene)
        scene_name = base.name
        most = min(limits.max_count, base.max_count)
        if query.count <= 0 or query.count > most:
            raise InvalidArgument("count", f"must be in [1, {most}], got {query.count}")
        assignment = self.experiments.resolve(base, query.user_id)
        scene, experiment, arm = assignment.scene, assignment.experiment, assignment.arm
        deadline = Deadline.from_remaining(query.time_remaining, limits.default_deadline)
        now = query.request_time or time.time()
        loaded = self._versions.get()
        degraded: list[str] = []
        trace: list[StageTrace] = []

        started = time.perf_counter()
        recalled, loaded, embedding, cold_start = await self._recall_stage(
            query, scene, loaded, deadline, degraded
        )
        model = loaded.model
        self._trace(trace, "recall", 0, len(recalled), started, ",".join(degraded))

        started = time.perf_counter()
        before = len(recalled)
        recalled = self._drop_blocked(loaded, recalled)
        self._trace(trace, "blocklist", before, len(recalled), started)

        started = time.perf_counter()
        ranked = await self._rank_stage(query, scene, loaded, recalled, embedding, deadline, degraded)
        self._trace(trace, "rank", len(recalled), len(ranked), started)

        started = time.perf_counter()
        chosen = self._rerank(model, scene, ranked, query.count)
        self._trace(trace, "rerank", len(ranked), len(chosen), started, scene.rerank_method)

        items = [
            Recommended(
                item_id=str(model.core.catalogue.item_ids[item]),
                title=str(model.core.catalogue.titles[item]),
                score=float(chosen.scores[position]),
                position=position + 1,
                channels=_channels(int(chosen.masks[position]), chosen.channel_names),
                task_scores={task: float(values[position]) for task, values in chosen.task_scores.items()},
            )
            for position, item in enumerate(chosen.items.tolist())
        ]
        outcome = "degraded" if degraded else "full"
        self._metrics.recommendations.labels(scene_name, arm or "none", outcome).inc()
        self._metrics.items_returned.observe(len(items))
        for reason in degraded:
            self._metrics.degraded.labels(reason.split(":")[0]).inc()
        if not query.dry_run:
            shown = set(chosen.items.tolist())
            rest = [
                (item, score)
                for item, score in zip(ranked.items.tolist(), ranked.scores.tolist(), strict=True)
                if item not in shown
            ][: limits.cache_items]
            unshown = [(str(model.core.catalogue.item_ids[item]), score) for item, score in rest]
            self.recorder.submit(AnswerWrites(query.user_id, [item.item_id for item in items], unshown, now))
        return RecommendResult(
            items,
            loaded.version,
            scene_name,
            experiment,
            arm,
            degraded,
            cold_start,
            trace if query.debug else [],
        )

    # -- stages -------------------------------------------------------------------------
    async def _recall_stage(
        self,
        query: RecommendQuery,
        scene: Scene,
        loaded: Loaded[ServingModel],
        deadline: Deadline,
        degraded: list[str],
    ) -> tuple[_Candidates, Loaded[ServingModel], FloatArray | None, bool]:
        model = loaded.model
        exclude = [model.item_lookup[item] for item in query.exclude_item_ids if item in model.item_lookup]
        # Blocked items are excluded at the source too, so they never take a channel's quota.
        exclude.extend(self._blocklist_filter(loaded).blocked.tolist())
        request = recall_pb2.RecallRequest(
            user_id=query.user_id,
            context=_context(query),
            quotas=dict(scene.quotas),
            exclude_item_indexes=exclude,
            model_version=loaded.version,
            max_candidates=scene.recall_candidates,
            dry_run=query.dry_run,
        )
        budget = deadline.budget(self.limits.margin * 3, self.limits.recall_timeout)
        try:
            try:
                response = await self._recall_link.call(
                    lambda timeout: self._recall.Recall(request, timeout=timeout),
                    budget,
                    self.limits.recall_timeout,
                )
            except DownstreamError as error:
                if error.code is not grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # Recall no longer (or not yet) has our version: once more on its current one,
                # if we have that one too (its indexes must mean the same items to us).
                request.model_version = ""
                request.ClearField("exclude_item_indexes")
                response = await self._recall_link.call(
                    lambda timeout: self._recall.Recall(request, timeout=timeout),
                    deadline.budget(self.limits.margin * 3, self.limits.recall_timeout),
                    self.limits.recall_timeout,
                )
                loaded = self._versions.get(response.model_version)  # WrongModelVersion → degrade
                model = loaded.model
                excluded = {model.item_lookup[i] for i in query.exclude_item_ids if i in model.item_lookup}
                keep = [n for n, item in enumerate(response.item_indexes) if item not in excluded]
                degraded.append("version_retry")
                return self._from_recall(response, keep), loaded, _embedding(response), response.cold_start
        except DownstreamError as error:
            degraded.append(f"recall_{error.reason.replace(' ', '_')}")
            return self._fallback(model, query), loaded, None, model.user_lookup.get(query.user_id) is None
        except Overloaded:
            raise
        except Exception as error:  # WrongModelVersion after the retry: the same fallback
            log.warning("recall answer unusable", extra={"error": repr(error)})
            degraded.append("recall_version_unavailable")
            return self._fallback(model, query), loaded, None, model.user_lookup.get(query.user_id) is None
        degraded.extend(f"recall:{reason}" for reason in response.degraded_reasons)
        return (
            self._from_recall(response, range(len(response.item_indexes))),
            loaded,
            _embedding(response),
            response.cold_start,
        )

    @staticmethod
    def _from_recall(response: recall_pb2.RecallResponse, keep: Sequence[int] | range) -> _Candidates:
        positions = np.asarray(list(keep), dtype=np.intp)
        return _Candidates(
            np.asarray(response.item_indexes, dtype=np.int64)[positions].astype(np.int32),
            np.asarray(response.scores, dtype=np.float32)[positions],
            np.asarray(response.channel_masks, dtype=np.uint64)[positions],
            tuple(response.channel_names),
            history=response.history if response.HasField("history") else None,
        )

    def _fallback(self, model: ServingModel, query: RecommendQuery) -> _Candidates:
        """The version's global popular list minus the user's consumed items (as the version
        knows them) and the request's exclusions: useful, cheap and needing no dependency."""
        top = np.asarray(model.core.popularity.global_top[: self.limits.fallback_items], dtype=np.int32)
        drop = {model.item_lookup[item] for item in query.exclude_item_ids if item in model.item_lookup}
        user = model.user_lookup.get(query.user_id)
        if user is not None:
            drop.update(np.asarray(model.core.history.items.row(user)).tolist())
        if drop:
            top = top[~np.isin(top, np.fromiter(drop, dtype=np.int32, count=len(drop)))]
        scores = np.asarray(model.core.popularity.global_scores, dtype=np.float32)[top]
        return _Candidates(top, scores, np.zeros(top.shape[0], np.uint64), ("fallback_popular",))

    def _blocklist_filter(self, loaded: Loaded[ServingModel]) -> BlocklistFilter:
        stage = self._blocklist_filters.get(loaded.version)
        if stage is None:
            stage = BlocklistFilter.for_version(self.blocklist, loaded.model.item_lookup)
            # Kept for the versions still servable (current and, in its grace, previous) only.
            servable = set(self._versions.available())
            kept = {version: f for version, f in self._blocklist_filters.items() if version in servable}
            self._blocklist_filters = {**kept, loaded.version: stage}
        return stage

    def _drop_blocked(self, loaded: Loaded[ServingModel], candidates: _Candidates) -> _Candidates:
        if len(self.blocklist) == 0 or len(candidates) == 0:
            return candidates
        stage = self._blocklist_filter(loaded)
        keep = not_excluded(candidates.items, stage.blocked)  # the stage's own binary search
        removed = int(len(candidates) - keep.sum())
        if removed:
            self._metrics.filtered.labels(stage.identifier).inc(removed)
            return candidates.take(np.flatnonzero(keep))
        return candidates

    async def _rank_stage(
        self,
        query: RecommendQuery,
        scene: Scene,
        loaded: Loaded[ServingModel],
        candidates: _Candidates,
        embedding: FloatArray | None,
        deadline: Deadline,
        degraded: list[str],
    ) -> _Candidates:
        if len(candidates) == 0 or candidates.channel_names == ("fallback_popular",):
            return candidates
        request = rank_pb2.RankRequest(
            user_id=query.user_id,
            model_version=loaded.version,
            scene=query.scene or "default",
            item_indexes=candidates.items.tolist(),
            context=_context(query),
            fusion=_fusion(scene.fusion),
            prerank_keep=scene.prerank_keep if embedding is not None else 0,
            user_embedding=[] if embedding is None else embedding.tolist(),
            history=candidates.history,
        )
        try:
            response = await self._rank_link.call(
                lambda timeout: self._rank.Rank(request, timeout=timeout),
                deadline.budget(self.limits.margin, self.limits.rank_timeout),
                self.limits.rank_timeout,
            )
        except DownstreamError as error:
            degraded.append(f"rank_{error.reason.replace(' ', '_')}")
            return self._without_ranker(loaded.model, scene, candidates, embedding)
        position = {item: n for n, item in enumerate(candidates.items.tolist())}
        order = np.asarray([position[item] for item in response.item_indexes], dtype=np.intp)
        ranked = candidates.take(order)
        ranked.scores = np.asarray(response.scores, dtype=np.float32)
        ranked.task_scores = {
            task.task: np.asarray(task.scores, dtype=np.float32) for task in response.task_scores
        }
        best = np.argsort(-ranked.scores, kind="stable")
        return ranked.take(best)

    @staticmethod
    def _without_ranker(
        model: ServingModel, scene: Scene, candidates: _Candidates, embedding: FloatArray | None
    ) -> _Candidates:
        """Rank is unavailable: pre-rank order (the stage rank itself runs first), or recall's
        merged order without a user embedding."""
        if embedding is None:
            return candidates
        keep = min(scene.prerank_keep or len(candidates), len(candidates))
        cut = EmbeddingPreRanker(model.item_embeddings).select(
            candidates.items.astype(np.int64), embedding, keep
        )
        result = candidates.take(cut.positions)
        result.scores = cut.scores
        return result

    def _rerank(self, model: ServingModel, scene: Scene, ranked: _Candidates, count: int) -> _Candidates:
        if len(ranked) == 0:
            return ranked
        catalogue = model.core.catalogue
        selector = scene.selector()
        positions = selector.select(
            ranked.items,
            ranked.scores,
            np.asarray(model.item_embeddings[ranked.items], dtype=np.float32),
            np.asarray(catalogue.categories[ranked.items]),
            np.asarray(catalogue.authors[ranked.items]),
            count,
        )
        return ranked.take(np.asarray(positions, dtype=np.intp))

    async def drain(self) -> None:
        """Finish the writes of answers already given (at shutdown)."""
        await self.recorder.drain()

    # -- helpers ---------------------------------------------------------------------------
    def _trace(
        self, trace: list[StageTrace], stage: str, before: int, after: int, started: float, detail: str = ""
    ) -> None:
        seconds = time.perf_counter() - started
        self._metrics.stage_seconds.labels(stage).observe(seconds)
        trace.append(StageTrace(stage, before, after, seconds * 1000, detail))


def _channels(mask: int, names: tuple[str, ...]) -> list[str]:
    return [name for bit, name in enumerate(names) if mask >> bit & 1]


def _embedding(response: recall_pb2.RecallResponse) -> FloatArray | None:
    if not response.user_embedding:
        return None
    return np.asarray(response.user_embedding, dtype=np.float32)


def _context(query: RecommendQuery) -> common_pb2.RequestContext:
    context = common_pb2.RequestContext(region=query.region)
    if query.request_time:
        context.request_time.FromNanoseconds(int(query.request_time * 1e9))
    return context


def _fusion(fusion: Fusion) -> rank_pb2.Fusion:
    return rank_pb2.Fusion(
        method=_FUSION_METHODS[fusion.method], weights=dict(fusion.weights), exponents=dict(fusion.exponents)
    )
