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


def l2_normalize(x: Any) -> Any:
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), 1e-12))


def mlp(units: list[int], name: str, dropout: float = 0.0) -> keras.Sequential:
    layers: list[keras.layers.Layer] = []
    for index, width in enumerate(units):
        layers.append(keras.layers.Dense(width, activation="relu", name=f"{name}_dense{index}"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout, name=f"{name}_dropout{index}"))
    return keras.Sequential(layers, name=name)
