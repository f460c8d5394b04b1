"""Candidate sources: the recall channels' math, vectorised numpy over the version's arrays.

Each source answers `candidates(query, quota)` with at most `quota` items the query does
not exclude, best first, and their scores. Sources are synchronous and CPU-bound: the
recall service runs them off its event loop; offline evaluation calls them directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from recsys.artifacts import AuthorIndex, FloatArray, IntArray, Popularity
from recsys.neighbors import NeighborTable
from recsys.stages.query import EMPTY_FLOAT, EMPTY_INT, UserQuery


@dataclass(frozen=True)
class Candidates:
    items: IntArray  # best first
    scores: FloatArray

    @classmethod
    def empty(cls) -> Candidates:
        return cls(EMPTY_INT, EMPTY_FLOAT)

    def __len__(self) -> int:
        return int(self.items.shape[0])


class CandidateSource(Protocol):
    @property
    def identifier(self) -> str: ...

    def candidates(self, query: UserQuery, quota: int) -> Candidates: ...


def not_excluded(items: npt.NDArray[Any], excluded: IntArray) -> npt.NDArray[np.bool_]:
    """Mask of `items` not in the sorted array `excluded` (binary search, no per-request
    catalogue-sized allocation)."""
    if excluded.shape[0] == 0:
        return np.ones(items.shape[0], dtype=bool)
    position = np.searchsorted(excluded, items)
    position[position == excluded.shape[0]] = 0
    return np.asarray(excluded[position] != items)


def group_sum(
    items: npt.NDArray[Any], weights: npt.NDArray[Any], n_items: int | None = None
) -> tuple[npt.NDArray[Any], FloatArray]:
    """Sum `weights` per distinct item: (distinct items ascending, their sums). A sort and a
    `reduceat`: several times faster than `np.unique(return_inverse=True)` + `bincount` on
    the few thousand entries a request usually aggregates. When the entries are many for the
    catalogue (`n_items` given, more than a quarter of it: a long history × a deep table), two
    catalogue-sized `bincount`s replace the sort (Book-Crossing's heaviest users aggregate
    500 × 400 entries: a sort of 200,000 took ~15 ms)."""
    if items.shape[0] == 0:
        return items, np.zeros(0, np.float32)
    if n_items is not None and 4 * items.shape[0] > n_items:
        indexes = np.asarray(items, dtype=np.intp)
        present = np.flatnonzero(np.bincount(indexes, minlength=n_items))
        totals = np.bincount(indexes, weights=np.asarray(weights, np.float64), minlength=n_items)
        return present.astype(items.dtype), totals[present].astype(np.float32)
    order = np.argsort(items, kind="stable")
    ordered = items[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], np.add.reduceat(np.asarray(weights, np.float64)[order], starts).astype(np.float32)


def top_candidates(
    items: npt.NDArray[Any], scores: npt.NDArray[Any], quota: int, excluded: IntArray
) -> Candidates:
    """The best `quota` of (items, scores) whose items are not excluded, best first."""
    keep = not_excluded(items, excluded) & (scores > 0)
    items, scores = items[keep], scores[keep]
    if quota <= 0 or items.shape[0] == 0:
        return Candidates.empty()
    if items.shape[0] > quota:
        best = np.argpartition(-scores, quota - 1)[:quota]
        items, scores = items[best], scores[best]
    order = np.argsort(-scores, kind="stable")
    return Candidates(items[order].astype(np.int32), scores[order].astype(np.float32))


def recency_rating_weights(liked: npt.NDArray[np.bool_], decay: float, liked_boost: float) -> FloatArray:
    """Weight of each item of a history (oldest → newest): newest 1, then ×decay per step back;
    liked items boosted."""
    n = liked.shape[0]
    age = np.arange(n - 1, -1, -1, dtype=np.float32)  # 0 for the newest
    weights = np.power(np.float32(decay), age) * np.where(liked, liked_boost, 1.0)
    return weights.astype(np.float32)


class NeighborSource:
    """Item-to-item recall (ItemCF, Swing, EASE): the user's recent items × each one's top-K
    neighbours, aggregated with recency/rating weights, vectorised.

    `history_items`: how many of the newest history items to read (0: the query's
    `recent_items`, the version's `recent_items` setting)."""

    def __init__(
        self,
        identifier: str,
        table: NeighborTable,
        *,
        decay: float = 0.9,
        liked_boost: float = 2.0,
        neighbors_per_item: int | None = None,
        history_items: int = 0,
    ) -> None:
        self._identifier = identifier
        self._neighbors = np.asarray(table.neighbors)
        self._scores = np.asarray(table.scores)
        self._decay = decay
        self._liked_boost = liked_boost
        self._per_item = neighbors_per_item or table.neighbors.shape[1]
        self._history_items = history_items

    @property
    def identifier(self) -> str:
        return self._identifier

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        items, liked = query.last_items(self._history_items)
        if items.shape[0] == 0 or quota <= 0:
            return Candidates.empty()
        weights = recency_rating_weights(liked, self._decay, self._liked_boost)
        neighbors = self._neighbors[items, : self._per_item]
        scores = self._scores[items, : self._per_item] * weights[:, None]
        valid = neighbors >= 0
        unique, totals = group_sum(neighbors[valid], scores[valid], self._neighbors.shape[0])
        return top_candidates(unique, totals, quota, query.excluded)


class RankedListSource:
    """A precomputed ranked list, best first (global popularity)."""

    def __init__(self, identifier: str, items: IntArray, scores: FloatArray) -> None:
        self._identifier = identifier
        self._items = np.asarray(items)
        self._scores = np.asarray(scores, dtype=np.float32)

    @property
    def identifier(self) -> str:
        return self._identifier

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        return _first_allowed(self._items, self._scores, quota, query.excluded)


def _first_allowed(
    items: npt.NDArray[Any], scores: npt.NDArray[Any], quota: int, excluded: IntArray
) -> Candidates:
    """The first `quota` allowed entries of a list already sorted best first."""
    if quota <= 0 or items.shape[0] == 0:
        return Candidates.empty()
    # Look only as far as needed: quota plus everything that could be excluded.
    window = min(items.shape[0], quota + excluded.shape[0])
    head_items, head_scores = items[:window], scores[:window]
    keep = not_excluded(head_items, excluded)
    return Candidates(
        np.asarray(head_items[keep][:quota], dtype=np.int32),
        np.asarray(head_scores[keep][:quota], np.float32),
    )


def popular_source(popularity: Popularity) -> RankedListSource:
    top = np.asarray(popularity.global_top)
    return RankedListSource("popular", top, np.asarray(popularity.global_scores)[top])


class GeoSource:
    """Popular items in the user's region (the request's region, else the profile's)."""

    identifier = "geo"

    def __init__(self, popularity: Popularity) -> None:
        self._lists = popularity.by_region
        self._scores = popularity.by_region_scores

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        token = query.region_token
        if token <= 0 or token >= self._lists.n_rows:
            return Candidates.empty()
        return _first_allowed(self._lists.row(token), self._scores.row(token), quota, query.excluded)


class AuthorSource:
    """Authors the user engaged with → their best and newest items."""

    identifier = "author"

    def __init__(self, authors: AuthorIndex, per_author: int = 50) -> None:
        self._items = authors.items
        self._scores = authors.scores
        self._per_author = per_author

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        if query.engaged_authors.shape[0] == 0 or quota <= 0:
            return Candidates.empty()
        items: list[npt.NDArray[Any]] = []
        scores: list[npt.NDArray[Any]] = []
        for author, weight in zip(query.engaged_authors, query.engaged_author_weights, strict=True):
            if 0 < author < self._items.n_rows:
                items.append(self._items.row(int(author))[: self._per_author])
                scores.append(self._scores.row(int(author))[: self._per_author] * weight)
        if not items:
            return Candidates.empty()
        unique, totals = group_sum(np.concatenate(items), np.concatenate(scores))
        return top_candidates(unique, totals, quota, query.excluded)


class EmbeddingIndex(Protocol):
    """Nearest-neighbour search over item embeddings (hnswlib in production, exact in tests)."""

    def search(self, vector: FloatArray, k: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """Item indexes and inner-product similarities, best first."""


class TwoTowerAnnSource:
    """Nearest items to the user embedding (computed by the user tower beforehand and put
    on the query), over-fetching enough to survive the exclusions."""

    identifier = "two_tower"

    def __init__(self, index: EmbeddingIndex, max_overfetch: int = 500) -> None:
        self._index = index
        self._max_overfetch = max_overfetch

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        if query.embedding is None or quota <= 0:
            return Candidates.empty()
        k = quota + min(query.excluded.shape[0], self._max_overfetch)
        items, similarity = self._index.search(query.embedding, k)
        # Similarities are cosines in [−1, 1]; shift so every returned item has a positive score.
        return top_candidates(
            items.astype(np.int32), (similarity + 1.0).astype(np.float32), quota, query.excluded
        )


def engaged_categories(
    categories: npt.NDArray[Any], items: npt.NDArray[Any], liked: npt.NDArray[np.bool_], limit: int = 10
) -> tuple[IntArray, FloatArray]:
    """Category tokens of a user's items (a version's `Catalogue.categories` rows), weighted
    by engagement (a like counts double), most engaged first, weights summing to 1."""
    if items.shape[0] == 0 or categories.shape[1] == 0:
        return EMPTY_INT, EMPTY_FLOAT
    rows = np.asarray(categories)[np.asarray(items, dtype=np.int64)]
    weights = np.broadcast_to((1.0 + liked.astype(np.float32))[:, None], rows.shape)
    present = rows > 0
    if not present.any():
        return EMPTY_INT, EMPTY_FLOAT
    unique, totals = group_sum(rows[present], weights[present])
    order = np.argsort(-totals, kind="stable")[:limit]
    return unique[order].astype(np.int32), (totals[order] / totals[order].sum()).astype(np.float32)


CATEGORY_HISTORY = 100  # the newest history items whose categories say what a user engages with


class NewItemSource:
    """Items upserted while serving (the live catalogue, `recsys.catalogue.NewItems`), for
    the course's simple cold-start channel: first the new items by the authors and in the
    categories the user engaged with, newest first; then every other new item, newest first,
    so that a brand-new item with an author and categories nobody knows still reaches users.

    Score: `2 + freshness` for a match, `freshness` otherwise, with freshness = 1 / (1 + age
    in days) in (0, 1], so a match always comes first and, within each tier, the newest.
    Until a content tower embeds new items, this is what brings them to recall at all."""

    identifier = "new_items"

    def __init__(
        self,
        items: IntArray,
        times: npt.NDArray[Any],
        authors: IntArray,
        categories: IntArray,
        version_categories: npt.NDArray[Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`items`: dense indexes of the servable new items; `times` (unix seconds),
        `authors` (tokens) and `categories` ([n, k] tokens) aligned with them;
        `version_categories`: the version's `Catalogue.categories`, to read the user's."""
        self._items = np.asarray(items, dtype=np.int32)
        self._times = np.asarray(times, dtype=np.float64)
        self._authors = np.asarray(authors, dtype=np.int32)
        self._categories = np.asarray(categories, dtype=np.int32)
        self._version_categories = version_categories
        self._clock = clock

    def __len__(self) -> int:
        return int(self._items.shape[0])

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        if quota <= 0 or self._items.shape[0] == 0:
            return Candidates.empty()
        age_days = np.maximum(self._clock() - self._times, 0.0) / 86_400.0
        scores = 1.0 / (1.0 + age_days)
        matched = np.zeros(self._items.shape[0], dtype=bool)
        for author in query.engaged_authors.tolist():
            if author > 0:
                matched |= self._authors == author
        history, history_liked = query.last_items(CATEGORY_HISTORY)
        if self._categories.shape[1] and history.shape[0]:
            inside = history < self._version_categories.shape[0]
            categories, _ = engaged_categories(
                self._version_categories, history[inside], history_liked[inside]
            )
            if categories.shape[0]:
                matched |= np.isin(self._categories, categories).any(axis=1)
        scores = np.where(matched, 2.0 + scores, scores).astype(np.float32)
        return top_candidates(self._items, scores, quota, query.excluded)


LOOK_ALIKE_ENGAGERS = 50  # the first K users who engaged with a new item make its vector


def unit_rows(vectors: npt.NDArray[Any]) -> FloatArray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    scaled: FloatArray = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return scaled.astype(np.float32)


def look_alike_vectors(
    engagers: Sequence[Sequence[int]], user_embeddings: npt.NDArray[Any], limit: int = LOOK_ALIKE_ENGAGERS
) -> tuple[FloatArray, IntArray]:
    """Per item, the L2-normalised mean of the (L2-normalised) embeddings of its first
    `limit` engagers (`engagers[i]`: rows of `user_embeddings`, first engager first), and how
    many engagers each vector averages (0: no vector, a zero row). Each user counts as much
    as any other: normalising first keeps a user with a long history (a large embedding)
    from pulling the item to themselves."""
    if limit < 1:
        raise ValueError(f"limit: expected at least 1, got {limit}")
    users = unit_rows(user_embeddings)
    dim = int(users.shape[1]) if users.ndim == 2 else 0
    vectors = np.zeros((len(engagers), dim), np.float32)
    counts = np.zeros(len(engagers), np.int32)
    for position, rows in enumerate(engagers):
        first = np.asarray(list(dict.fromkeys(rows))[:limit], dtype=np.int64)  # distinct, in order
        if first.shape[0]:
            vectors[position] = users[first].sum(axis=0)
            counts[position] = first.shape[0]
    return unit_rows(vectors), counts


class LookAlikeSource:
    """New items pulled towards the users who first engaged with them (the look-alike
    channel): each new item with at least one engager has a vector, the normalised mean of
    its first engagers' user-tower embeddings (`look_alike_vectors`); a user gets the items
    whose vector is nearest their own embedding (cosine). An item nobody engaged with yet has
    no vector and is never returned (the new_items channel and a content tower place it).

    One implementation for serving (recall rebuilds it off the request path when engagers
    change, `services.recall.look_alike`) and for the cold-start evaluation: a request costs
    one [items × dim] product with the user embedding the two-tower channel computes."""

    identifier = "look_alike"

    def __init__(self, items: IntArray, vectors: npt.NDArray[Any]) -> None:
        """`items`: dense indexes of the new items that have a vector; `vectors`: [n, dim]
        aligned with them (unit length; zero rows are dropped)."""
        items = np.asarray(items, dtype=np.int32)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != items.shape[0]:
            raise ValueError(f"vectors: expected [{items.shape[0]}, dim], got {list(vectors.shape)}")
        present = np.linalg.norm(vectors, axis=1) > 0
        self._items: IntArray = items[present]
        self._vectors = unit_rows(vectors[present])

    def __len__(self) -> int:
        return int(self._items.shape[0])

    @property
    def items(self) -> IntArray:
        return self._items

    def scores(self, embedding: npt.NDArray[Any]) -> FloatArray:
        """Cosine of each item's vector with the user embedding, aligned with `items`."""
        user = unit_rows(np.asarray(embedding, dtype=np.float32).reshape(1, -1))[0]
        if user.shape[0] != self._vectors.shape[1]:
            raise ValueError(f"embedding: expected {self._vectors.shape[1]} values, got {user.shape[0]}")
        return np.asarray(self._vectors @ user, dtype=np.float32)

    def candidates(self, query: UserQuery, quota: int) -> Candidates:
        if query.embedding is None or quota <= 0 or self._items.shape[0] == 0:
            return Candidates.empty()
        # Cosines are in [−1, 1]; shifted like the two-tower channel's so all are positive.
        return top_candidates(self._items, self.scores(query.embedding) + 1.0, quota, query.excluded)
