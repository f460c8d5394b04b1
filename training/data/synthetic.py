"""Seeded synthetic data at any scale → `RawData` (int64 ids), fully vectorised numpy.

The generator mimics the shapes that matter to a recommender:

- item popularity follows a Zipf law (exponent 1) over a random permutation of the ids;
- user activity is log-normal, so a few users are far more active than most;
- users live in regions of Zipf-distributed sizes; every item has a home region, and a share
  of each user's interactions is drawn from the home items of the user's region (by the same
  popularity), so popularity per region differs from the global one;
- every item has one author; author catalogue sizes are log-normal; an author's first
  category is shared by all their items (1–3 categories per item);
- ratings 1–5 rise with an item's popularity; timestamps are uniform over 2023; item_time is a
  release year, recent years more likely.

(user, item) pairs are drawn first; duplicate pairs are removed and replaced by new draws
until the requested count is reached (a catalogue too small for that gives fewer; the report
says how many pairs were drawn and kept). Ratings and times are then drawn for the distinct
pairs. With time, interactions are in time order; without, in random order.

Speed: draws are multinomial counts expanded and shuffled (linear time, no per-draw binary
search), so 10M interactions over 1M items take seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np
import pandas as pd

from training.data.raw import LoadReport, RawData, interactions_frame, items_frame, users_frame

NAME: Final = "synthetic"
LIKE_THRESHOLD: Final = 4.0
ITEM_ZIPF_EXPONENT: Final = 1.0
REGION_ZIPF_EXPONENT: Final = 1.0
CATEGORY_ZIPF_EXPONENT: Final = 0.8
USER_ACTIVITY_SIGMA: Final = 1.0
AUTHOR_SIZE_SIGMA: Final = 1.2
LOCAL_SHARE: Final = 0.3  # of interactions drawn from the user's region's home items
ITEMS_PER_AUTHOR: Final = 10  # default author count = items / this
MAX_ROUNDS: Final = 8  # of drawing (user, item) pairs to replace duplicates
START: Final = 1_672_531_200  # 2023-01-01T00:00:00Z
SPAN_SECONDS: Final = 365 * 86_400
LATEST_YEAR: Final = 2023

IntArray = np.ndarray[Any, np.dtype[np.int64]]
FloatArray = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True)
class SyntheticSpec:
    users: int
    items: int
    interactions: int
    seed: int = 0
    regions: int = 50
    authors: int | None = None  # None: items // 10 (at least 1)
    categories: int = 30
    with_time: bool = True

    def __post_init__(self) -> None:
        for name in ("users", "items", "interactions", "regions", "categories"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, got {value}")
        if self.interactions > self.users * self.items:
            raise ValueError(
                f"interactions: at most users × items = {self.users * self.items:,} distinct pairs, "
                f"got {self.interactions:,}"
            )
        if self.authors is not None and self.authors < 1:
            raise ValueError(f"authors: must be at least 1 (or None), got {self.authors}")

    @property
    def author_count(self) -> int:
        return self.authors if self.authors is not None else max(1, self.items // ITEMS_PER_AUTHOR)


def generate_synthetic(spec: SyntheticSpec) -> RawData:
    """Generate the data set described by `spec`; the same spec always gives the same frames."""
    rng = np.random.default_rng(spec.seed)
    report = LoadReport()

    item_weight = _zipf(spec.items, ITEM_ZIPF_EXPONENT)[rng.permutation(spec.items)]
    region_weight = _zipf(spec.regions, REGION_ZIPF_EXPONENT)
    user_region = _draw(rng, region_weight, spec.users)
    item_region = _draw(rng, region_weight, spec.items)
    user_weight = rng.lognormal(0.0, USER_ACTIVITY_SIGMA, spec.users)
    popularity = _popularity(item_weight, item_region, spec.regions)

    user_ids, item_ids, drawn, duplicates = _draw_pairs(rng, spec, user_weight, user_region, popularity)
    report.drop("interactions: duplicate (user, item) draws, replaced by new draws", duplicates)
    report.note(
        f"synthetic: {len(user_ids):,} distinct (user, item) pairs from {drawn:,} draws "
        f"({spec.interactions:,} requested)"
    )
    if len(user_ids) < spec.interactions:
        report.note(f"synthetic: {spec.interactions - len(user_ids):,} fewer interactions than requested")

    ratings = _ratings(rng, user_ids, item_ids, item_weight, spec.users)
    timestamps: IntArray | None = None
    if spec.with_time:
        timestamps = START + (_sorted_uniforms(rng, len(user_ids)) * SPAN_SECONDS).astype(np.int64)
    else:
        report.note("synthetic: generated without time (with_time=False)")
    interactions = interactions_frame(user_ids, item_ids, ratings, timestamps, ids_as_str=False)

    return RawData(
        name=NAME,
        interactions=interactions,
        items=_items(rng, spec),
        users=users_frame(
            np.arange(spec.users, dtype=np.int64),
            _names("region", spec.regions)[user_region],
            ids_as_str=False,
        ),
        like_threshold=LIKE_THRESHOLD,
        has_rating=True,
        has_time=spec.with_time,
        has_authors=True,
        has_categories=True,
        has_regions=True,
        report=report,
        source={"dataset": NAME, "files": {}, "parameters": dataclasses.asdict(spec)},
    )


def _zipf(count: int, exponent: float) -> FloatArray:
    return np.arange(1, count + 1, dtype=np.float64) ** -exponent


def _sorted_uniforms(rng: np.random.Generator, size: int) -> FloatArray:
    """`size` uniform values in [0, 1), sorted, in linear time: normalised cumulative sums of
    exponential gaps are distributed as sorted uniforms. The pairs are in random order, so
    sorted times give a time-ordered log without sorting."""
    cumulative: FloatArray = np.cumsum(rng.standard_exponential(size + 1))
    uniforms: FloatArray = cumulative[:-1] / cumulative[-1]
    return uniforms


def _draw(rng: np.random.Generator, weights: FloatArray, size: int) -> IntArray:
    """`size` independent draws of indexes with probability proportional to `weights`, in random
    order: multinomial counts per index, expanded and shuffled (linear in size + len(weights))."""
    # A hair under 1 in total: numpy rejects probabilities whose rounding sums above 1; the
    # last index absorbs the hair (1e-9 of the draws at most).
    counts = rng.multinomial(size, weights / (weights.sum() * (1 + 1e-9)))
    return rng.permutation(np.repeat(np.arange(len(weights), dtype=np.int64), counts))


class _Popularity(NamedTuple):
    """Item weights, globally and per region (the region's home items, by the same weights)."""

    item_weight: FloatArray
    by_region: IntArray  # item ids sorted by home region
    bounds: IntArray  # region r's home items are by_region[bounds[r]:bounds[r + 1]]


def _popularity(item_weight: FloatArray, item_region: IntArray, regions: int) -> _Popularity:
    by_region = np.argsort(item_region, kind="stable").astype(np.int64)
    bounds = np.searchsorted(item_region[by_region], np.arange(regions + 1)).astype(np.int64)
    return _Popularity(item_weight, by_region, bounds)


def _draw_items(
    rng: np.random.Generator, user_ids: IntArray, user_region: IntArray, popularity: _Popularity
) -> IntArray:
    """An item per user draw: by global popularity, or for a `LOCAL_SHARE` of draws by popularity
    among the home items of the user's region."""
    local = np.flatnonzero(rng.random(len(user_ids)) < LOCAL_SHARE)
    items = np.empty(len(user_ids), dtype=np.int64)
    is_global = np.ones(len(user_ids), dtype=bool)
    is_global[local] = False
    items[is_global] = _draw(rng, popularity.item_weight, int(is_global.sum()))
    regions = user_region[user_ids[local]]
    order = np.argsort(regions)
    starts = np.searchsorted(regions[order], np.arange(len(popularity.bounds)))
    for region in range(len(popularity.bounds) - 1):
        positions = local[order[starts[region] : starts[region + 1]]]
        home = popularity.by_region[popularity.bounds[region] : popularity.bounds[region + 1]]
        if len(positions) == 0:
            continue
        if len(home) == 0:  # a region without home items: global popularity
            items[positions] = _draw(rng, popularity.item_weight, len(positions))
        else:
            items[positions] = home[_draw(rng, popularity.item_weight[home], len(positions))]
    return items


def _draw_pairs(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    user_weight: FloatArray,
    user_region: IntArray,
    popularity: _Popularity,
) -> tuple[IntArray, IntArray, int, int]:
    """(users, items, pairs drawn, duplicate draws): distinct pairs in random order, topped up with
    new draws until the requested count (or `MAX_ROUNDS` pass: a small catalogue may run out)."""
    wanted = spec.interactions
    keys = np.empty(0, dtype=np.int64)  # user * items + item, sorted, distinct
    drawn = 0
    for _ in range(MAX_ROUNDS):
        missing = wanted - len(keys)
        if missing <= 0:
            break
        # Enough to cover the duplicate rate seen so far, and a little more.
        batch = (
            missing if drawn == 0 else min(int(missing * drawn / max(len(keys), 1) * 1.1) + 16, 4 * wanted)
        )
        users = _draw(rng, user_weight, batch)
        items = _draw_items(rng, users, user_region, popularity)
        keys = _distinct_sorted(np.concatenate([keys, users * np.int64(spec.items) + items]))
        drawn += batch
    duplicates = drawn - len(keys)
    if len(keys) > wanted:  # the last round's surplus, dropped at random
        keys = np.delete(keys, rng.choice(len(keys), len(keys) - wanted, replace=False))
    keys = rng.permutation(keys)
    return keys // spec.items, keys % spec.items, drawn, duplicates


def _distinct_sorted(values: IntArray) -> IntArray:
    # np.unique would do, but its hash-based path is an order of magnitude slower than sorting here.
    ordered = np.sort(values)
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return ordered[first]


def _ratings(
    rng: np.random.Generator, user_ids: IntArray, item_ids: IntArray, item_weight: FloatArray, user_count: int
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """1–5 stars: a popular item scores higher, plus a per-user bias and per-rating noise."""
    # Popularity standardised over the interactions (not the catalogue), so that the mean rating
    # stays near 3.5 however skewed the popularity is.
    log_weight = np.log(item_weight)
    seen = log_weight[item_ids]
    quality = (log_weight - seen.mean()) / (seen.std() or 1.0) + rng.normal(0.0, 0.5, len(item_weight))
    user_bias = rng.normal(0.0, 0.4, user_count)
    score = 3.5 + 0.6 * quality[item_ids] + user_bias[user_ids] + rng.normal(0.0, 0.7, len(item_ids))
    stars: np.ndarray[Any, np.dtype[np.float32]] = np.clip(np.rint(score), 1, 5).astype(np.float32)
    return stars


def _items(rng: np.random.Generator, spec: SyntheticSpec) -> pd.DataFrame:
    author_count = spec.author_count
    item_author = _draw(rng, rng.lognormal(0.0, AUTHOR_SIZE_SIGMA, author_count), spec.items)
    category_weight = _zipf(spec.categories, CATEGORY_ZIPF_EXPONENT)
    author_category = _draw(rng, category_weight, author_count)
    year = LATEST_YEAR - np.minimum(rng.exponential(8.0, spec.items).astype(np.int64), 100)
    return items_frame(
        np.arange(spec.items, dtype=np.int64),
        title=[f"item {index}" for index in range(spec.items)],
        categories=_categories(rng, author_category[item_author], spec.categories),
        author=_names("author", author_count)[item_author],
        item_time=year.astype(np.float64),
        ids_as_str=False,
    )


def _categories(rng: np.random.Generator, first: IntArray, count: int) -> list[list[str]]:
    """1–3 distinct categories per item, the first given (the author's)."""
    size = len(first)
    per_item = np.minimum(rng.integers(1, 4, size), count)
    # Distinct offsets from the first category: second in [1, count-1], third in the rest.
    second_offset = 1 + rng.integers(0, max(count - 1, 1), size)
    third_offset = 1 + rng.integers(0, max(count - 2, 1), size)
    third_offset += third_offset >= second_offset
    names = _names("category", count)
    first_names: list[str] = names[first].tolist()
    second_names: list[str] = names[(first + second_offset) % count].tolist()
    third_names: list[str] = names[(first + third_offset) % count].tolist()
    return [
        [a] if kept == 1 else [a, b] if kept == 2 else [a, b, c]
        for a, b, c, kept in zip(first_names, second_names, third_names, per_item.tolist(), strict=True)
    ]


def _names(prefix: str, count: int) -> np.ndarray[Any, np.dtype[np.object_]]:
    return np.array([f"{prefix} {index}" for index in range(count)], dtype=object)
