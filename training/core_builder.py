"""Training interactions → the core artifacts: histories, popularity (global and per
region, recency-decayed), items per author, statistics, ItemCF and Swing tables.

Called with the training part only (see `training.encode.holdout_split`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import (
    AuthorIndex,
    Catalogue,
    CoreArtifacts,
    FloatArray,
    Popularity,
    Ragged,
    Statistics,
    UserBase,
    UserHistory,
)
from training.cf import build_itemcf, build_swing
from training.encode import Interactions

USER_STATS = ("log_interactions", "mean_rating", "like_rate")
ITEM_STATS = ("log_interactions", "mean_rating", "like_rate", "log_popularity")


@dataclass(frozen=True)
class CoreConfig:
    popularity_half_life_days: float = 60.0
    top_popular: int = 1000
    top_per_region: int = 500
    neighbors: int = 100
    swing_alpha: float = 1.0
    max_items_per_user: int | None = 1000
    max_users_per_item: int | None = 200
    seed: int = 0
    # "spark": every core artifact on Spark (training/spark_core.py, spark_cf.py), the same files.
    engine: str = "numpy"
    spark_master: str = "local[*]"
    # Extra Spark settings (`recsys build` reads them from RECSYS_SPARK_CONF), e.g. Spark on
    # Kubernetes' namespace, executor image and driver address.
    spark_conf: tuple[tuple[str, str], ...] = ()

    def recorded(self) -> dict[str, Any]:
        """The configuration as a version's manifest records it: the Spark settings by name only,
        since their values may carry credentials (a storage key, an authentication secret)."""
        return dataclasses.asdict(self) | {"spark_conf": [key for key, _ in self.spark_conf]}


def recency_weights(time: npt.NDArray[np.int64], half_life_days: float) -> FloatArray:
    """exp-decay weight of each interaction relative to the newest one (1.0 when no time)."""
    if time.size == 0 or not time.any():
        return np.ones(time.shape[0], dtype=np.float32)
    age_days = (time.max() - time).astype(np.float64) / 86_400.0
    weights: FloatArray = np.exp(-math.log(2.0) * age_days / half_life_days).astype(np.float32)
    return weights


def build_history(train: Interactions, n_users: int) -> UserHistory:
    rows = np.arange(len(train))
    order = np.lexsort((rows, train.time, train.user))
    user = train.user[order]
    items = Ragged.from_groups(user, train.item[order].astype(np.int32), n_users)
    return UserHistory(
        items=items,
        times=Ragged(items.offsets, train.time[order].astype(np.int64)),
        ratings=Ragged(items.offsets, train.rating[order].astype(np.float32)),
    )


def top_items(scores: FloatArray, count: int) -> npt.NDArray[np.int32]:
    """The `count` best items with a positive score, best first (the list both engines publish:
    Spark hands each region's dense row to this function)."""
    positive = np.flatnonzero(scores > 0)
    count = min(count, positive.shape[0])
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    best = positive[np.argpartition(-scores[positive], count - 1)[:count]]
    return best[np.argsort(-scores[best], kind="stable")].astype(np.int32)


def build_popularity(train: Interactions, users: UserBase, n_items: int, config: CoreConfig) -> Popularity:
    weight = recency_weights(train.time, config.popularity_half_life_days)
    global_scores = np.bincount(train.item, weights=weight, minlength=n_items).astype(np.float32)
    n_regions = int(users.region_vocab.shape[0]) + 1
    region = np.asarray(users.regions, dtype=np.int64)[train.user]
    key = region * n_items + train.item
    per_region = np.bincount(key, weights=weight, minlength=n_regions * n_items)
    regions: list[tuple[npt.NDArray[np.int32], FloatArray]] = [
        (np.zeros(0, np.int32), np.zeros(0, np.float32))
    ]
    for token in range(1, n_regions):  # token 0 (unknown region) keeps its empty list
        row = per_region[token * n_items : (token + 1) * n_items].astype(np.float32)
        top = top_items(row, config.top_per_region)
        regions.append((top, row[top]))
    return assemble_popularity(global_scores, regions, config)


def assemble_popularity(
    global_scores: FloatArray,
    regions: Sequence[tuple[npt.NDArray[np.int32], FloatArray]],
    config: CoreConfig,
) -> Popularity:
    """`Popularity` from the float32 global scores and each region token's (top items, scores),
    token 0 first."""
    offsets = np.zeros(len(regions) + 1, dtype=np.int64)
    np.cumsum([len(items) for items, _ in regions], out=offsets[1:])
    return Popularity(
        global_scores=global_scores,
        global_top=top_items(global_scores, config.top_popular),
        by_region=Ragged(offsets, np.concatenate([items for items, _ in regions]).astype(np.int32)),
        by_region_scores=Ragged(
            offsets, np.concatenate([scores for _, scores in regions]).astype(np.float32)
        ),
    )


def build_author_index(catalogue: Catalogue, popularity: Popularity) -> AuthorIndex:
    """Each author's items, best first: popularity, with a bonus for newer items."""
    n_authors = int(catalogue.author_vocab.shape[0]) + 1
    authors = np.asarray(catalogue.authors, dtype=np.int64)
    pop = np.log1p(popularity.global_scores.astype(np.float64))
    item_time = np.nan_to_num(
        catalogue.item_time.astype(np.float64),
        nan=float(np.nanmin(catalogue.item_time)) if np.isfinite(catalogue.item_time).any() else 0.0,
    )
    span = float(item_time.max() - item_time.min()) or 1.0
    newness = (item_time - item_time.min()) / span
    score = (pop / (pop.max() or 1.0) + 0.25 * newness).astype(np.float32)
    items = np.flatnonzero(authors > 0)
    order = np.lexsort((-score[items], authors[items]))
    items = items[order]
    grouped = Ragged.from_groups(authors[items], items.astype(np.int32), n_authors)
    return AuthorIndex(items=grouped, scores=Ragged(grouped.offsets, score[items]))


@dataclass(frozen=True)
class EntitySums:
    """Per user (or per item) sums over the interactions, the inputs of the statistics."""

    count: npt.NDArray[np.float64]  # interactions
    rated: npt.NDArray[np.float64]  # interactions with a rating
    rating_total: npt.NDArray[np.float64]  # sum of those ratings
    likes: npt.NDArray[np.float64]  # liked interactions


@dataclass(frozen=True)
class RatingSummary:
    """The training ratings' mean and spread (population standard deviation), NaN ignored."""

    mean: float
    spread: float


def build_statistics(train: Interactions, n_users: int, n_items: int, popularity: Popularity) -> Statistics:
    has_rating = ~np.isnan(train.rating)

    def sums(group: npt.NDArray[np.int32], size: int) -> EntitySums:
        return EntitySums(
            count=np.bincount(group, minlength=size).astype(np.float64),
            rated=np.bincount(group[has_rating], minlength=size).astype(np.float64),
            rating_total=np.asarray(
                np.bincount(group[has_rating], weights=train.rating[has_rating], minlength=size), np.float64
            ),
            likes=np.asarray(
                np.bincount(group, weights=train.liked.astype(np.float64), minlength=size), np.float64
            ),
        )

    ratings = (
        RatingSummary(float(np.nanmean(train.rating)), float(np.nanstd(train.rating)))
        if has_rating.any()
        else RatingSummary(0.0, 1.0)
    )
    return assemble_statistics(sums(train.user, n_users), sums(train.item, n_items), ratings, popularity)


def assemble_statistics(
    users: EntitySums, items: EntitySums, ratings: RatingSummary, popularity: Popularity
) -> Statistics:
    """The normalised statistics from the sums (both engines' last step)."""

    def per(sums: EntitySums) -> FloatArray:
        # Shrink means of rarely rated entities towards the global mean.
        mean = (sums.rating_total + 5.0 * ratings.mean) / (sums.rated + 5.0)
        like_rate = (sums.likes + 1.0) / (sums.count + 2.0)
        count = sums.count
        log_count = np.log1p(count) / max(math.log1p(count.max() if count.size else 1.0), 1e-9)
        columns = [log_count, (mean - ratings.mean) / (ratings.spread or 1.0), like_rate]
        return np.stack(columns, axis=1).astype(np.float32)

    user_stats = per(users)
    item_stats = per(items)
    log_pop = np.log1p(popularity.global_scores.astype(np.float64))
    log_pop /= log_pop.max() or 1.0
    item_stats = np.concatenate([item_stats, log_pop[:, None].astype(np.float32)], axis=1)
    return Statistics(user_stats, item_stats, USER_STATS, ITEM_STATS)


def build_core(
    train: Interactions,
    catalogue: Catalogue,
    users: UserBase,
    config: CoreConfig,
    like_threshold: float | None,
    progress: Callable[[str], None] | None = None,
) -> CoreArtifacts:
    def step(name: str) -> None:
        if progress is not None:
            progress(name)

    if config.engine == "spark":
        return _core_on_spark(train, catalogue, users, config, like_threshold, step)
    n_users, n_items = users.n_users, catalogue.n_items
    step("history")
    history = build_history(train, n_users)
    step("popularity")
    popularity = build_popularity(train, users, n_items, config)
    authors = build_author_index(catalogue, popularity)
    statistics = build_statistics(train, n_users, n_items, popularity)
    like_weight = 1.0 + train.liked.astype(np.float32)
    step("itemcf")
    itemcf = build_itemcf(
        train.user,
        train.item,
        like_weight,
        n_users,
        n_items,
        top_k=config.neighbors,
        max_items_per_user=config.max_items_per_user,
        order=train.time,
    )
    step("swing")
    swing = build_swing(
        train.user,
        train.item,
        n_users,
        n_items,
        top_k=config.neighbors,
        alpha=config.swing_alpha,
        max_users_per_item=config.max_users_per_item,
        max_items_per_user=config.max_items_per_user,
        order=train.time,
        seed=config.seed,
    )
    return CoreArtifacts(
        catalogue=catalogue,
        users=users,
        history=history,
        popularity=popularity,
        authors=authors,
        statistics=statistics,
        itemcf=itemcf,
        swing=swing,
        like_threshold=like_threshold,
    )


def _core_on_spark(
    train: Interactions,
    catalogue: Catalogue,
    users: UserBase,
    config: CoreConfig,
    like_threshold: float | None,
    step: Callable[[str], None],
) -> CoreArtifacts:
    """The whole core on `config.spark_master` (training/spark_core.py), from the training
    interactions handed to Spark as Arrow once and cached: `recsys build` encodes and splits in
    numpy, so the table is in this process anyway; a job whose data Spark reads itself starts
    from `spark_core.read_interactions` instead."""
    from training import spark_cf, spark_core

    spark = spark_cf.spark_session(config.spark_master, **dict(config.spark_conf))
    frame = spark_core.interactions_frame(spark, train).cache()
    try:
        return spark_core.build_core(frame, catalogue, users, config, like_threshold, step)
    finally:
        frame.unpersist()
