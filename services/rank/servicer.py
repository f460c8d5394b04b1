"""Protobuf in, protobuf out: no business logic here (see engine.py)."""

from __future__ import annotations

import time

import numpy as np
from grpc import aio

from recsys.errors import InvalidArgument
from recsys.features import Provenance
from recsys.limits import check_request
from recsys.stages.query import UserHistory
from recsys.v1 import rank_pb2, rank_pb2_grpc
from services.common.provenance import provenance_from_message
from services.rank.engine import FusionOverride, RankEngine, RankQuery

_METHODS = {
    rank_pb2.FUSION_METHOD_UNSPECIFIED: None,
    rank_pb2.FUSION_METHOD_WEIGHTED_SUM: "weighted_sum",
    rank_pb2.FUSION_METHOD_WEIGHTED_PRODUCT: "weighted_product",
}


def _provenance(request: rank_pb2.RankRequest) -> Provenance | None:
    if not request.HasField("provenance"):
        return None
    try:
        return provenance_from_message(request.provenance, len(request.item_indexes))
    except ValueError as error:
        field, _, message = str(error).partition(": ")
        raise InvalidArgument(field, message) from None


def _fusion(fusion: rank_pb2.Fusion) -> FusionOverride:
    # An enum value this server does not know reaches the engine as its number, which refuses it.
    method = _METHODS.get(fusion.method, str(fusion.method))
    return FusionOverride(method, dict(fusion.weights), dict(fusion.exponents))


class RankServicer(rank_pb2_grpc.RankServicer):
    def __init__(self, engine: RankEngine) -> None:
        self._engine = engine

    async def Rank(
        self, request: rank_pb2.RankRequest, context: aio.ServicerContext[object, object]
    ) -> rank_pb2.RankResponse:
        check_request(request)
        when = request.context.request_time
        remaining = context.time_remaining()
        query = RankQuery(
            user_id=request.user_id,
            items=np.asarray(request.item_indexes, dtype=np.int64),
            model_version=request.model_version,
            scene=request.scene,
            region=request.context.region,
            now=when.seconds + when.nanos / 1e9 if request.context.HasField("request_time") else 0.0,
            fusion=_fusion(request.fusion) if request.HasField("fusion") else None,
            prerank_keep=request.prerank_keep,
            user_embedding=(
                np.asarray(request.user_embedding, dtype=np.float32) if len(request.user_embedding) else None
            ),
            deadline=None if remaining is None else time.monotonic() + remaining,
            history=(
                UserHistory(
                    np.asarray(request.history.item_indexes, dtype=np.int32),
                    np.asarray(request.history.liked, dtype=bool),
                    request.history.region_token,
                )
                if request.HasField("history")
                else None
            ),
            provenance=_provenance(request),
        )
        result = await self._engine.rank(query)
        return rank_pb2.RankResponse(
            model_version=result.model_version,
            item_indexes=result.items.tolist(),
            scores=result.scores.tolist(),
            task_scores=[
                rank_pb2.TaskScores(task=task, scores=scores.tolist())
                for task, scores in result.task_scores.items()
            ],
            unknown_items=result.unknown_items,
            unknown_user=result.unknown_user,
            degraded_reasons=result.degraded,
        )

    async def PreRank(
        self, request: rank_pb2.PreRankRequest, context: aio.ServicerContext[object, object]
    ) -> rank_pb2.PreRankResponse:
        check_request(request)
        result = await self._engine.prerank(
            np.asarray(request.item_indexes, dtype=np.int64),
            np.asarray(request.user_embedding, dtype=np.float32),
            request.keep,
            request.model_version,
        )
        return rank_pb2.PreRankResponse(
            model_version=result.model_version,
            item_indexes=result.items.tolist(),
            scores=result.scores.tolist(),
        )
