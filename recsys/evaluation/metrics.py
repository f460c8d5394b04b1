"""Ranking metrics over ranked lists and relevant sets (numpy, no frameworks)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_DISCOUNT = 1.0 / np.log2(np.arange(2, 2_002, dtype=np.float64))


def hits(ranked: npt.NDArray[np.integer], relevant: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    return np.isin(ranked, relevant)


def recall_at_k(ranked: npt.NDArray[np.integer], relevant: npt.NDArray[np.integer], k: int) -> float:
    """hits in the top k / min(k, |relevant|)."""
    if relevant.shape[0] == 0:
        return 0.0
    return float(hits(ranked[:k], relevant).sum()) / float(min(k, relevant.shape[0]))


def hit_rate_at_k(ranked: npt.NDArray[np.integer], relevant: npt.NDArray[np.integer], k: int) -> float:
    return float(hits(ranked[:k], relevant).any())


def ndcg_at_k(ranked: npt.NDArray[np.integer], relevant: npt.NDArray[np.integer], k: int) -> float:
    if relevant.shape[0] == 0:
        return 0.0
    gains = hits(ranked[:k], relevant).astype(np.float64)
    dcg = float((gains * _DISCOUNT[: gains.shape[0]]).sum())
    ideal = float(_DISCOUNT[: min(k, relevant.shape[0])].sum())
    return dcg / ideal


def mean_metrics(
    lists: Sequence[npt.NDArray[np.integer]], relevant: Sequence[npt.NDArray[np.integer]], ks: Sequence[int]
) -> dict[str, float]:
    result: dict[str, float] = {}
    for k in ks:
        result[f"recall@{k}"] = float(
            np.mean([recall_at_k(r, rel, k) for r, rel in zip(lists, relevant, strict=True)])
        )
        result[f"hit_rate@{k}"] = float(
            np.mean([hit_rate_at_k(r, rel, k) for r, rel in zip(lists, relevant, strict=True)])
        )
    result["ndcg@10"] = float(
        np.mean([ndcg_at_k(r, rel, 10) for r, rel in zip(lists, relevant, strict=True)])
    )
    return result


def auc(scores: npt.NDArray[np.floating], labels: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    positives = int(labels.sum())
    negatives = int(labels.shape[0] - positives)
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.shape[0], dtype=np.float64)
    # average ranks over ties
    boundaries = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1], True])
    for start, end in itertools.pairwise(boundaries):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))
