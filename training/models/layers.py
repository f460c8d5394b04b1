"""Pooling pieces shared by the towers and the ranker, written with keras.ops so that
they export to ONNX as plain arithmetic."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def weighted_mean(embeddings: Any, weights: Any) -> Any:
    """Σ wᵢ·eᵢ / Σ wᵢ over the sequence axis (weights 0 on padding)."""
    total = ops.sum(embeddings * ops.expand_dims(weights, -1), axis=1)
    return total / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1e-6)


def masked_mean(embeddings: Any, tokens: Any) -> Any:
    """Mean over the non-zero tokens of a padded sequence."""
    mask = ops.cast(ops.greater(tokens, 0), "float32")
    return weighted_mean(embeddings, mask)


def target_attention(history: Any, weights: Any, target: Any) -> Any:
    """History pooled with attention to the candidate (DIN-style, softmax over the items
    the user actually has; padding excluded)."""
    dim = float(history.shape[-1])
    logits = ops.sum(history * ops.expand_dims(target, 1), axis=-1) / (dim**0.5)
    present = ops.greater(weights, 0.0)
    logits = ops.where(present, logits, ops.full_like(logits, -1e9))
    attention = ops.softmax(logits, axis=-1) * ops.cast(present, "float32")
    return ops.sum(history * ops.expand_dims(attention, -1), axis=1)


def din_attention(history: Any, weights: Any, target: Any, name: str, units: int = 32) -> Any:
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
    return ops.sum(history * ops.expand_dims(attention, -1), axis=1) / total


def l2_normalize(x: Any) -> Any:
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))


def mlp(units: list[int], name: str, dropout: float = 0.0) -> keras.Sequential:
    layers: list[keras.layers.Layer] = []
    for index, width in enumerate(units):
        layers.append(keras.layers.Dense(width, activation="relu", name=f"{name}_dense{index}"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"{name}_dropout{index}"))
    return keras.Sequential(layers, name=name)
