"""`Provenance` on the wire (common.proto `Provenance`): raw little-endian matrices that
decode into numpy views without a Python object per cell. Recall encodes it, the gateway
decodes and re-encodes it for rank, rank decodes and checks it."""

from __future__ import annotations

import numpy as np

from recsys.artifacts import FloatArray
from recsys.features import Provenance
from recsys.v1 import common_pb2

MAX_CHANNELS = 64


def provenance_message(provenance: Provenance, *, with_merge_scores: bool) -> common_pb2.Provenance:
    return common_pb2.Provenance(
        channels=list(provenance.channel_names),
        ranks=np.ascontiguousarray(provenance.ranks, dtype="<i2").tobytes(),
        scores=np.ascontiguousarray(provenance.scores, dtype="<f4").tobytes(),
        merge_scores=provenance.merge_scores.tolist() if with_merge_scores else (),
    )


def provenance_from_message(
    message: common_pb2.Provenance, n: int, merge_scores: FloatArray | None = None
) -> Provenance:
    """The provenance of `n` candidates; `merge_scores` None: the message's own. Raises
    ValueError naming the field whose size does not match."""
    columns = len(message.channels)
    if columns > MAX_CHANNELS:
        raise ValueError(f"provenance.channels: at most {MAX_CHANNELS}, got {columns}")
    if len(message.ranks) != 2 * n * columns:
        raise ValueError(f"provenance.ranks: expected int16 {n}×{columns}, got {len(message.ranks)} bytes")
    if len(message.scores) != 4 * n * columns:
        raise ValueError(
            f"provenance.scores: expected float32 {n}×{columns}, got {len(message.scores)} bytes"
        )
    if merge_scores is None:
        if len(message.merge_scores) != n:
            raise ValueError(f"provenance.merge_scores: expected {n} values, got {len(message.merge_scores)}")
        merge_scores = np.asarray(message.merge_scores, dtype=np.float32)
    scores = np.frombuffer(message.scores, dtype="<f4").reshape(n, columns)
    if not (np.isfinite(scores).all() and np.isfinite(merge_scores).all()):
        raise ValueError("provenance.scores: must be finite")
    return Provenance(
        tuple(message.channels),
        np.frombuffer(message.ranks, dtype="<i2").reshape(n, columns),
        scores,
        merge_scores,
    )
