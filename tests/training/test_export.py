"""ONNX export and the parity gate on a small real Keras model."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.features import FeatureSpec
from recsys.onnx_models import OnnxModel
from training.export import ParityError, check_parity, export_onnx
from training.models.ranker import RankerConfig, build_ranker

SPEC = FeatureSpec(
    n_user_tokens=30,
    n_item_tokens=50,
    n_category_tokens=5,
    n_author_tokens=4,
    n_region_tokens=3,
    history_length=6,
    max_categories=2,
    user_stat_names=("a", "b", "c"),
    item_stat_names=("a", "b", "c", "d"),
    embedding_dim=8,
    heads=("click", "like"),
)


def _inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    highs = {"user_id": 30, "item_id": 50, "history": 50, "categories": 5, "author": 4, "region": 3}
    inputs = {}
    for spec in SPEC.ranker_inputs():
        shape = (rows, *(int(size) for size in spec.shape[1:] if size is not None))
        if spec.dtype == "int64":
            inputs[spec.name] = rng.integers(0, highs[spec.name], shape).astype(np.int64)
        else:
            inputs[spec.name] = rng.random(shape).astype(np.float32)
    return inputs


def test_exported_ranker_matches_keras_and_takes_inputs_by_name() -> None:
    model = build_ranker(
        SPEC, RankerConfig(id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4)
    )
    data = export_onnx(model, SPEC.ranker_inputs())
    session = OnnxModel(data)
    assert set(session.input_names) == {spec.name for spec in SPEC.ranker_inputs()}
    assert set(session.output_names) == {"click", "like"}
    parity = check_parity(model, data, _inputs(1200))
    assert parity.rows == 1200
    assert parity.max_abs_diff <= 1e-5
    # Inputs are matched by name, not position: a shuffled dict gives the same scores.
    inputs = _inputs(5, seed=1)
    shuffled = dict(reversed(list(inputs.items())))
    np.testing.assert_array_equal(session.run(inputs)["click"], session.run(shuffled)["click"])


def test_parity_gate_refuses_a_model_that_differs() -> None:
    model = build_ranker(
        SPEC, RankerConfig(id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4)
    )
    other = build_ranker(
        SPEC, RankerConfig(id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4, seed=1)
    )
    data = export_onnx(other, SPEC.ranker_inputs())  # different weights
    with pytest.raises(ParityError, match="differs from TensorFlow"):
        check_parity(model, data, _inputs(1000))
    with pytest.raises(ParityError, match="at least 1000 rows"):
        check_parity(model, export_onnx(model, SPEC.ranker_inputs()), _inputs(10))
