"""Keras → ONNX with named inputs and outputs, and the parity proof that gates publishing.

`tf2onnx.convert.from_keras` fails on dict-input Keras 3 models, so the model is wrapped
in a `tf.function` whose arguments carry the feature spec's input names and converted with
`tf2onnx.convert.from_function`. Every exported model must match TensorFlow within 1e-5
(max abs difference) on at least 1,000 real rows, or the version is not published."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import onnx
import onnx.numpy_helper
import tensorflow as tf
import tf2onnx

from recsys.features import Inputs, InputSpec
from recsys.onnx_models import OnnxModel

OPSET = 17
PARITY_TOLERANCE = 1e-5
PARITY_MIN_ROWS = 1000


class ParityError(RuntimeError):
    """The exported model does not reproduce the trained one."""


@dataclass(frozen=True)
class Parity:
    rows: int
    max_abs_diff: float
    outputs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "max_abs_diff": self.max_abs_diff, "outputs": list(self.outputs)}


# Variables at least this large (elements) are exported as initializers added after conversion,
# not as constants tf2onnx carries through its passes: tf2onnx rewrites every constant into its
# protobuf once per optimiser pass (two dozen passes) and protobuf's arena keeps each copy, so a
# tower with a 10⁶-item id table (128 MB) took 7 GB to export.
LARGE_VARIABLE = 1 << 18


def export_onnx(model: keras.Model, specs: list[InputSpec]) -> bytes:
    signature = [tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name) for spec in specs]
    names = [spec.name for spec in specs]
    large = [v for v in model.variables if int(np.prod(v.shape)) >= LARGE_VARIABLE]
    weight_names = [f"weight__{index}" for index in range(len(large))]
    signature += [
        tf.TensorSpec(v.shape, tf.as_dtype(v.dtype), name=name)
        for v, name in zip(large, weight_names, strict=True)
    ]

    def serve(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        features, weights = tensors[: len(names)], tensors[len(names) :]
        # The large variables read the function's weight arguments instead of their own value.
        with keras.StatelessScope(state_mapping=list(zip(large, weights, strict=True))):
            outputs: dict[str, tf.Tensor] = model(dict(zip(names, features, strict=True)), training=False)
        return {name: tf.identity(value, name=name) for name, value in outputs.items()}

    function = tf.function(serve, input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET)
    graph = proto.graph
    kept = [value for value in graph.input if value.name not in weight_names]
    if len(kept) != len(graph.input) - len(large):
        raise ParityError(
            f"export: expected weight inputs {weight_names}, got {[v.name for v in graph.input]}"
        )
    del graph.input[:]
    graph.input.extend(kept)
    for variable, name in zip(large, weight_names, strict=True):
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(variable.numpy()), name))
    data: bytes = proto.SerializeToString()
    return data


def check_parity(
    model: keras.Model, onnx_bytes: bytes, inputs: Inputs, tolerance: float = PARITY_TOLERANCE
) -> Parity:
    rows = int(next(iter(inputs.values())).shape[0])
    if rows < PARITY_MIN_ROWS:
        raise ParityError(f"parity needs at least {PARITY_MIN_ROWS} rows, got {rows}")
    expected = {name: np.asarray(value) for name, value in model(inputs, training=False).items()}
    actual = OnnxModel(onnx_bytes).run(inputs)
    if set(expected) != set(actual):
        raise ParityError(f"outputs differ: TensorFlow {sorted(expected)}, ONNX {sorted(actual)}")
    worst = max(float(np.max(np.abs(expected[name] - actual[name]))) for name in expected)
    if not np.isfinite(worst) or worst > tolerance:
        raise ParityError(f"ONNX differs from TensorFlow by {worst:.3g} (> {tolerance:g}) on {rows} rows")
    return Parity(rows=rows, max_abs_diff=worst, outputs=tuple(sorted(expected)))
