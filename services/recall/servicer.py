"""Protobuf in, protobuf out: no business logic here (see engine.py)."""

from __future__ import annotations

import numpy as np
from grpc import aio

from recsys.limits import check_request
from recsys.v1 import common_pb2, recall_pb2, recall_pb2_grpc
from services.common.provenance import provenance_message
from services.recall.engine import RecallEngine, RecallQuery

_STATUS = {
    "ok": recall_pb2.CHANNEL_STATUS_OK,
    "timeout": recall_pb2.CHANNEL_STATUS_TIMEOUT,
    "error": recall_pb2.CHANNEL_STATUS_ERROR,
    "skipped": recall_pb2.CHANNEL_STATUS_SKIPPED,
}


class RecallServicer(recall_pb2_grpc.RecallServicer):
    def __init__(self, engine: RecallEngine) -> None:
        self._engine = engine

    async def Recall(
        self, request: recall_pb2.RecallRequest, context: aio.ServicerContext[object, object]
    ) -> recall_pb2.RecallResponse:
        check_request(request)
        when = request.context.request_time
        query = RecallQuery(
            user_id=request.user_id,
            region=request.context.region,
            now=when.seconds + when.nanos / 1e9 if request.context.HasField("request_time") else 0.0,
            quotas=dict(request.quotas),
            exclude=np.asarray(request.exclude_item_indexes, dtype=np.int32),
            model_version=request.model_version,
            max_candidates=request.max_candidates,
            time_remaining=context.time_remaining(),
            dry_run=request.dry_run,
            prerank_keep=request.prerank_keep,
        )
        result = await self._engine.recall(query)
        merged = result.merged
        return recall_pb2.RecallResponse(
            model_version=result.model_version,
            item_indexes=merged.items.tolist(),
            scores=merged.scores.tolist(),
            channel_masks=merged.channel_masks.tolist(),
            channel_names=list(merged.channel_names),
            channel_stats=[
                recall_pb2.ChannelStats(
                    channel=stat.channel,
                    status=_STATUS[stat.status],
                    count=stat.count,
                    milliseconds=stat.milliseconds,
                    detail=stat.detail,
                )
                for stat in result.stats
            ],
            user_embedding=[] if result.embedding is None else result.embedding.tolist(),
            cold_start=result.cold_start,
            degraded_reasons=result.degraded,
            history=None
            if result.history is None
            else common_pb2.UserHistory(
                item_indexes=result.history.items.tolist(),
                liked=result.history.liked.tolist(),
                region_token=result.history.region,
            ),
            provenance=provenance_message(merged.provenance(), with_merge_scores=False),
        )
