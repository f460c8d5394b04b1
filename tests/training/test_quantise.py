"""The int8 ranker and the quality gate that decides whether a version may ship it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import pytest

from recsys.evaluation.evaluator import HeldOut, pipeline_ndcg, run_channels
from recsys.onnx_models import OnnxModel
from training.build import _gate_int8, _serving_model
from training.quantise import QUALITY_MAX_LOSS, quality_gate, quantise_int8


@pytest.fixture(scope="module")
def served(quick_candidate: Any) -> tuple[Any, Any, HeldOut]:
    """The quick version's served model, its channels run for a slice of its held-out users."""
    c = quick_candidate
    model = _serving_model("gate", c.spec, c.core, c.trained, c.defaults)
    heldout = HeldOut.from_pairs(c.heldout_user, c.heldout_item).sample(300, seed=0)
    return model, run_channels(model, heldout), heldout


def test_the_int8_ranker_is_quantised_and_serves_the_same_inputs_and_heads(quick_candidate: Any) -> None:
    fp32 = quick_candidate.trained.ranker
    int8 = quantise_int8(fp32)
    ops = {node.op_type for node in onnx.load_from_string(int8).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops
    assert len(int8) < len(fp32)
    reference, candidate = OnnxModel(fp32), OnnxModel(int8)
    assert candidate.input_names == reference.input_names
    rows = 256
    rng = np.random.default_rng(0)
    inputs = {}
    spec = quick_candidate.spec
    highs = {
        "user_id": spec.n_user_tokens,
        "item_id": spec.n_item_tokens,
        "history": spec.n_item_tokens,
        "categories": spec.n_category_tokens,
        "author": spec.n_author_tokens,
        "region": spec.n_region_tokens,
    }
    for input_spec in spec.ranker_inputs():
        shape = (rows, *(int(size) for size in input_spec.shape[1:] if size is not None))
        if input_spec.dtype == "int64":
            inputs[input_spec.name] = rng.integers(0, highs.get(input_spec.name, 2), shape).astype(np.int64)
        else:
            inputs[input_spec.name] = rng.random(shape).astype(np.float32)
    expected, actual = reference.run(inputs), candidate.run(inputs)
    assert set(actual) == set(expected)
    for head, scores in actual.items():
        assert np.isfinite(scores).all()
        # Close but not equal: quantisation moves scores (which is why parity cannot gate it).
        assert 0 < np.max(np.abs(scores - expected[head])) < 0.2
        assert np.corrcoef(scores.ravel(), expected[head].ravel())[0, 1] > 0.95


def test_the_gate_publishes_the_int8_ranker_only_within_the_allowed_loss(
    quick_candidate: Any, served: tuple[Any, Any, HeldOut]
) -> None:
    model, run, heldout = served
    fp32 = quick_candidate.trained.ranker
    decision = _gate_int8(model, quick_candidate.defaults, run, heldout, fp32)
    report = decision.report
    # The figures are the served pipeline's, measured again here.
    assert report["reference"] == pytest.approx(pipeline_ndcg(model, run, heldout.relevant), abs=1e-5)
    int8_model = dataclasses.replace(model, ranker=OnnxModel(quantise_int8(fp32)))
    assert report["candidate"] == pytest.approx(pipeline_ndcg(int8_model, run, heldout.relevant), abs=1e-5)
    # Three figures each rounded to 5 places: their difference may be off by 1.5e-5.
    assert report["loss"] == pytest.approx(report["reference"] - report["candidate"], abs=1.6e-5)
    assert decision.accepted == (report["loss"] <= QUALITY_MAX_LOSS)
    assert (decision.published != fp32) == decision.accepted
    assert report["published"] == ("int8" if decision.accepted else "fp32")


def test_a_candidate_that_ranks_worse_than_allowed_is_not_published(
    quick_candidate: Any, served: tuple[Any, Any, HeldOut]
) -> None:
    model, run, heldout = served
    fp32 = quick_candidate.trained.ranker
    int8 = quantise_int8(fp32)

    def score(ranker: bytes) -> float:
        return pipeline_ndcg(dataclasses.replace(model, ranker=OnnxModel(ranker)), run, heldout.relevant)

    strict = quality_gate(fp32, int8, "int8", score, max_loss=-1.0)  # no model can gain a whole NDCG
    assert not strict.accepted
    assert strict.published == fp32
    assert "published the fp32 model" in strict.report["reason"]
    lenient = quality_gate(fp32, int8, "int8", score, max_loss=1.0)
    assert lenient.accepted
    assert lenient.published == int8
    broken = quality_gate(fp32, int8, "int8", lambda ranker: float("nan") if ranker is int8 else 0.3)
    assert not broken.accepted
    assert broken.published == fp32
    assert "not finite" in broken.report["reason"]
