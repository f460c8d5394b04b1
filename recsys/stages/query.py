"""The frozen, typed query every stage reads: who the user is and what they did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from recsys.artifacts import CoreArtifacts, FloatArray, IntArray

if TYPE_CHECKING:
    from recsys.feature_store import UserState

EMPTY_INT = np.zeros(0, dtype=np.int32)
EMPTY_FLOAT = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class UserQuery:
    """One user as the recall stages see them. An id the model version has never seen
    (`user_index` −1) is still a real user when their live events name items the version
    knows: those items are their history (`recent_items`, `excluded`, the engaged authors),
    and the user tower reads them beside user token 0."""

    user_index: int  # −1: unknown to this model version
    region_token: int  # 0: unknown
    recent_items: IntArray  # item indexes, oldest → newest (the tail of the history)
    recent_liked: npt.NDArray[np.bool_]
    excluded: IntArray  # sorted unique item indexes never to return (consumed, shown, excluded)
    embedding: FloatArray | None = None  # the two-tower user embedding, when computed
    engaged_authors: IntArray = field(default_factory=lambda: EMPTY_INT)  # author tokens, most engaged first
    engaged_author_weights: FloatArray = field(default_factory=lambda: EMPTY_FLOAT)
    # The whole history (oldest → newest) for a channel that reads further back than
    # `recent_items`; None: `recent_items` is all the query has.
    history_items: IntArray | None = None
    history_liked: npt.NDArray[np.bool_] | None = None

    @property
    def cold_start(self) -> bool:
        """No usable history: neither the version's history of a known user nor a live
        event on an item the version knows. Whether the id is known does not decide it: a
        new user who clicked three items gets the personalised channels, not popularity."""
        return bool(self.recent_items.shape[0] == 0)

    def last_items(self, count: int) -> tuple[IntArray, npt.NDArray[np.bool_]]:
        """The newest `count` items of the whole history and their liked flags (0: `recent_items`)."""
        if count <= 0 or self.history_items is None or self.history_liked is None:
            return self.recent_items, self.recent_liked
        return self.history_items[-count:], self.history_liked[-count:]


@dataclass(frozen=True)
class UserHistory:
    """A user's history as the feature store holds it: the version's snapshot, then the
    consumed live events (oldest → newest) whose items the version knows, with liked flags,
    and the profile's region token (0: none). Recall hydrates it once and passes it on, so
    rank scores from exactly what recall saw without reading the feature store again."""

    items: IntArray
    liked: npt.NDArray[np.bool_]
    region: int

    @classmethod
    def from_state(
        cls, state: UserState, item_lookup: Mapping[str, int], like_threshold: float | None
    ) -> UserHistory:
        snapshot = state.snapshot
        consumed = [event for event in state.live_events if event.consumes]
        items = snapshot.items.astype(np.int32)
        liked = liked_mask(like_threshold, snapshot.ratings)
        if consumed:
            live = np.asarray([item_lookup.get(event.item_id, -1) for event in consumed], np.int32)
            values = np.asarray([event.value for event in consumed], dtype=np.float32)
            ratings = np.asarray([event.kind == "rating" for event in consumed], dtype=bool)
            # A click or a like is a like; a rating is one when it reaches the threshold (each
            # judged alone, as liked_mask judges a one-rating history: NaN counts as liked).
            if like_threshold is None:
                live_liked = np.ones(len(consumed), dtype=bool)
            else:
                live_liked = ~ratings | np.isnan(values) | (values >= like_threshold)
            known = live >= 0
            items = np.concatenate([items, live[known]])
            liked = np.concatenate([liked, live_liked[known]])
        return cls(items, liked, max(0, int(snapshot.region)))

    def last(self, count: int) -> UserHistory:
        """The most recent `count` entries (what the ranker's history inputs hold)."""
        if self.items.shape[0] <= count:
            return self
        return UserHistory(self.items[-count:], self.liked[-count:], self.region)


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
        history_items=history_items,
        history_liked=history_liked,
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
