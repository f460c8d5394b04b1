"""`RecallClient` and `RankClient`: the gateway's two dependencies as domain calls.

Domain types in and out (`RecallCall` → `Recalled`, `RankCall` → `Ranked`); the protobufs,
the stubs, the deadline and the circuit breaker stay here, and failures are classified once
(in `Downstream.call`): the engine sees `DownstreamError` (degrade), `VersionMismatch` (the
dependency does not have the version: retry on its own) or `Overloaded` (pass it on).

The request id rides as call metadata set here, not through a client interceptor: an
interceptor costs a task and a metadata copy per call on the gateway's busiest path. With
tracing on, the CLIENT span and its `traceparent` are made here for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt

from recsys.artifacts import FloatArray, IntArray
from recsys.features import Provenance
from recsys.stages.fusion import Fusion
from recsys.stages.query import UserHistory
from recsys.v1 import common_pb2, rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc
from services.common.interceptor import REQUEST_ID_KEY
from services.common.logs import request_id_var
from services.common.provenance import provenance_from_message, provenance_message
from services.common.tracing import Tracing, client_metadata
from services.gateway.downstream import Downstream, DownstreamError

RECALL_METHOD = "/recsys.v1.Recall/Recall"
RANK_METHOD = "/recsys.v1.Rank/Rank"

_FUSION_METHODS = {
    "weighted_sum": rank_pb2.FUSION_METHOD_WEIGHTED_SUM,
    "weighted_product": rank_pb2.FUSION_METHOD_WEIGHTED_PRODUCT,
}


class VersionMismatch(DownstreamError):
    """The dependency does not have the requested model version (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class RequestContext:
    region: str = ""
    request_time: float = 0.0  # unix seconds; 0: the receiving server's clock


@dataclass(frozen=True)
class RecallCall:
    user_id: str
    context: RequestContext
    quotas: Mapping[str, int]
    exclude: Sequence[int]  # item indexes of `model_version`
    model_version: str  # "": recall's current version
    max_candidates: int
    dry_run: bool
    prerank_keep: int = 0  # > 0: recall answers its pre-rank's cut only


@dataclass
class Recalled:
    model_version: str
    items: IntArray
    scores: FloatArray
    masks: npt.NDArray[np.uint64]  # bit i: channel_names[i] found the candidate
    channel_names: tuple[str, ...]
    embedding: FloatArray | None
    history: UserHistory | None  # what recall read of the user, for rank
    cold_start: bool
    degraded: list[str] = field(default_factory=list)
    provenance: Provenance | None = None  # where each candidate came from, for rank


@dataclass(frozen=True)
class RankCall:
    user_id: str
    model_version: str
    scene: str
    items: IntArray
    context: RequestContext
    fusion: Fusion
    prerank_keep: int
    embedding: FloatArray | None
    history: UserHistory | None
    provenance: Provenance | None = None


@dataclass(frozen=True)
class Ranked:
    # Where rank's scored items are among the call's items (a subset after pre-rank, in the
    # call's order); the items themselves are the call's at these positions.
    positions: npt.NDArray[np.intp]
    scores: FloatArray
    task_scores: dict[str, FloatArray]
    degraded: list[str] = field(default_factory=list)  # rank's own reasons, "rank:…"


def _metadata() -> tuple[tuple[str, str], ...]:
    request_id = request_id_var.get()
    return () if request_id == "-" else ((REQUEST_ID_KEY, request_id),)


def _context(context: RequestContext) -> common_pb2.RequestContext:
    message = common_pb2.RequestContext(region=context.region)
    if context.request_time:
        message.request_time.FromNanoseconds(int(context.request_time * 1e9))
    return message


def _embedding(response: recall_pb2.RecallResponse) -> FloatArray | None:
    if not response.user_embedding:
        return None
    embedding = np.asarray(response.user_embedding, dtype=np.float32)
    # A non-finite embedding would poison pre-rank and rank alike: as if recall sent none.
    return embedding if np.isfinite(embedding).all() else None


def _provenance(response: recall_pb2.RecallResponse, scores: FloatArray) -> Provenance | None:
    """Recall's provenance; None when it sent none or a malformed one (rank then scores the
    candidates as found by no channel)."""
    if not response.HasField("provenance"):
        return None
    try:
        return provenance_from_message(response.provenance, scores.shape[0], scores)
    except ValueError:
        return None


def _positions(sent: IntArray, returned: IntArray) -> npt.NDArray[np.intp]:
    """Where each returned item is among the sent ones (distinct: recall's merge), by binary
    search rather than a dict of the ~1,000 sent; an item rank was not sent fails the call."""
    if returned.shape[0] == 0:
        return np.zeros(0, np.intp)
    if sent.shape[0] == 0:
        raise DownstreamError("rank", "unsent items")
    order = np.argsort(sent)  # distinct items: no stability needed (and twice as fast)
    slots = np.minimum(np.searchsorted(sent, returned, sorter=order), sent.shape[0] - 1)
    positions: npt.NDArray[np.intp] = order[slots]
    if not np.array_equal(sent[positions], returned):
        raise DownstreamError("rank", "unsent items")
    return positions


def _version_or_error(error: DownstreamError) -> DownstreamError:
    if error.code is grpc.StatusCode.FAILED_PRECONDITION:
        return VersionMismatch(error.dependency, error.reason, error.code)
    return error


class RecallClient:
    def __init__(self, stub: recall_pb2_grpc.RecallAsyncStub, link: Downstream, timeout: float) -> None:
        self._stub = stub
        self._link = link
        self.timeout = timeout  # what recall is normally given
        self.tracing: Tracing | None = None  # set when tracing is on (GatewayApp.attach_tracing)

    async def recall(self, call: RecallCall, budget: float) -> Recalled:
        request = recall_pb2.RecallRequest(
            user_id=call.user_id,
            context=_context(call.context),
            quotas=dict(call.quotas),
            exclude_item_indexes=call.exclude,
            model_version=call.model_version,
            max_candidates=call.max_candidates,
            dry_run=call.dry_run,
            prerank_keep=call.prerank_keep,
        )
        try:
            with client_metadata(self.tracing, RECALL_METHOD) as carried:
                metadata = _metadata() + carried
                response = await self._link.call(
                    lambda timeout: self._stub.Recall(request, timeout=timeout, metadata=metadata),
                    min(budget, self.timeout),
                    self.timeout,
                )
        except DownstreamError as error:
            raise _version_or_error(error) from error
        history = response.history if response.HasField("history") else None
        scores = np.asarray(response.scores, dtype=np.float32)
        return Recalled(
            response.model_version,
            np.asarray(response.item_indexes, dtype=np.int32),
            scores,
            np.asarray(response.channel_masks, dtype=np.uint64),
            tuple(response.channel_names),
            _embedding(response),
            None
            if history is None
            else UserHistory(
                np.asarray(history.item_indexes, dtype=np.int32),
                np.asarray(history.liked, dtype=bool),
                history.region_token,
            ),
            response.cold_start,
            [f"recall:{reason}" for reason in response.degraded_reasons],
            _provenance(response, scores),
        )


class RankClient:
    def __init__(self, stub: rank_pb2_grpc.RankAsyncStub, link: Downstream, timeout: float) -> None:
        self._stub = stub
        self._link = link
        self.timeout = timeout
        self.tracing: Tracing | None = None  # set when tracing is on (GatewayApp.attach_tracing)

    async def rank(self, call: RankCall, budget: float) -> Ranked:
        fusion = call.fusion
        history = call.history
        request = rank_pb2.RankRequest(
            user_id=call.user_id,
            model_version=call.model_version,
            scene=call.scene,
            item_indexes=call.items.tolist(),
            context=_context(call.context),
            fusion=rank_pb2.Fusion(
                method=_FUSION_METHODS[fusion.method],
                weights=dict(fusion.weights),
                exponents=dict(fusion.exponents),
            ),
            prerank_keep=call.prerank_keep if call.embedding is not None else 0,
            user_embedding=[] if call.embedding is None else call.embedding.tolist(),
            history=None
            if history is None
            else common_pb2.UserHistory(
                item_indexes=history.items.tolist(), liked=history.liked.tolist(), region_token=history.region
            ),
            provenance=None
            if call.provenance is None
            else provenance_message(call.provenance, with_merge_scores=True),
        )
        try:
            with client_metadata(self.tracing, RANK_METHOD) as carried:
                metadata = _metadata() + carried
                response = await self._link.call(
                    lambda timeout: self._stub.Rank(request, timeout=timeout, metadata=metadata),
                    min(budget, self.timeout),
                    self.timeout,
                )
        except DownstreamError as error:
            raise _version_or_error(error) from error
        scores = np.asarray(response.scores, dtype=np.float32)
        task_scores = {task.task: np.asarray(task.scores, dtype=np.float32) for task in response.task_scores}
        if not (
            np.isfinite(scores).all() and all(np.isfinite(values).all() for values in task_scores.values())
        ):
            # A rank that does not check its own outputs (an older release) has failed all the
            # same: the selectors downstream refuse non-finite rewards.
            raise DownstreamError("rank", "nonfinite scores")
        items = np.asarray(response.item_indexes, dtype=np.int32)
        if items.shape != scores.shape or any(
            values.shape != scores.shape for values in task_scores.values()
        ):
            raise DownstreamError("rank", "misaligned scores")
        return Ranked(
            _positions(call.items, items),
            scores,
            task_scores,
            [f"rank:{reason}" for reason in response.degraded_reasons],
        )
