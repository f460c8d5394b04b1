"""Factories shared by the feature store tests: a tiny model version's core arrays."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from recsys.artifacts import (
    AuthorIndex,
    Catalogue,
    CoreArtifacts,
    Popularity,
    Ragged,
    Statistics,
    UserBase,
    UserHistory,
)
from recsys.feature_store.redis_store import parse_redis_url
from recsys.neighbors import PAD, NeighborTable

Interaction = tuple[int, int, float]  # item index, unix time, rating

TINY_HISTORIES: Mapping[str, Sequence[Interaction]] = {
    "alice": [(0, 1_700_000_000, 4.0), (3, 1_700_000_100, 2.5), (5, 1_700_000_200, 5.0)],
    "bob": [(2, 1_700_000_050, float("nan"))],
    "carol": [],  # no history, but a region: still has a snapshot
    "dave": [],  # no history, no region: reads as an unknown user
}
TINY_REGIONS: Mapping[str, int] = {"alice": 1, "bob": 0, "carol": 2, "dave": 0}


def tiny_core(
    histories: Mapping[str, Sequence[Interaction]] = TINY_HISTORIES,
    regions: Mapping[str, int] = TINY_REGIONS,
    n_items: int = 6,
) -> CoreArtifacts:
    """A minimal, self-consistent CoreArtifacts: the users of `histories` (in that order)
    with those interactions (each row oldest → newest) and region tokens."""
    users = list(histories)
    rows = [sorted(histories[user], key=lambda interaction: interaction[1]) for user in users]
    flat = [interaction for row in rows for interaction in row]
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])

    def ragged(values: Sequence[object], dtype: type) -> Ragged:
        return Ragged(offsets.copy(), np.array(values, dtype=dtype))

    region_vocab = np.array(["north", "south"], dtype=np.str_)
    no_neighbors = NeighborTable(
        np.full((n_items, 1), PAD, dtype=np.int32), np.zeros((n_items, 1), dtype=np.float32)
    )
    empty_rows = Ragged(np.zeros(len(region_vocab) + 1, dtype=np.int64), np.zeros(0, dtype=np.int32))
    return CoreArtifacts(
        catalogue=Catalogue(
            item_ids=np.array([f"item-{index}" for index in range(n_items)], dtype=np.str_),
            titles=np.array([f"Title {index}" for index in range(n_items)], dtype=np.str_),
            categories=np.zeros((n_items, 1), dtype=np.int32),
            category_vocab=np.zeros(0, dtype=np.str_),
            authors=np.zeros(n_items, dtype=np.int32),
            author_vocab=np.zeros(0, dtype=np.str_),
            item_time=np.full(n_items, np.nan, dtype=np.float32),
        ),
        users=UserBase(
            user_ids=np.array(users, dtype=np.str_),
            regions=np.array([regions.get(user, 0) for user in users], dtype=np.int32),
            region_vocab=region_vocab,
        ),
        history=UserHistory(
            items=ragged([item for item, _, _ in flat], np.int32),
            times=ragged([moment for _, moment, _ in flat], np.int64),
            ratings=ragged([rating for _, _, rating in flat], np.float32),
        ),
        popularity=Popularity(
            global_scores=np.zeros(n_items, dtype=np.float32),
            global_top=np.arange(n_items, dtype=np.int32),
            by_region=empty_rows,
            by_region_scores=Ragged(empty_rows.offsets, np.zeros(0, dtype=np.float32)),
        ),
        authors=AuthorIndex(
            items=Ragged(np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.int32)),
            scores=Ragged(np.zeros(2, dtype=np.int64), np.zeros(0, dtype=np.float32)),
        ),
        statistics=Statistics(
            user_stats=np.zeros((len(users), 1), dtype=np.float32),
            item_stats=np.zeros((n_items, 1), dtype=np.float32),
            user_stat_names=("interactions",),
            item_stat_names=("interactions",),
        ),
        itemcf=no_neighbors,
        swing=no_neighbors,
        like_threshold=4.0,
    )


# -- the real Redis the tests use: a unique key prefix per test, every key deleted after -----
REDIS_URL = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex}"


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> int:
    """Delete every key under `prefix` (only those: never a FLUSHDB). A cluster URL is
    scanned on every master, and each key deleted on its own (they live in many slots)."""
    target, cluster = parse_redis_url(url)
    client: Redis | RedisCluster = RedisCluster.from_url(target) if cluster else Redis.from_url(target)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1_000)]
        deleted = 0
        for key in keys:
            deleted += int(await client.delete(key))
        return deleted
    finally:
        await client.aclose()
