"""The frozen, typed query every stage reads: who the user is and what they did."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from recsys.artifacts import CoreArtifacts, FloatArray, IntArray

EMPTY_INT = np.zeros(0, dtype=np.int32)
EMPTY_FLOAT = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class UserQuery:
    user_index: int  # −1: unknown to this model version
    region_token: int  # 0: unknown
    recent_items: IntArray  # item indexes, oldest → newest (the tail of the history)
    recent_liked: npt.NDArray[np.bool_]
    excluded: IntArray  # sorted unique item indexes never to return (consumed, shown, excluded)
    embedding: FloatArray | None = None  # the two-tower user embedding, when computed
    engaged_authors: IntArray = field(default_factory=lambda: EMPTY_INT)  # author tokens, most engaged first
    engaged_author_weights: FloatArray = field(default_factory=lambda: EMPTY_FLOAT)

    @property
    def cold_start(self) -> bool:
        return self.user_index < 0 or self.recent_items.shape[0] == 0


def engaged_authors(
    core: CoreArtifacts, items: npt.NDArray[np.int32], liked: npt.NDArray[np.bool_], limit: int = 10
) -> tuple[IntArray, FloatArray]:
    """Authors of a user's items, weighted by engagement (a like counts double)."""
    if items.shape[0] == 0:
        return EMPTY_INT, EMPTY_FLOAT
    authors = np.asarray(core.catalogue.authors)[items]
    weights = 1.0 + liked.astype(np.float32)
    known = authors > 0
    if not known.any():
        return EMPTY_INT, EMPTY_FLOAT
    unique, inverse = np.unique(authors[known], return_inverse=True)
    totals = np.bincount(inverse, weights=weights[known]).astype(np.float32)
    order = np.argsort(-totals, kind="stable")[:limit]
    return unique[order].astype(np.int32), totals[order] / totals[order].sum()


def build_query(
    core: CoreArtifacts,
    user_index: int,
    *,
    recent_limit: int = 20,
    region_token: int | None = None,
    extra_excluded: npt.NDArray[np.int64] | None = None,
    history_items: npt.NDArray[np.int32] | None = None,
    history_liked: npt.NDArray[np.bool_] | None = None,
) -> UserQuery:
    """A query from the stored history (or a given one, e.g. from the feature store)."""
    if history_items is None:
        if 0 <= user_index < core.users.n_users:
            history_items = np.asarray(core.history.items.row(user_index), dtype=np.int32)
            ratings = np.asarray(core.history.ratings.row(user_index))
            history_liked = _liked(core, ratings)
        else:
            history_items = EMPTY_INT
            history_liked = np.zeros(0, dtype=bool)
    assert history_liked is not None
    if region_token is None:
        region_token = int(core.users.regions[user_index]) if 0 <= user_index < core.users.n_users else 0
    excluded = history_items if extra_excluded is None else np.concatenate([history_items, extra_excluded])
    authors, weights = engaged_authors(core, history_items, history_liked)
    return UserQuery(
        user_index=user_index,
        region_token=region_token,
        recent_items=history_items[-recent_limit:],
        recent_liked=history_liked[-recent_limit:],
        excluded=np.unique(excluded.astype(np.int32)),
        engaged_authors=authors,
        engaged_author_weights=weights,
    )


def liked_mask(threshold: float | None, ratings: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
    """Which ratings are likes: at or above the threshold; every interaction when the data
    has no rating (no threshold, or only NaN ratings)."""
    ratings = np.asarray(ratings)
    if threshold is None or np.isnan(ratings).all():
        return np.ones(ratings.shape[0], dtype=bool)
    return np.asarray(np.nan_to_num(ratings, nan=-np.inf) >= threshold)


def _liked(core: CoreArtifacts, ratings: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    return liked_mask(core.like_threshold, ratings)
