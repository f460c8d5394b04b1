"""Pooling pieces shared by the towers and the ranker, written with keras.ops so that
they export to ONNX as plain arithmetic.

Sums of products over a sequence have two formulations of the same numbers (`matmul`):
- a broadcast multiply and a sum, which TensorFlow trains with. Its oneDNN batched MatMul
  aborted the ranker's training here ("corrupted size vs. prev_size", tensorflow-cpu 2.21);
- a batched matrix product, which the exported graph uses. onnxruntime runs a MatMul over
  [rows, length, dim] several times faster than a broadcast Mul and a ReduceSum: the ranker
  runs in about two thirds of the time (BENCHMARKS.md, bench_ranker_variants).
The build exports a twin of the trained model built with `matmul=True` and carrying its
weights; the parity check compares the trained model with that export, so the two
formulations are proven to agree on every published version."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def weighted_sum(embeddings: Any, weights: Any, matmul: bool = False) -> Any:
    """Σ wᵢ·eᵢ over the sequence axis: [rows, length, dim] and [rows, length] → [rows, dim]."""
    if matmul:
        return ops.squeeze(ops.matmul(ops.expand_dims(weights, 1), embeddings), axis=1)
    return ops.sum(embeddings * ops.expand_dims(weights, -1), axis=1)


def weighted_mean(embeddings: Any, weights: Any, matmul: bool = False) -> Any:
    """Σ wᵢ·eᵢ / Σ wᵢ over the sequence axis (weights 0 on padding)."""
    total = weighted_sum(embeddings, weights, matmul)
    return total / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1e-6)


def masked_mean(embeddings: Any, tokens: Any) -> Any:
    """Mean over the non-zero tokens of a padded sequence."""
    mask = ops.cast(ops.greater(tokens, 0), "float32")
    return weighted_mean(embeddings, mask)


def target_attention(history: Any, weights: Any, target: Any, matmul: bool = False) -> Any:
    """History pooled with attention to the candidate (DIN-style, softmax over the items
    the user actually has; padding excluded)."""
    dim = float(history.shape[-1])
    if matmul:
        dots = ops.squeeze(ops.matmul(history, ops.expand_dims(target, -1)), axis=-1)
    else:
        dots = ops.sum(history * ops.expand_dims(target, 1), axis=-1)
    logits = dots / (dim**0.5)
    present = ops.greater(weights, 0.0)
    logits = ops.where(present, logits, ops.full_like(logits, -1e9))
    attention = ops.softmax(logits, axis=-1) * ops.cast(present, "float32")
    return weighted_sum(history, attention, matmul)


def din_attention(
    history: Any, weights: Any, target: Any, name: str, units: int = 32, matmul: bool = False
) -> Any:
    """DIN's activation unit (Zhou et al. 2018): each history item's weight is an MLP of
    [h, t, h − t, h · t], unnormalised (no softmax: how much the history says about the
    candidate is itself a signal), padding excluded; the weights pool the history."""
    length = history.shape[1]
    tiled = ops.repeat(ops.expand_dims(target, 1), length, axis=1)
    pair = ops.concatenate([history, tiled, history - tiled, history * tiled], axis=-1)
    hidden = keras.layers.Dense(units, activation="sigmoid", name=f"{name}_hidden")(pair)
    score = ops.squeeze(keras.layers.Dense(1, name=f"{name}_score")(hidden), axis=-1)
    present = ops.cast(ops.greater(weights, 0.0), "float32")
    attention = score * present
    total = ops.maximum(ops.sum(present, axis=1, keepdims=True), 1.0)
    return weighted_sum(history, attention, matmul) / total


def l2_normalize(x: Any) -> Any:
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))


def mlp(units: list[int], name: str, dropout: float = 0.0) -> keras.Sequential:
    layers: list[keras.layers.Layer] = []
    for index, width in enumerate(units):
        layers.append(keras.layers.Dense(width, activation="relu", name=f"{name}_dense{index}"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"{name}_dropout{index}"))
    return keras.Sequential(layers, name=name)
