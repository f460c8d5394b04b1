"""A smaller ranker only when it ranks as well: int8 dynamic quantisation behind a quality gate.

onnxruntime's dynamic quantisation stores the MatMul/Gemm weights as int8 and quantises
activations per batch at run time. It changes the scores, so parity with TensorFlow (the
1e-5 gate in `training.export`) cannot hold; what must hold is the ranking. The gate scores
the fp32 model and the candidate with the same function (the build: the served pipeline's
NDCG@10 on the validation split, the held-out test part untouched) and publishes the
candidate only if it loses at most `max_loss`; otherwise the fp32 model is published and the
report says why. Either way the figures go into the version's metrics.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUALITY_MAX_LOSS = 0.005  # NDCG@10 on validation: a slimmer model may lose at most this


def quantise_int8(model: bytes) -> bytes:
    """`model` with its MatMul/Gemm weights as int8 (onnxruntime dynamic quantisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model)
        # Only the dense layers: embedding gathers stay fp32 (quantising them saves bytes, not
        # time, and costs accuracy on rare ids).
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        return target.read_bytes()


@dataclass(frozen=True)
class GateDecision:
    published: bytes  # what the version ships: the candidate, or the reference it did not match
    accepted: bool
    report: dict[str, Any]


def quality_gate(
    reference: bytes,
    candidate: bytes,
    variant: str,
    score: Callable[[bytes], float],
    max_loss: float = QUALITY_MAX_LOSS,
) -> GateDecision:
    """Publish `candidate` (a slimmer `reference`) only if `score(candidate)` is at most
    `max_loss` below `score(reference)`, and finite."""
    base, slim = float(score(reference)), float(score(candidate))
    loss = base - slim
    accepted = bool(np.isfinite(slim) and np.isfinite(base) and loss <= max_loss)
    report: dict[str, Any] = {
        "variant": variant,
        "metric": "validation pipeline ndcg@10",
        "reference": round(base, 5),
        "candidate": round(slim, 5),
        "loss": round(loss, 5),
        "max_loss": max_loss,
        "reference_bytes": len(reference),
        "candidate_bytes": len(candidate),
        "published": variant if accepted else "fp32",
    }
    if not accepted:
        report["reason"] = (
            f"{variant} loses {loss:.4f} {report['metric']} (> {max_loss:g}); published the fp32 model"
            if np.isfinite(slim)
            else f"{variant} scores are not finite; published the fp32 model"
        )
    return GateDecision(candidate if accepted else reference, accepted, report)
