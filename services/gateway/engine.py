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

New-item traffic control (a scene's `new_items`, see `recsys.stages.rerank.NewItemTraffic`):
rerank boosts, caps and reserves the candidates upserted less than `max_age` ago, their
impression counts read from the catalogue watcher's memory (polled with the catalogue, never
on the request path; a feature store that is down leaves the last counts, or none). What an
answer that is not a dry run shows of them is counted per scene and arm
(`recsys_gateway_new_item_impressions_total`) and, after answering, in the feature store
(`add_item_impressions`, what decays their boost).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.blocklist import Blocklist, BlocklistFilter
from recsys.catalogue import CatalogueWatcher, NewItems
from recsys.errors import InvalidArgument, RecsysError, WrongModelVersion
from recsys.feature_store import FeatureStore
from recsys.features import Provenance
from recsys.scenes import ExperimentConfig, Scene, scene_named
from recsys.serving_model import ServingModel
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.query import UserHistory
from recsys.stages.rerank import NewCandidates
from recsys.stages.sources import not_excluded
from services.common.deadline import Deadline
from services.common.tracing import Tracing, span_or_nothing
from services.common.versions import Loaded, ModelVersions
from services.gateway.clients import (
    RankCall,
    RankClient,
    RecallCall,
    RecallClient,
    Recalled,
    RequestContext,
    VersionMismatch,
)
from services.gateway.downstream import DownstreamError
from services.gateway.metrics import GatewayMetrics
from services.gateway.side_effects import AnswerRecorder, AnswerWrites

log = logging.getLogger("recsys.gateway")


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
    provenance: Provenance | None = None  # recall's, for rank's features

    def take(self, positions: npt.NDArray[np.intp]) -> _Candidates:
        return _Candidates(
            self.items[positions],
            self.scores[positions],
            self.masks[positions],
            self.channel_names,
            {task: values[positions] for task, values in self.task_scores.items()},
            None if self.provenance is None else self.provenance.take(positions),
        )

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @property
    def is_fallback(self) -> bool:
        return self.channel_names == FALLBACK_CHANNELS


FALLBACK_CHANNELS = ("fallback_popular",)
# The stages with a span when tracing is on; the blocklist (a binary search, usually on an empty
# list) would cost more traced than it does.
_STAGE_SPANS = {stage: f"gateway.{stage}" for stage in ("recall", "rank", "rerank")}


@dataclass
class _Request:
    """One Recommend as it moves through the stages: what it asked for, the version it is
    served on, its deadline, the working candidates and what recall found out about the user."""

    query: RecommendQuery
    scene: Scene
    loaded: Loaded[ServingModel]
    deadline: Deadline
    candidates: _Candidates
    degraded: list[str] = field(default_factory=list)
    embedding: FloatArray | None = None
    history: UserHistory | None = None
    cold_start: bool = False
    ranked: _Candidates | None = None  # the ranked list before the final selection (for the cache)

    @property
    def model(self) -> ServingModel:
        return self.loaded.model


class GatewayEngine:
    """Runs a scene's pipeline (`Scene.pipeline`, e.g. recall → blocklist → rank → rerank),
    each stage a method named in `_STAGES`, tracing and counting each."""

    def __init__(
        self,
        versions: ModelVersions[ServingModel],
        features: FeatureStore,
        recall: RecallClient,
        rank: RankClient,
        scenes: Mapping[str, Scene],
        experiments: ExperimentConfig,
        blocklist: Blocklist,
        metrics: GatewayMetrics,
        limits: GatewayLimits | None = None,
        *,
        catalogue: CatalogueWatcher | None = None,
    ) -> None:
        self._versions = versions
        self.catalogue = catalogue
        self._features = features
        self.recall_client = recall
        self.rank_client = rank
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
        self._stage_timers: dict[str, Any] = {}
        self.tracing: Tracing | None = None  # set when tracing is on (GatewayApp.attach_tracing)
        self._stages: dict[str, Callable[[_Request], Awaitable[None]]] = {
            "recall": self._recall_stage,
            "blocklist": self._blocklist_stage,
            "rank": self._rank_stage,
            "rerank": self._rerank_stage,
        }

    def _stage_timer(self, stage: str) -> Any:
        timer = self._stage_timers.get(stage)
        if timer is None:  # labels() per call costs a lock and a key: look each up once
            timer = self._stage_timers[stage] = self._metrics.stage_seconds.labels(stage)
        return timer

    def _new_items(self, request: _Request) -> NewItems | None:
        """The live catalogue on the request's version; None (nothing to do) when it is empty."""
        return None if self.catalogue is None else self.catalogue.view(request.loaded.version)

    def new_item_horizon(self) -> float:
        """Seconds: the longest `new_items.max_age` of the scenes and experiment arms with
        new-item traffic on (0 when none is), i.e. which items' impressions the catalogue
        watcher polls."""
        scenes = [*self.scenes.values(), *self.experiments.variant_scenes()]
        return max((s.new_items.max_age_seconds for s in scenes if s.new_items.active), default=0.0)

    # -- the request --------------------------------------------------------------------
    async def recommend(self, query: RecommendQuery) -> RecommendResult:
        limits = self.limits
        if not query.user_id:
            raise InvalidArgument("user_id", "must not be empty")
        if len(query.exclude_item_ids) > limits.max_exclusions:
            raise InvalidArgument("exclude_item_ids", f"at most {limits.max_exclusions} items")
        base = scene_named(self.scenes, query.scene)
        most = min(limits.max_count, base.max_count)
        assignment = self.experiments.resolve(base, query.user_id)
        if query.count == 0:  # left out (gRPC, HTTP, CLI alike): the served scene's count.default
            query = dataclasses.replace(query, count=min(assignment.scene.default_count, most))
        elif not 0 < query.count <= most:
            raise InvalidArgument("count", f"must be in [1, {most}], got {query.count}")
        request = _Request(
            query,
            assignment.scene,
            self._versions.get(),
            Deadline.from_remaining(query.time_remaining, limits.default_deadline),
            _EMPTY,
        )
        trace: list[StageTrace] = []
        tracing = self.tracing
        scene_name = request.scene.name
        if tracing is not None:  # on the call's server span (gRPC or HTTP)
            tracing.current_span().set_attributes(
                {"recsys.scene": scene_name, "recsys.arm": assignment.arm, "recsys.count": query.count}
            )
        for name in request.scene.pipeline:
            before, started = len(request.candidates), time.perf_counter()
            with span_or_nothing(tracing, _STAGE_SPANS.get(name)) as span:
                await self._stages[name](request)
                if span is not None:
                    span.set_attributes(
                        {
                            "recsys.scene": scene_name,
                            "recsys.candidates_in": before,
                            "recsys.candidates_out": len(request.candidates),
                        }
                    )
            seconds = time.perf_counter() - started
            self._stage_timer(name).observe(seconds)
            detail = ",".join(request.degraded) if name == "recall" else ""
            detail = request.scene.rerank_method if name == "rerank" else detail
            trace.append(StageTrace(name, before, len(request.candidates), seconds * 1000, detail))
        if tracing is not None:
            tracing.current_span().set_attributes(
                {"recsys.model_version": request.loaded.version, "recsys.degraded": request.degraded}
            )
        if "rerank" not in request.scene.pipeline:  # the best `count` by score
            request.ranked = request.candidates
            best = np.argsort(-request.candidates.scores, kind="stable")[: query.count]
            request.candidates = request.candidates.take(np.asarray(best, dtype=np.intp))
        return self._answer(request, assignment.experiment, assignment.arm, trace)

    def _answer(
        self, request: _Request, experiment: str, arm: str, trace: list[StageTrace]
    ) -> RecommendResult:
        query, model, chosen = request.query, request.model, request.candidates
        catalogue = model.core.catalogue
        new_items = self._new_items(request)
        item_id = _namer(catalogue.item_ids, new_items)
        title = _namer(catalogue.titles, new_items, title=True)
        # Python lists first: indexing numpy arrays element by element costs more than the rest.
        scores, masks = chosen.scores.tolist(), chosen.masks.tolist()
        task_scores = {task: values.tolist() for task, values in chosen.task_scores.items()}
        items = [
            Recommended(
                item_id=item_id(item),
                title=title(item),
                score=scores[position],
                position=position + 1,
                channels=_channels(masks[position], chosen.channel_names),
                task_scores={task: values[position] for task, values in task_scores.items()},
            )
            for position, item in enumerate(chosen.items.tolist())
        ]
        degraded = request.degraded
        outcome = "degraded" if degraded else "full"
        self._metrics.recommendations.labels(request.scene.name, arm or "none", outcome).inc()
        self._metrics.items_returned.observe(len(items))
        for reason in degraded:
            self._metrics.degraded.labels(reason.split(":")[0]).inc()
        if not query.dry_run:
            shown = set(chosen.items.tolist())
            ranked = request.ranked or chosen
            rest = [
                (item, score)
                for item, score in zip(ranked.items.tolist(), ranked.scores.tolist(), strict=True)
                if item not in shown
            ][: self.limits.cache_items]
            unshown = [(item_id(item), score) for item, score in rest]
            new_shown: list[str] = []
            if new_items is not None and len(chosen):
                # New by the served scene's max_age (whether its traffic control is on or not,
                # so that the arms of a cold-start experiment count the same items).
                fresh = new_items.upserted_within(
                    chosen.items, request.scene.new_items.max_age_seconds, time.time()
                )
                new_shown = [items[position].item_id for position in np.flatnonzero(fresh).tolist()]
                if new_shown:
                    self._metrics.new_item_impressions.labels(request.scene.name, arm or "none").inc(
                        len(new_shown)
                    )
            now = query.request_time or time.time()
            self.recorder.submit(
                AnswerWrites(query.user_id, [item.item_id for item in items], unshown, now, new_shown)
            )
        return RecommendResult(
            items,
            request.loaded.version,
            scene_named(self.scenes, query.scene).name,
            experiment,
            arm,
            degraded,
            request.cold_start,
            trace if query.debug else [],
        )

    # -- stages (each reads and updates the request) --------------------------------------
    async def _recall_stage(self, request: _Request) -> None:
        """Candidates from recall on the request's version. Recall without that version → once
        more on recall's own (if the gateway has it too); recall down, slow or refused →
        the version's popular list."""
        query, model = request.query, request.model
        # Blocked items are not sent: recall applies the blocklist itself (per model version,
        # reloaded when it changes); the gateway's filter after rank is the backstop.
        exclude = [model.item_lookup[item] for item in query.exclude_item_ids if item in model.item_lookup]
        new_items = self._new_items(request)
        if new_items is not None:
            exclude += [new_items.index_of[i] for i in query.exclude_item_ids if i in new_items.index_of]
        call = RecallCall(
            user_id=query.user_id,
            context=RequestContext(query.region, query.request_time),
            quotas=request.scene.quotas,
            exclude=exclude,
            model_version=request.loaded.version,
            max_candidates=request.scene.recall_candidates,
            dry_run=query.dry_run,
            # Recall makes the ranker's first cut when rank is next: 200 candidates cross two
            # hops instead of 1,000 (rank cuts again only if a recall without it sent more).
            prerank_keep=request.scene.prerank_keep if "rank" in request.scene.pipeline else 0,
        )
        budget = request.deadline.budget(self.limits.margin * 3)
        try:
            try:
                recalled = await self.recall_client.recall(call, budget)
            except VersionMismatch:
                # Recall no longer (or not yet) has our version: once more on its current one,
                # if we have that one too (its indexes must mean the same items to us).
                retry = dataclasses.replace(call, model_version="", exclude=())
                recalled = await self.recall_client.recall(
                    retry, request.deadline.budget(self.limits.margin * 3)
                )
                request.loaded = self._versions.get(recalled.model_version)  # WrongModelVersion → below
                request.degraded.append("version_retry")
                self._take_recalled(request, recalled, drop_excluded=True)
                self._keep_servable(request)
                return
        except DownstreamError as error:
            request.degraded.append(f"recall_{error.reason.replace(' ', '_')}")
        except Exception as error:
            if isinstance(error, RecsysError) and not isinstance(error, WrongModelVersion):
                raise  # Overloaded: the caller gets RESOURCE_EXHAUSTED
            log.warning("recall answer unusable", extra={"error": repr(error)})
            request.degraded.append("recall_version_unavailable")
        else:
            self._take_recalled(request, recalled, drop_excluded=False)
            self._keep_servable(request)
            return
        request.candidates = self._fallback(request.model, query, self._new_items(request))
        request.cold_start = request.model.user_lookup.get(query.user_id) is None

    @staticmethod
    def _take_recalled(request: _Request, recalled: Recalled, *, drop_excluded: bool) -> None:
        candidates = _Candidates(
            recalled.items,
            recalled.scores,
            recalled.masks,
            recalled.channel_names,
            provenance=recalled.provenance,
        )
        if drop_excluded:  # recall did not get the request's exclusions (other version's indexes)
            model = request.model
            excluded = [
                model.item_lookup[i] for i in request.query.exclude_item_ids if i in model.item_lookup
            ]
            if excluded:
                keep = ~np.isin(candidates.items, np.asarray(excluded, dtype=np.int32))
                candidates = candidates.take(np.flatnonzero(keep))
        request.candidates = candidates
        request.embedding = recalled.embedding
        request.history = recalled.history
        request.cold_start = recalled.cold_start
        request.degraded.extend(recalled.degraded)

    def _keep_servable(self, request: _Request) -> None:
        """Drop candidates this process may not serve: withdrawn items, and new items it has
        not polled yet (recall may poll the live catalogue a moment before the gateway does:
        an index it cannot name is not shown). Without a live catalogue, one comparison."""
        candidates = request.candidates
        if len(candidates) == 0:
            return
        new_items = self._new_items(request)
        if new_items is not None:
            keep = new_items.servable_mask(candidates.items)
        elif int(candidates.items.max()) >= request.model.core.catalogue.n_items:
            keep = candidates.items < request.model.core.catalogue.n_items
        else:
            return
        removed = int(len(candidates) - np.count_nonzero(keep))
        if removed:
            self._metrics.filtered.labels("catalogue").inc(removed)
            request.candidates = candidates.take(np.flatnonzero(keep))

    def _fallback(
        self, model: ServingModel, query: RecommendQuery, new_items: NewItems | None = None
    ) -> _Candidates:
        """The version's global popular list minus the user's consumed items (as the version
        knows them), the request's exclusions and withdrawn items: useful, cheap and needing
        no dependency."""
        top = np.asarray(model.core.popularity.global_top[: self.limits.fallback_items], dtype=np.int32)
        drop = {model.item_lookup[item] for item in query.exclude_item_ids if item in model.item_lookup}
        if new_items is not None:
            drop.update(new_items.withdrawn.tolist())
        user = model.user_lookup.get(query.user_id)
        if user is not None:
            drop.update(np.asarray(model.core.history.items.row(user)).tolist())
        if drop:
            top = top[~np.isin(top, np.fromiter(drop, dtype=np.int32, count=len(drop)))]
        scores = np.asarray(model.core.popularity.global_scores, dtype=np.float32)[top]
        return _Candidates(top, scores, np.zeros(top.shape[0], np.uint64), FALLBACK_CHANNELS)

    def _blocklist_filter(self, loaded: Loaded[ServingModel]) -> BlocklistFilter:
        stage = self._blocklist_filters.get(loaded.version)
        if stage is None:
            stage = BlocklistFilter.for_version(self.blocklist, loaded.model.item_lookup)
            # Kept for the versions still servable (current and, in its grace, previous) only.
            servable = set(self._versions.available())
            kept = {version: f for version, f in self._blocklist_filters.items() if version in servable}
            self._blocklist_filters = {**kept, loaded.version: stage}
        return stage

    async def _blocklist_stage(self, request: _Request) -> None:
        candidates = request.candidates
        if len(self.blocklist) == 0 or len(candidates) == 0:
            return
        stage = self._blocklist_filter(request.loaded)
        keep = not_excluded(candidates.items, stage.blocked)  # the stage's own binary search
        removed = int(len(candidates) - keep.sum())
        if removed:
            self._metrics.filtered.labels(stage.identifier).inc(removed)
            request.candidates = candidates.take(np.flatnonzero(keep))

    async def _rank_stage(self, request: _Request) -> None:
        """Rank's scores, best first; rank down, slow or refused → pre-rank order."""
        candidates, query, scene = request.candidates, request.query, request.scene
        if len(candidates) == 0 or candidates.is_fallback:
            return
        call = RankCall(
            user_id=query.user_id,
            model_version=request.loaded.version,
            scene=query.scene or "default",
            items=candidates.items,
            context=RequestContext(query.region, query.request_time),
            fusion=scene.fusion,
            prerank_keep=scene.prerank_keep,
            embedding=request.embedding,
            history=request.history,
            provenance=candidates.provenance,
        )
        try:
            ranked = await self.rank_client.rank(call, request.deadline.budget(self.limits.margin))
        except DownstreamError as error:
            request.degraded.append(f"rank_{error.reason.replace(' ', '_')}")
            request.candidates = self._without_ranker(
                request.model, scene, candidates, request.embedding, request.degraded
            )
            return
        request.degraded.extend(ranked.degraded)
        # Ranked: the provenance has served its purpose; later stages need not copy it along.
        candidates.provenance = None
        result = candidates.take(ranked.positions)
        result.scores = ranked.scores
        result.task_scores = ranked.task_scores
        request.candidates = result.take(np.argsort(-result.scores, kind="stable"))

    @staticmethod
    def _without_ranker(
        model: ServingModel,
        scene: Scene,
        candidates: _Candidates,
        embedding: FloatArray | None,
        degraded: list[str],
    ) -> _Candidates:
        """Rank is unavailable: pre-rank order (the stage rank itself runs first), or recall's
        merged order without a user embedding or when pre-rank's scores are not finite."""
        if embedding is None:
            return candidates
        keep = min(scene.prerank_keep or len(candidates), len(candidates))
        cut = EmbeddingPreRanker(model.item_embeddings).select(
            candidates.items.astype(np.int64), embedding, keep
        )
        if not np.isfinite(cut.scores).all():
            degraded.append("prerank_nonfinite_scores")
            return candidates
        result = candidates.take(cut.positions)
        result.scores = cut.scores
        return result

    async def _rerank_stage(self, request: _Request) -> None:
        ranked, model = request.candidates, request.model
        request.ranked = ranked
        if len(ranked) == 0:
            return
        if not np.isfinite(ranked.scores).all():
            # Whatever produced them (recall's merge, a cache entry), the selectors refuse
            # non-finite rewards: keep the order, replace the scores by a decreasing ramp.
            ranked.scores = np.linspace(1.0, 0.0, num=len(ranked), dtype=np.float32)
            request.degraded.append("nonfinite_scores")
        catalogue = model.core.catalogue
        new_items = self._new_items(request)
        if new_items is None:
            embeddings = np.asarray(model.item_embeddings[ranked.items], dtype=np.float32)
            categories = np.asarray(catalogue.categories[ranked.items])
            authors = np.asarray(catalogue.authors[ranked.items])
        else:
            # New items have no embedding yet (zeros: similar to nothing) but their metadata's
            # categories and author, so the diversity rules hold for them too.
            embeddings = new_items.gather(np.asarray(model.item_embeddings), None, ranked.items)
            embeddings = embeddings.astype(np.float32, copy=False)
            categories = new_items.gather(
                np.asarray(catalogue.categories), new_items.categories, ranked.items
            )
            authors = new_items.gather(np.asarray(catalogue.authors), new_items.authors, ranked.items)
        positions = request.scene.selector().select(
            ranked.items,
            ranked.scores,
            embeddings,
            categories,
            authors,
            request.query.count,
            self._new_candidates(request, new_items, ranked.items),
        )
        request.candidates = ranked.take(np.asarray(positions, dtype=np.intp))

    def _new_candidates(
        self, request: _Request, new_items: NewItems | None, items: IntArray
    ) -> NewCandidates | None:
        """The candidates the scene's new-item traffic control boosts, caps and reserves
        (None: it is off, or there are none), with their impressions as last polled."""
        traffic = request.scene.new_items
        if new_items is None or self.catalogue is None or not traffic.active:
            return None
        # Wall-clock age: a request's own time (a replay's, a client's clock) does not make
        # an item new.
        fresh = new_items.upserted_within(items, traffic.max_age_seconds, time.time())
        if not fresh.any():
            return None
        impressions = np.where(fresh, self.catalogue.impressions(np.asarray(items) - new_items.base), 0)
        return NewCandidates(traffic, fresh, impressions)

    async def drain(self) -> None:
        """Finish the writes of answers already given (at shutdown)."""
        await self.recorder.drain()


_EMPTY = _Candidates(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.uint64), ())


def _namer(
    values: npt.NDArray[Any], new_items: NewItems | None, *, title: bool = False
) -> Callable[[int], str]:
    """index → the version's id (or title), or a new item's from the live catalogue."""
    if new_items is None:
        return lambda index: str(values[index])
    base = new_items.base
    new = new_items.title if title else new_items.item_id
    return lambda index: str(values[index]) if index < base else new(index)


def _channels(mask: int, names: tuple[str, ...]) -> list[str]:
    return [name for bit, name in enumerate(names) if mask >> bit & 1]
