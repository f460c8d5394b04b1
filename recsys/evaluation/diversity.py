"""Diversity of a recommended list, to report what MMR and DPP buy over plain top-k (and
what they cost in accuracy, from the usual metrics)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def intra_list_diversity(embeddings: npt.NDArray[np.floating]) -> float:
    """Mean over pairs of the list's items of 1 − cosine similarity (0: all alike; 1:
    orthogonal on average; up to 2). Rows are normalised here; a list of fewer than two
    items has no pairs and scores 0."""
    rows = np.asarray(embeddings, np.float64)
    k = rows.shape[0]
    if k < 2:
        return 0.0
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    similarity = unit @ unit.T
    pairs_sum = (similarity.sum() - np.trace(similarity)) / 2.0
    return float(1.0 - pairs_sum / (k * (k - 1) / 2.0))


def distinct_categories(categories: npt.NDArray[np.integer]) -> int:
    """Distinct category tokens in the list (`categories` [k, max_categories], 0 pads)."""
    tokens = np.unique(np.asarray(categories))
    return int((tokens != 0).sum())


def category_coverage(categories: npt.NDArray[np.integer], n_categories: int) -> float:
    """Fraction of the catalogue's `n_categories` categories the list shows."""
    if n_categories <= 0:
        raise ValueError(f"n_categories: must be at least 1, got {n_categories}")
    return distinct_categories(categories) / n_categories
