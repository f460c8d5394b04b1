"""The rank service's business logic: validate, pre-rank, hydrate the user's features, score
in a micro-batch, fuse. No gRPC here.

The math is shared with offline evaluation: features from `recsys.features` (through the
`ServingModel`), fusion from `recsys.stages.fusion`, pre-rank from `recsys.stages.prerank`.
The user's features come from the feature store (the version's snapshot plus live events,
as recall reads them); when it is down or slow the call is scored from the profile the
model version itself holds rather than refused. Item features are gathered from the
version's in-process arrays inside the batch, vectorised over every call in it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, Int64Array
from recsys.catalogue import CatalogueWatcher, NewItems
from recsys.errors import DeadlineExpired, InvalidArgument, ModelOutputInvalid
from recsys.feature_store import FeatureStore, UserState
from recsys.feature_store.snapshot_loss import with_version_snapshot
from recsys.features import Inputs, Provenance
from recsys.serving_model import ServingModel
from recsys.stages.fusion import Fusion
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.query import UserHistory, liked_mask
from services.common.metrics import EXPIRED_WORK
from services.common.tracing import Tracing, span_or_nothing
from services.common.versions import Loaded, ModelVersions
from services.rank.batcher import MicroBatcher
from services.rank.metrics import RankMetrics
from services.rank.scenes import FUSION_METHODS, SceneFusions
from services.rank.scorer import ScoreJob

log = logging.getLogger("recsys.rank")

EMPTY_FLOAT = np.zeros(0, np.float32)


@dataclass(frozen=True)
class RankLimits:
    max_candidates: int = 1000
    live_limit: int = 200  # live events read per user
    max_history: int = 1000  # entries a call's own user history may carry


@dataclass(frozen=True)
class FusionOverride:
    """A call's own fusion (an experiment arm): replaces the scene's; no method = the scene's."""

    method: str | None
    weights: Mapping[str, float] = field(default_factory=dict)
    exponents: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RankQuery:
    user_id: str
    items: Int64Array
    model_version: str = ""
    scene: str = ""
    region: str = ""
    now: float = 0.0  # unix seconds; 0: the server's clock
    fusion: FusionOverride | None = None
    prerank_keep: int = 0
    user_embedding: FloatArray | None = None  # recall's; None: the user tower computes it
    deadline: float | None = None  # time.monotonic() of the caller's deadline; None: none
    history: UserHistory | None = None  # recall's read of the user's state; None: read it here
    provenance: Provenance | None = None  # recall's, aligned with `items`; None: found by nothing


@dataclass(frozen=True)
class RankResult:
    model_version: str
    items: Int64Array  # request order (after pre-rank when asked for)
    scores: FloatArray
    task_scores: Mapping[str, FloatArray]
    unknown_items: int
    unknown_user: bool
    degraded: tuple[str, ...] = ()  # e.g. "feature_store_unavailable"


@dataclass(frozen=True)
class PreRankResult:
    model_version: str
    items: Int64Array  # best first
    scores: FloatArray


class UserFeatureHydrator:
    """A user's ranker inputs: history (the version snapshot, then live events, most recent
    last, as `UserHistory` holds it), liked flags, region and statistics. Without the feature
    store's state, the history the model version holds for the user."""

    identifier = "user_features"

    def inputs(self, model: ServingModel, user_id: str, region: str, history: UserHistory | None) -> Inputs:
        user_index = model.user_lookup.get(user_id, -1)
        region_token = model.region_lookup.get(region) if region else None
        threshold = model.core.like_threshold
        if history is not None:
            n_items = model.core.catalogue.n_items
            known = (history.items >= 0) & (history.items < n_items)  # a caller's indexes: check
            items = history.items[known].astype(np.int64)
            liked = history.liked[known]
            if region_token is None and history.region > 0:
                region_token = history.region
        elif 0 <= user_index < model.core.users.n_users:
            items = np.asarray(model.core.history.items.row(user_index), dtype=np.int64)
            liked = liked_mask(threshold, np.asarray(model.core.history.ratings.row(user_index)))
        else:
            items, liked = np.zeros(0, np.int64), np.zeros(0, bool)
        length = model.spec.history_length
        return model.user_features.inputs(user_index, items[-length:], liked[-length:], region_token)


def _check_deadline(deadline: float | None, stage: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        EXPIRED_WORK.labels("rank", stage).inc()
        raise DeadlineExpired(f"the call's deadline passed before {stage}")


def fusion_for(override: FusionOverride, scene: Fusion) -> Fusion:
    method = override.method or scene.method
    if method not in FUSION_METHODS:
        raise InvalidArgument("fusion.method", f"must be one of {', '.join(FUSION_METHODS)}, got {method!r}")
    for name, values in (("weights", override.weights), ("exponents", override.exponents)):
        for task, value in values.items():
            if not math.isfinite(value):
                raise InvalidArgument(f"fusion.{name}", f"{task}: must be finite, got {value}")
    return Fusion(method, dict(override.weights), dict(override.exponents))


class RankEngine:
    def __init__(
        self,
        versions: ModelVersions[ServingModel],
        features: FeatureStore,
        batcher: MicroBatcher,
        metrics: RankMetrics,
        scenes: SceneFusions | None = None,
        limits: RankLimits | None = None,
        catalogue: CatalogueWatcher | None = None,
    ) -> None:
        self._versions = versions
        self.catalogue = catalogue
        self._features = features
        self._batcher = batcher
        self._metrics = metrics
        self.scenes = scenes or SceneFusions()
        self._hydrator = UserFeatureHydrator()
        self.limits = limits or RankLimits()
        self.tracing: Tracing | None = None  # set when tracing is on (RankApp.attach_tracing)

    async def rank(self, query: RankQuery) -> RankResult:
        if not query.user_id:
            raise InvalidArgument("user_id", "must not be empty")
        self._check_candidates(query.items)
        if query.prerank_keep < 0:
            raise InvalidArgument("prerank_keep", f"must be >= 0, got {query.prerank_keep}")
        if query.history is not None:
            self._check_history(query.history)
        loaded = self._versions.get(query.model_version)
        model = loaded.model
        fusion = self._fusion(query, model)
        embedding = query.user_embedding
        if embedding is not None:
            self._check_embedding(model, embedding)
        items, provenance = query.items, query.provenance
        tracing = self.tracing
        new_items = None if self.catalogue is None else self.catalogue.view(loaded.version)
        if query.prerank_keep > 0 and embedding is not None and items.shape[0] > query.prerank_keep:
            with span_or_nothing(tracing, "rank.prerank") as span:
                positions = self._prerank(model, items, embedding, query.prerank_keep, new_items)
                if span is not None:
                    span.set_attributes(
                        {
                            "recsys.candidates_in": int(items.shape[0]),
                            "recsys.candidates_out": int(positions.shape[0]),
                        }
                    )
            items = items[positions]
            if provenance is not None:
                provenance = provenance.take(positions)
        version_metrics = self._metrics.version(loaded.version)
        if provenance is None and model.spec.provenance_channels:
            self._metrics.without_provenance.inc()
        unknown_user = query.user_id not in model.user_lookup
        if unknown_user:
            version_metrics.unknown_users.inc()
        if items.shape[0] == 0:
            return RankResult(
                loaded.version,
                items,
                EMPTY_FLOAT,
                dict.fromkeys(model.spec.heads, EMPTY_FLOAT),
                0,
                unknown_user,
            )
        unknown = (items < 0) | (items >= model.core.catalogue.n_items)
        if new_items is not None:
            unknown &= ~new_items.is_new(items)  # scored from their content features
        unknown_items = int(np.count_nonzero(unknown))
        if unknown_items:
            version_metrics.unknown_items.inc(unknown_items)
        _check_deadline(query.deadline, "user_state")
        self._batcher.expect()
        try:
            user, problem = await self._user_inputs(loaded, model, query)
            _check_deadline(query.deadline, "batch")  # the caller gave up during the read
        except BaseException:
            self._batcher.unexpect()
            raise
        # With tracing on, the call's server span: the batch that scores it is its child or linked.
        call_span = None if tracing is None else tracing.current_span()
        task_scores = await self._batcher.score(
            ScoreJob(model, user, items, embedding, query.deadline, provenance, call_span, new_items),
            expected=True,
        )
        scores = fusion.fuse(task_scores)
        self._check_finite(loaded.version, scores, task_scores)
        degraded = () if problem is None else (problem,)
        return RankResult(loaded.version, items, scores, task_scores, unknown_items, unknown_user, degraded)

    async def prerank(
        self, items: Int64Array, user_embedding: FloatArray, keep: int, model_version: str = ""
    ) -> PreRankResult:
        self._check_candidates(items)
        if keep <= 0:
            raise InvalidArgument("keep", f"must be > 0, got {keep}")
        loaded = self._versions.get(model_version)
        self._check_embedding(loaded.model, user_embedding)
        # One small matrix-vector product: cheaper on the loop than a hop to a thread.
        kept = EmbeddingPreRanker(loaded.model.item_embeddings).select(items, user_embedding, keep)
        self._metrics.prerank_in.inc(items.shape[0])
        self._metrics.prerank_kept.inc(kept.positions.shape[0])
        return PreRankResult(loaded.version, items[kept.positions], kept.scores)

    # -- pieces ------------------------------------------------------------------------------
    async def _user_inputs(
        self, loaded: Loaded[ServingModel], model: ServingModel, query: RankQuery
    ) -> tuple[Inputs, str | None]:
        """The user's ranker inputs, from the history recall read or from the feature store
        here, and the degraded reason when the store could not be read."""
        history = query.history
        problem: str | None = None
        if history is None:  # no recall answer to score from: read the user's state here
            state, problem = await self._user_state(loaded.version, query.user_id, query.now or time.time())
            if state is not None and loaded is self._versions.current and not self._versions.snapshot_ready:
                # The version's features are gone from the feature store: its own data
                # stands in for the snapshot (recall flags the answer).
                state = with_version_snapshot(state, model.core, model.user_lookup.get(query.user_id, -1))
            if state is not None:
                history = UserHistory.from_state(state, model.item_lookup, model.core.like_threshold)
        return self._hydrator.inputs(model, query.user_id, query.region, history), problem

    def _prerank(
        self,
        model: ServingModel,
        items: Int64Array,
        embedding: FloatArray,
        keep: int,
        new_items: NewItems | None,
    ) -> npt.NDArray[np.intp]:
        """Positions (in request order) of the candidates pre-rank keeps (new items all)."""
        fresh = None if new_items is None else new_items.is_new(items)
        chosen = EmbeddingPreRanker(model.item_embeddings).keep_positions(items, embedding, keep, fresh)
        self._metrics.prerank_in.inc(items.shape[0])
        self._metrics.prerank_kept.inc(chosen.shape[0])
        return chosen

    def _fusion(self, query: RankQuery, model: ServingModel) -> Fusion:
        """The scene's fusion, or the call's own. A call that brings a complete fusion (the
        gateway resolves scenes and experiment arms itself) does not need the scene to be
        configured here: the scene is then only a name."""
        override = query.fusion
        if override is None or override.method is None:
            scene = self.scenes.fusion(query.scene, model)
        else:
            scene = model.default_fusion()
        if override is None:
            return scene
        fusion = fusion_for(override, scene)
        fusion.validate(model.spec.heads)
        return fusion

    def _check_candidates(self, items: npt.NDArray[np.int64]) -> None:
        if items.shape[0] > self.limits.max_candidates:
            raise InvalidArgument(
                "item_indexes", f"at most {self.limits.max_candidates} candidates, got {items.shape[0]}"
            )

    def _check_history(self, history: UserHistory) -> None:
        items, liked = history.items.shape[0], history.liked.shape[0]
        if items > self.limits.max_history:
            raise InvalidArgument(
                "history.item_indexes", f"at most {self.limits.max_history} items, got {items}"
            )
        if liked != items:
            raise InvalidArgument(
                "history.liked", f"must align with history.item_indexes ({items}), got {liked}"
            )

    @staticmethod
    def _check_embedding(model: ServingModel, embedding: FloatArray) -> None:
        expected = model.spec.embedding_dim
        if embedding.shape[0] != expected:
            raise InvalidArgument(
                "user_embedding",
                f"expected {expected} values for version {model.version}, got {embedding.shape[0]}",
            )
        if not np.isfinite(embedding).all():
            raise InvalidArgument("user_embedding", "must be finite")

    def _check_finite(self, version: str, scores: FloatArray, task_scores: Mapping[str, FloatArray]) -> None:
        """Non-finite scores (a model that passed its probe but diverges on some inputs, a
        fusion that overflows) would fail the caller's rerank: the call fails as rank being
        down, which every caller already survives (the gateway falls back to pre-rank)."""
        if np.isfinite(scores).all() and all(np.isfinite(values).all() for values in task_scores.values()):
            return
        self._metrics.nonfinite_scores.inc()
        bad = int((~np.isfinite(scores)).sum())
        raise ModelOutputInvalid(
            f"model version {version} gave non-finite scores for {bad} of {scores.shape[0]} candidates"
        )

    async def _user_state(
        self, version: str, user_id: str, now: float
    ) -> tuple[UserState | None, str | None]:
        """The user's state (None: score from the version's own profile) and, when it could not
        be read, the degraded reason saying why."""
        try:
            # Bounded by the feature store's own timeout, the read's one budget
            # (RECSYS_RANK_FEATURE_STORE_TIMEOUT_MS, given to it at wiring).
            state = await self._features.user_state(
                version, user_id, now=now, live_limit=self.limits.live_limit
            )
            return state, None
        except Exception as error:  # Redis down or slow: score from the version's own profile
            self._metrics.feature_store_errors.labels(type(error).__name__).inc()
            log.warning("feature store unavailable; scoring without it", extra={"error": repr(error)})
            return None, "feature_store_unavailable"
