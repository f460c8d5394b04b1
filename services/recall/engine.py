"""The recall service's business logic: every channel concurrently under its own deadline,
fail-open, then exposure filtering, merging and de-duplication. No gRPC here.

The channels' math is `recsys.stages` (the code offline evaluation runs); this module only
schedules it. Channel work is CPU-bound numpy/onnxruntime/hnswlib, so it runs in a small
thread pool, never on the event loop; the cache channel is a feature-store read and runs on
the loop. Every channel has its own deadline (bounded by the request's): one that misses it is
reported as a timeout and the answer goes out without it (its thread finishes in the
background).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.blocklist import Blocklist, VersionBlocklists
from recsys.catalogue import CatalogueWatcher, NewItems
from recsys.content import live_two_tower_source
from recsys.errors import DeadlineExpired, InvalidArgument, ModelOutputInvalid
from recsys.feature_store import FeatureStore, UserState
from recsys.feature_store.snapshot_loss import with_version_snapshot
from recsys.serving_model import ALL_CHANNELS, ServingModel
from recsys.stages.filters import ExposureFilter
from recsys.stages.merge import MergedCandidates, WeightedMerge
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.query import UserHistory, UserQuery, build_query
from recsys.stages.sources import Candidates, CandidateSource, top_candidates
from services.common.metrics import EXPIRED_WORK
from services.common.tracing import Tracing, span_or_nothing
from services.common.versions import ModelVersions
from services.recall.look_alike import LookAlikeIndex
from services.recall.metrics import RecallMetrics

log = logging.getLogger("recsys.recall")

COLD_START_CHANNELS = ("geo", "popular")
# Channels from the live catalogue (items upserted while serving): they keep their own quota
# for cold-start users too, since a new item reaches no one else.
LIVE_CHANNELS = ("new_items",)


@dataclass(frozen=True)
class ChannelKind:
    """How the engine runs a channel, declared once per channel instead of branching on names
    along the request path:
    - `on_loop`: a feature-store read, awaited on the event loop (cache); otherwise CPU work
      (numpy, onnxruntime, hnswlib) in the channel threads;
    - `from_model`: the model version provides it (skipped when the version lacks it);
    - `needs_state`: it reads the user's feature-store state (skipped without it);
    - `first`: started before the other thread channels (the longest one);
    - `embeds`: it computes the user embedding (the user tower), which recall returns;
    - `live`: it serves the live catalogue (skipped while it has no source: no new item, or
      for look_alike no new item anyone engaged with)."""

    on_loop: bool = False
    from_model: bool = True
    needs_state: bool = False
    first: bool = False
    embeds: bool = False
    live: bool = False


CHANNEL_KINDS: Mapping[str, ChannelKind] = {
    "two_tower": ChannelKind(first=True, embeds=True),  # ONNX user tower + ANN: the longest
    "cache": ChannelKind(on_loop=True, from_model=False, needs_state=True),
    "new_items": ChannelKind(from_model=False, live=True),
    # New items by the user embedding (the two-tower channel's, computed once per request).
    "look_alike": ChannelKind(from_model=False, embeds=True, live=True),
}
THREAD_CHANNEL = ChannelKind()


@dataclass(frozen=True)
class RecallLimits:
    max_quota: int = 1000
    max_candidates: int = 1000
    default_candidates: int = 500
    max_exclusions: int = 10_000
    channel_timeout: float = 0.05  # seconds a channel may take at most, unless it has its own
    channel_timeouts: Mapping[str, float] = field(default_factory=dict)  # per channel, seconds
    workers: int = 2  # threads one request's CPU channels share (see _run_worker)
    deadline_margin: float = 0.005  # kept for merging and answering
    default_deadline: float = 0.2  # when the caller sets none
    cold_start_quota: int = 200
    exposure_overfetch: float = 1.5  # a channel fetches this × its quota before exposure filtering
    new_items_quota: int = 50  # the new_items channel's quota unless the call sets one
    look_alike_quota: int = 50  # the look_alike channel's quota unless the call sets one

    def __post_init__(self) -> None:
        unknown = sorted(set(self.channel_timeouts) - set(ALL_CHANNELS))
        if unknown:
            raise ValueError(
                f"channel_timeouts: unknown channels {unknown} (known: {', '.join(ALL_CHANNELS)})"
            )

    def timeout_for(self, channel: str) -> float:
        return self.channel_timeouts.get(channel, self.channel_timeout)


@dataclass(frozen=True)
class RecallQuery:
    user_id: str
    region: str = ""
    now: float = 0.0
    quotas: Mapping[str, int] = field(default_factory=dict)
    exclude: IntArray = field(default_factory=lambda: np.zeros(0, np.int32))
    model_version: str = ""
    max_candidates: int = 0
    time_remaining: float | None = None
    dry_run: bool = False  # no side effects: cached items are read, their reuses not used up
    prerank_keep: int = 0  # > 0: answer only the pre-rank's cut of the merged candidates


@dataclass
class ChannelOutcome:
    channel: str
    status: str  # ok | timeout | error | skipped
    count: int = 0
    milliseconds: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class ChannelRun:
    candidates: Candidates
    embedding: FloatArray | None
    milliseconds: float
    error: Exception | None = None
    late: bool = False  # finished after its own deadline: dropped like a timeout
    started: float = 0.0  # time.perf_counter() when it started (its span, with tracing on)


@dataclass
class RecallResult:
    model_version: str
    merged: MergedCandidates
    stats: list[ChannelOutcome]
    embedding: FloatArray | None
    cold_start: bool
    degraded: list[str]
    # The user's history as read from the feature store (its tail the ranker uses), passed on
    # so that rank does not read it again; None when the feature store could not be read.
    history: UserHistory | None = None


def validate_quotas(quotas: Mapping[str, int], limits: RecallLimits) -> None:
    for name, value in quotas.items():
        if name not in ALL_CHANNELS:
            raise InvalidArgument(f"quotas[{name}]", f"unknown channel (known: {', '.join(ALL_CHANNELS)})")
        if value < 0:
            raise InvalidArgument(f"quotas[{name}]", f"must be >= 0, got {value}")
        if value > limits.max_quota:
            raise InvalidArgument(f"quotas[{name}]", f"at most {limits.max_quota}, got {value}")


class RecallEngine:
    def __init__(
        self,
        versions: ModelVersions[ServingModel],
        features: FeatureStore,
        executor: Executor,
        metrics: RecallMetrics,
        limits: RecallLimits | None = None,
        blocklists: VersionBlocklists | None = None,
        catalogue: CatalogueWatcher | None = None,
        look_alike: LookAlikeIndex | None = None,
    ) -> None:
        self._versions = versions
        self.catalogue = catalogue
        self.look_alike = look_alike
        self.blocklists = blocklists or VersionBlocklists(Blocklist.of(()))
        self._features = features
        self._executor = executor
        self._metrics = metrics
        self.limits = limits or RecallLimits()
        # Test hook and operations knob: extra seconds a channel sleeps (to exercise deadlines).
        self.channel_delays: dict[str, float] = {}
        self.tracing: Tracing | None = None  # set when tracing is on (RecallApp.attach_tracing)

    async def recall(self, query: RecallQuery) -> RecallResult:
        limits = self.limits
        if not query.user_id:
            raise InvalidArgument("user_id", "must not be empty")
        validate_quotas(query.quotas, limits)
        if query.max_candidates < 0 or query.max_candidates > limits.max_candidates:
            raise InvalidArgument("max_candidates", f"must be in [0, {limits.max_candidates}]")
        if query.prerank_keep < 0 or query.prerank_keep > limits.max_candidates:
            raise InvalidArgument("prerank_keep", f"must be in [0, {limits.max_candidates}]")
        if query.exclude.shape[0] > limits.max_exclusions:
            raise InvalidArgument("exclude_item_indexes", f"at most {limits.max_exclusions} items")
        loaded = self._versions.get(query.model_version)
        model = loaded.model
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = query.time_remaining if query.time_remaining is not None else limits.default_deadline
        deadline = started + max(0.0, budget - limits.deadline_margin)
        now = query.now or time.time()
        degraded: list[str] = []
        self._check_deadline(started + budget, "user_state")
        tracing = self.tracing

        state = await self._user_state(loaded.version, query.user_id, now, deadline, degraded)
        # The read may have used the call's time up: then no channel starts.
        self._check_deadline(deadline, "channels")
        if state is not None and loaded is self._versions.current and not self._versions.snapshot_ready:
            # The version's features are gone from the feature store (until re-pushed): its
            # own data stands in for each user's snapshot, and the answer says so (the
            # history recall returns, and rank scores from, carries the same substitute).
            degraded.append("feature_snapshot_missing")
            state = with_version_snapshot(state, model.core, model.user_lookup.get(query.user_id, -1))
        history = (
            None
            if state is None
            else UserHistory.from_state(state, model.item_lookup, model.core.like_threshold)
        )
        new_items = None if self.catalogue is None else self.catalogue.view(loaded.version)
        live_sources = self._live_sources(loaded.version, new_items)
        user_query = self._query(model, query, history, _live_exclusions(new_items, state))
        cold_start = user_query.cold_start
        quotas = self._quotas(model, query, cold_start)

        outcomes: dict[str, ChannelOutcome] = {}
        lists: dict[str, Candidates] = {}
        embedding: FloatArray | None = None
        runnable: list[str] = []
        for name in ALL_CHANNELS:
            quota = quotas.get(name, 0)
            kind = CHANNEL_KINDS.get(name, THREAD_CHANNEL)
            if kind.from_model and name not in model.channels:
                outcomes[name] = ChannelOutcome(name, "skipped", detail="not supported by this model version")
            elif quota <= 0:
                outcomes[name] = ChannelOutcome(name, "skipped", detail="quota 0")
            elif kind.needs_state and state is None:
                outcomes[name] = ChannelOutcome(name, "skipped", detail="feature store unavailable")
            elif kind.live and name not in live_sources:
                outcomes[name] = ChannelOutcome(name, "skipped", detail="no new items")
            else:
                runnable.append(name)
        results: dict[str, ChannelRun] = {}
        channels_started = time.perf_counter()
        remaining = max(0.0, deadline - loop.time())
        now_monotonic = time.monotonic()
        stop_at = {name: now_monotonic + min(limits.timeout_for(name), remaining) for name in runnable}
        wait = max((stop - now_monotonic for stop in stop_at.values()), default=0.0)
        cpu = [name for name in runnable if not CHANNEL_KINDS.get(name, THREAD_CHANNEL).on_loop]
        # The longest first, so that it runs while the others do.
        queue = deque(sorted(cpu, key=lambda name: not CHANNEL_KINDS.get(name, THREAD_CHANNEL).first))
        shared_embedding = _SharedEmbedding()  # one user-tower run for every channel that needs it
        jobs: list[asyncio.Future[None]] = [
            loop.run_in_executor(
                self._executor,
                self._run_worker,
                queue,
                model,
                user_query,
                quotas,
                results,
                stop_at,
                live_sources,
                shared_embedding,
                new_items,
            )
            for _ in range(min(limits.workers, len(cpu)))
        ]
        for name in runnable:
            if CHANNEL_KINDS.get(name, THREAD_CHANNEL).on_loop:  # the cache: the only loop channel
                jobs.append(
                    asyncio.ensure_future(
                        self._cache(model, query, user_query, state, quotas, results, stop_at)
                    )
                )
        try:
            if jobs:
                await asyncio.wait(jobs, timeout=wait)
        finally:
            # Answered (or the caller went away): channels not yet started never start.
            queue.clear()
        for name in runnable:
            run = results.get(name)  # written by a worker thread; a dict store is atomic
            if run is None or run.late:
                outcomes[name] = ChannelOutcome(
                    name, "timeout", milliseconds=limits.timeout_for(name) * 1000, detail="deadline"
                )
                degraded.append(f"channel_timeout:{name}")
                self._metrics.outcome[name, "timeout"].inc()
            elif run.error is not None:
                log.warning("channel failed", extra={"channel": name, "error": repr(run.error)})
                outcomes[name] = ChannelOutcome(
                    name, "error", milliseconds=run.milliseconds, detail=type(run.error).__name__
                )
                degraded.append(f"channel_error:{name}")
                self._metrics.outcome[name, "error"].inc()
            else:
                if run.embedding is not None:
                    embedding = run.embedding
                lists[name] = run.candidates
                outcomes[name] = ChannelOutcome(name, "ok", milliseconds=run.milliseconds)
                self._metrics.channel_timer[name].observe(run.milliseconds / 1000)
        if len(self.blocklists.blocklist):
            # On each channel's over-fetched list, before its quota is cut, so that blocked
            # items never take a quota's place; one binary search per candidate.
            blocked = self.blocklists.for_version(
                loaded.version, model.item_lookup, self._versions.available()
            )
            for name, candidates in lists.items():
                filtered = blocked.apply(candidates)
                self._metrics.blocklist_filtered[name].inc(filtered.removed)
                lists[name] = filtered.kept
            if new_items is not None:
                # The version's blocked indexes know only its own items: new ones (from the
                # live channels, and two_tower's live index) by their ids.
                blocklist = self.blocklists.blocklist
                for name in [name for name in ("two_tower", *live_sources) if name in lists]:
                    candidates = lists[name]
                    new = candidates.items >= new_items.base
                    if not new.any():
                        continue  # the version's own items: filtered above
                    keep = ~new
                    keep[new] = [
                        new_items.item_id(item) not in blocklist for item in candidates.items[new].tolist()
                    ]
                    self._metrics.blocklist_filtered[name].inc(int(len(candidates) - keep.sum()))
                    lists[name] = Candidates(candidates.items[keep], candidates.scores[keep])
        if state is not None and state.exposure_filter is not None:
            digests = model.item_digests
            if new_items is not None and new_items.exposure_digests is not None:
                digests = new_items.exposure_digests  # the version's, then the new items'
            exposure = ExposureFilter(state.exposure_filter, digests)
            if exposure.active:
                with span_or_nothing(tracing, "recall.exposure_filter") as span:
                    removed = 0
                    for name, candidates in lists.items():
                        filtered = exposure.apply(candidates)
                        self._metrics.exposure_filtered[name].inc(filtered.removed)
                        lists[name] = filtered.kept
                        removed += filtered.removed
                    if span is not None:
                        span.set_attribute("recsys.removed", removed)
        for name, candidates in lists.items():
            kept = Candidates(candidates.items[: quotas[name]], candidates.scores[: quotas[name]])
            lists[name] = kept
            outcome = outcomes.get(name) or ChannelOutcome(name, "ok")
            outcome.count = len(kept)
            outcomes[name] = outcome
            self._metrics.outcome[name, "ok"].inc()
            self._metrics.channel_count[name].observe(len(kept))
        if tracing is not None and tracing.current_span().is_recording():  # sampled
            self._trace_channels(tracing, runnable, results, outcomes, channels_started)
        merge = WeightedMerge(ALL_CHANNELS, self._weights(model, cold_start))
        budget_items = query.max_candidates or limits.default_candidates
        with span_or_nothing(tracing, "recall.merge") as span:
            merged = merge.merge(lists, budget_items)
            if span is not None:
                span.set_attributes(
                    {"recsys.channels": len(lists), "recsys.candidates_out": int(merged.items.shape[0])}
                )
        if 0 < query.prerank_keep < len(merged) and embedding is not None:
            # The ranker's first cut, made here: 200 candidates cross the gateway to rank
            # instead of 1,000 (measured: ~0.6 ms of CPU per answer over the hops).
            with span_or_nothing(tracing, "recall.prerank") as span:
                fresh = None if new_items is None else new_items.is_new(merged.items)
                cut = EmbeddingPreRanker(model.item_embeddings).keep_positions(
                    merged.items.astype(np.int64), embedding, query.prerank_keep, fresh
                )
                self._metrics.prerank_in.inc(len(merged))
                self._metrics.prerank_kept.inc(cut.shape[0])
                if span is not None:
                    span.set_attributes(
                        {"recsys.candidates_in": len(merged), "recsys.candidates_out": int(cut.shape[0])}
                    )
                merged = merged.take(cut)
        if tracing is not None:
            tracing.current_span().set_attributes(
                {"recsys.model_version": loaded.version, "recsys.cold_start": cold_start}
            )
        if cold_start:
            self._metrics.cold_start.inc()
        stats = [outcomes[name] for name in ALL_CHANNELS]
        ranker_history = None if history is None else history.last(model.spec.history_length)
        return RecallResult(loaded.version, merged, stats, embedding, cold_start, degraded, ranker_history)

    # -- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _trace_channels(
        tracing: Tracing,
        runnable: list[str],
        results: Mapping[str, ChannelRun],
        outcomes: Mapping[str, ChannelOutcome],
        channels_started: float,
    ) -> None:
        """One span per channel that ran, recorded now from its own timings: the channels ran
        in worker threads, where the call's span is not current. A channel with no result
        (timed out) gets a span from the start of the channels to now, marked as an error."""
        now = time.perf_counter()
        for name in runnable:
            run, outcome = results.get(name), outcomes[name]
            attributes = {
                "recsys.channel": name,
                "recsys.channel.outcome": outcome.status,
                "recsys.channel.candidates": outcome.count,
            }
            if run is None:
                tracing.record_span(
                    f"recall.channel {name}", channels_started, now, attributes, error="timeout"
                )
                continue
            error = "timeout" if run.late else None if run.error is None else type(run.error).__name__
            finished = run.started + run.milliseconds / 1000
            tracing.record_span(f"recall.channel {name}", run.started, finished, attributes, error=error)

    @staticmethod
    def _check_deadline(at: float, stage: str) -> None:
        if asyncio.get_running_loop().time() >= at:
            EXPIRED_WORK.labels("recall", stage).inc()
            raise DeadlineExpired(f"the call's deadline passed before {stage}")

    async def _user_state(
        self, version: str, user_id: str, now: float, deadline: float, degraded: list[str]
    ) -> UserState | None:
        try:
            # The read's budget is the feature store's own timeout (RECSYS_RECALL_
            # FEATURE_STORE_TIMEOUT_MS, given to it at wiring); only a call deadline that
            # is nearer than that cuts the wait shorter (the read itself is not cut off).
            async with asyncio.timeout_at(deadline):
                return await self._features.user_state(version, user_id, now=now)
        except Exception as error:  # Redis down or slow: serve from what needs no Redis
            self._metrics.feature_store_errors.labels(type(error).__name__).inc()
            log.warning("feature store unavailable; serving without it", extra={"error": repr(error)})
            degraded.extend(["feature_store_unavailable", "exposure_filter_unavailable"])
            return None

    def _query(
        self,
        model: ServingModel,
        query: RecallQuery,
        history: UserHistory | None,
        live_excluded: IntArray | None = None,
    ) -> UserQuery:
        """The user's query: from the feature store's snapshot plus live events (for an id the
        version does not know, the live events alone: a real user, not a cold start, once
        they name a known item), or, without the feature store, from the profile the model
        version itself has (None history)."""
        user_index = model.user_lookup.get(query.user_id, -1)
        region = model.region_lookup.get(query.region, 0) if query.region else None
        items: IntArray | None = None
        liked: npt.NDArray[np.bool_] | None = None
        if history is not None:
            items, liked = history.items, history.liked
            if region is None and history.region > 0:
                region = history.region
        return build_query(
            model.core,
            user_index,
            recent_limit=model.defaults.recent_items,
            region_token=region,
            extra_excluded=query.exclude.astype(np.int64)
            if live_excluded is None
            else np.concatenate([query.exclude.astype(np.int64), live_excluded.astype(np.int64)]),
            history_items=items,
            history_liked=liked,
        )

    def _quotas(self, model: ServingModel, query: RecallQuery, cold_start: bool) -> dict[str, int]:
        defaults = dict(model.defaults.channel_quotas)
        defaults.setdefault("cache", 50)
        defaults.setdefault("new_items", self.limits.new_items_quota)
        defaults.setdefault("look_alike", self.limits.look_alike_quota)
        if cold_start:
            # Personalised channels have nothing to start from: geo and popular answer (and
            # the newest items, which reach no one otherwise).
            defaults = {
                name: (
                    max(defaults.get(name, 0), self.limits.cold_start_quota)
                    if name in COLD_START_CHANNELS
                    else defaults.get(name, 0)
                    if name in LIVE_CHANNELS
                    else 0
                )
                for name in ALL_CHANNELS
            }
        return {name: int(query.quotas.get(name, defaults.get(name, 0))) for name in ALL_CHANNELS}

    @staticmethod
    def _weights(model: ServingModel, cold_start: bool) -> dict[str, float]:
        weights = dict(model.defaults.channel_weights)
        weights.setdefault("cache", 1.0)
        # The build tuned no weight for new items (they did not exist): as much as a channel's.
        weights.setdefault("new_items", 1.0)
        weights.setdefault("look_alike", 1.0)
        if cold_start:
            weights = dict.fromkeys((*COLD_START_CHANNELS, *LIVE_CHANNELS), 1.0)
        # A channel the tuned defaults switched off still counts when a caller asks for it.
        return {name: weights.get(name) or 0.25 for name in ALL_CHANNELS}

    def _run_worker(
        self,
        queue: deque[str],
        model: ServingModel,
        query: UserQuery,
        quotas: Mapping[str, int],
        results: dict[str, ChannelRun],
        stop_at: Mapping[str, float],
        live_sources: Mapping[str, CandidateSource] | None = None,
        embedding: _SharedEmbedding | None = None,
        new_items: NewItems | None = None,
    ) -> None:
        """Take channels off the request's queue and run them one after another in this
        worker thread, publishing each result as soon as it is ready. A channel past its own
        deadline is not started; one that finishes late is marked late and dropped.

        A few workers per request share the queue rather than one thread job per channel: on
        a one-core worker process the thread hops, not the numpy work, dominated (2.2 ms of
        4.4 ms per request, measured). Sharing a queue, a slow channel holds up only its own
        worker; the others drain the rest."""
        while True:
            try:
                name = queue.popleft()  # deque.popleft is atomic: no lock between workers
            except IndexError:
                return
            if time.monotonic() >= stop_at[name]:
                continue  # past its deadline: reported as a timeout, not started
            started = time.perf_counter()
            try:
                delay = self.channel_delays.get(name, 0.0)
                if delay:
                    time.sleep(delay)
                fetch = self._fetch(quotas[name])
                vector: FloatArray | None = None
                kind = CHANNEL_KINDS.get(name, THREAD_CHANNEL)
                live = None if live_sources is None else live_sources.get(name)
                if kind.live:
                    assert live is not None  # the channel is skipped without one
                if kind.embeds:
                    source = live if kind.live else model.sources[name]
                    if (
                        name == "two_tower"
                        and new_items is not None
                        and new_items.two_tower_source is not None
                    ):
                        source = new_items.two_tower_source  # over the new items' embeddings too
                    assert source is not None
                    shared = embedding if embedding is not None else _SharedEmbedding()
                    candidates, vector = self._embedding_source(model, source, query, fetch, shared)
                elif live is not None:
                    candidates = live.candidates(query, fetch)
                else:
                    candidates = model.sources[name].candidates(query, fetch)
                late = time.monotonic() > stop_at[name]
                results[name] = ChannelRun(
                    candidates, vector, (time.perf_counter() - started) * 1000, late=late, started=started
                )
            except Exception as error:  # fail-open: the other channels still answer
                results[name] = ChannelRun(
                    Candidates.empty(),
                    None,
                    (time.perf_counter() - started) * 1000,
                    error=error,
                    started=started,
                )

    def _fetch(self, quota: int) -> int:
        return int(quota * self.limits.exposure_overfetch) + 10

    async def _cache(
        self,
        model: ServingModel,
        query: RecallQuery,
        user_query: UserQuery,
        state: UserState | None,
        quotas: Mapping[str, int],
        results: dict[str, ChannelRun],
        stop_at: Mapping[str, float],
    ) -> None:
        """Items ranked highly for this user earlier but not shown. Taking them uses one of
        each item's reuses (the feature store drops an item after its last use or when it is
        too old), so the cache never serves the same leftovers forever; a dry run reads the
        ones the user's state already holds instead."""
        started = time.perf_counter()
        try:
            delay = self.channel_delays.get("cache", 0.0)
            async with asyncio.timeout(max(0.0, stop_at["cache"] - time.monotonic())):
                if delay:
                    await asyncio.sleep(delay)
                if query.dry_run:
                    taken = list(state.cache_items[: self._fetch(quotas["cache"])]) if state else []
                else:
                    taken = await self._features.take_cache(
                        query.user_id, self._fetch(quotas["cache"]), query.now or time.time()
                    )
            new_items = None if self.catalogue is None else self.catalogue.view(model.version)
            if new_items is None:
                known = [(model.item_lookup.get(item, -1), score) for item, score in taken]
            else:  # cached new items too (withdrawn ones are in the query's exclusions)
                known = [(_index_or(new_items.index(item), -1), score) for item, score in taken]
            items = np.asarray([index for index, _ in known if index >= 0], dtype=np.int32)
            scores = np.asarray([score for index, score in known if index >= 0], dtype=np.float32)
            # Cache scores are ranker scores; shift so every kept item scores above zero.
            shifted = scores - scores.min() + 1e-3 if scores.size else scores
            candidates = top_candidates(items, shifted, self._fetch(quotas["cache"]), user_query.excluded)
            results["cache"] = ChannelRun(
                candidates, None, (time.perf_counter() - started) * 1000, started=started
            )
        except TimeoutError:
            return  # no result: reported as a timeout
        except Exception as error:  # fail-open
            self._metrics.feature_store_errors.labels(type(error).__name__).inc()
            results["cache"] = ChannelRun(
                Candidates.empty(), None, (time.perf_counter() - started) * 1000, error=error, started=started
            )

    def _live_sources(self, version: str, new_items: NewItems | None) -> dict[str, CandidateSource]:
        """The live channels that have something to serve for this version (none while the
        live catalogue is empty)."""
        sources: dict[str, CandidateSource] = {}
        if new_items is None:
            return sources
        if new_items.source is not None and len(new_items.source):
            sources["new_items"] = new_items.source
        look_alike = None if self.look_alike is None else self.look_alike.source(version)
        if look_alike is not None and len(look_alike):
            sources["look_alike"] = look_alike
        return sources

    @staticmethod
    def _embedding_source(
        model: ServingModel, source: CandidateSource, query: UserQuery, fetch: int, shared: _SharedEmbedding
    ) -> tuple[Candidates, FloatArray]:
        """A channel searching by the user embedding: the user tower first (once per request,
        whichever channel needs it first), then its source."""
        vector = shared.get(lambda: model.user_embeddings([model.user_inputs(query)])[0])
        if not np.isfinite(vector).all():
            # The channel fails (reported, the others answer); the vector never reaches rank.
            raise ModelOutputInvalid(f"version {model.version}: the user tower gave a non-finite embedding")
        with_vector = dataclasses.replace(query, embedding=vector)
        return source.candidates(with_vector, fetch), vector


class _SharedEmbedding:
    """One request's user embedding, computed by the first channel that needs it; a channel
    asking meanwhile waits for it rather than running the user tower a second time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vector: FloatArray | None = None

    def get(self, compute: Callable[[], FloatArray]) -> FloatArray:
        with self._lock:
            if self._vector is None:
                self._vector = compute()
            return self._vector


def _live_exclusions(new_items: NewItems | None, state: UserState | None) -> IntArray | None:
    """What the live catalogue adds to a user's exclusions: withdrawn items (the version's own
    included) and the new items the user consumed (their live events name them by id; the
    history the other channels read keeps the version's items only). None without one."""
    if new_items is None:
        return None
    consumed = [] if state is None else [new_items.index_of.get(item) for item in state.consumed_live_items()]
    mine = np.asarray([index for index in consumed if index is not None], dtype=np.int32)
    return np.concatenate([new_items.withdrawn, mine]) if mine.shape[0] else new_items.withdrawn


def prepare_new_items(model: ServingModel, new_items: NewItems) -> None:
    """What recall's requests read of a catalogue layout, built with it off the request path:
    the new_items channel, the exposure digests over the version's items and the new ones, and
    the two_tower channel over both (the new items embedded by the item tower). An item tower
    that fails leaves two_tower on the version's items alone (logged): the layout still serves."""
    new_items.source = new_items.new_item_source(np.asarray(model.core.catalogue.categories))
    new_items.exposure_digests = np.concatenate([model.item_digests, new_items.digests()])
    try:
        new_items.two_tower_source = live_two_tower_source(model, new_items)
    except Exception as error:
        log.warning(
            "embedding new items failed; two_tower serves the version's items only",
            extra={"version": model.version, "error": repr(error)},
        )
        new_items.two_tower_source = None


def _index_or(index: int | None, missing: int) -> int:
    return missing if index is None else index
