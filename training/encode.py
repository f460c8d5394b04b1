"""Raw data → dense indexes and token vocabularies, and the leakage-free split.

The split is made here, once, before anything is learned: every statistic, vocabulary,
index and model downstream is built from the training part only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from recsys.artifacts import Catalogue, FloatArray, Int64Array, IntArray, StrArray, UserBase
from training.data.raw import LoadReport, RawData

MIN_REGION_USERS = 20  # rarer regions fall back to their parent ("usa/ohio" → "usa"), then to unknown


@dataclass(frozen=True)
class Interactions:
    """Interactions as aligned dense arrays (one row per (user, item) pair)."""

    user: IntArray
    item: IntArray
    rating: FloatArray  # NaN when the data has no rating
    time: Int64Array  # unix seconds; 0 when the data has no time
    liked: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, rows: npt.NDArray[Any]) -> Interactions:
        return Interactions(
            self.user[rows], self.item[rows], self.rating[rows], self.time[rows], self.liked[rows]
        )


@dataclass(frozen=True)
class Encoded:
    name: str
    catalogue: Catalogue
    users: UserBase
    interactions: Interactions
    like_threshold: float | None
    has_time: bool
    capabilities: dict[str, bool]
    report: LoadReport
    source: dict[str, Any]
    # Each item's publisher ("" unknown), aligned with the catalogue: only the item tower's
    # content inputs read it (`recsys.content`), so the served catalogue does not keep it.
    publishers: StrArray = field(default_factory=lambda: np.zeros(0, np.str_))

    @property
    def n_users(self) -> int:
        return self.users.n_users

    @property
    def n_items(self) -> int:
        return self.catalogue.n_items


def _strings(values: pd.Series) -> StrArray:
    return np.asarray(values.astype(str).to_numpy(), dtype=np.str_)


def _token_vocab(values: list[str | None]) -> tuple[IntArray, StrArray]:
    """Tokens (1-based, 0 = None) and the vocabulary, most frequent value first."""
    series = pd.Series(values, dtype=object)
    counts = series.dropna().value_counts(sort=True)
    vocab = [str(value) for value in counts.index]
    lookup = {value: token for token, value in enumerate(vocab, start=1)}
    tokens = np.array([lookup.get(value, 0) if value is not None else 0 for value in values], dtype=np.int32)
    return tokens, np.asarray(vocab, dtype=np.str_)


def _collapse_regions(regions: list[str | None]) -> list[str | None]:
    """Regions with fewer than MIN_REGION_USERS users are replaced by their parent
    ("country/state" → "country"), and regions still too rare by None: a geo channel
    needs enough users per region to have a meaningful popular list."""
    current = list(regions)
    for _ in range(2):
        counts = pd.Series(current, dtype=object).value_counts()
        rare = {region for region, count in counts.items() if count < MIN_REGION_USERS}
        current = [_parent(value) if value is not None and value in rare else value for value in current]
    counts = pd.Series(current, dtype=object).value_counts()
    return [
        value if value is not None and counts.get(value, 0) >= MIN_REGION_USERS else None for value in current
    ]


def _parent(region: str) -> str | None:
    return region.rsplit("/", 1)[0] if "/" in region else None


def encode(raw: RawData, max_categories: int = 4) -> Encoded:
    frame = raw.interactions
    items_frame = raw.items.drop_duplicates("item_id", keep="first").reset_index(drop=True)
    users_frame = raw.users.drop_duplicates("user_id", keep="first").reset_index(drop=True)
    # Vocabularies: every item and user of the metadata (so new items can be served by
    # their content even before anyone interacted with them).
    item_codes, item_uniques = pd.factorize(
        pd.concat([items_frame["item_id"], frame["item_id"]], ignore_index=True), sort=False
    )
    user_codes, user_uniques = pd.factorize(
        pd.concat([users_frame["user_id"], frame["user_id"]], ignore_index=True), sort=False
    )
    n_items = len(item_uniques)
    inter_item = item_codes[len(items_frame) :].astype(np.int32)
    inter_user = user_codes[len(users_frame) :].astype(np.int32)

    # Item metadata aligned with the item vocabulary (items only in interactions: empty).
    meta = items_frame.set_index(items_frame["item_id"]).reindex(pd.Index(item_uniques))
    titles = meta["title"].fillna("").astype(str).to_numpy()
    raw_categories = [value if isinstance(value, list) else [] for value in meta["categories"].tolist()]
    flat = [category for row in raw_categories for category in row]
    category_counts = pd.Series(flat, dtype=object).value_counts()
    category_vocab = [str(value) for value in category_counts.index]
    category_lookup = {value: token for token, value in enumerate(category_vocab, start=1)}
    categories = np.zeros((n_items, max_categories), dtype=np.int32)
    for row, values in enumerate(raw_categories):
        tokens = [category_lookup[value] for value in values[:max_categories]]
        categories[row, : len(tokens)] = tokens
    authors_list = [value if isinstance(value, str) and value else None for value in meta["author"].tolist()]
    authors, author_vocab = _token_vocab(authors_list)
    item_time = meta["item_time"].astype("float64").to_numpy().astype(np.float32)
    publishers = [value if isinstance(value, str) else "" for value in meta["publisher"].tolist()]

    user_meta = users_frame.set_index(users_frame["user_id"]).reindex(pd.Index(user_uniques))
    region_values = [
        value if isinstance(value, str) and value else None for value in user_meta["region"].tolist()
    ]
    regions, region_vocab = _token_vocab(_collapse_regions(region_values))

    rating = frame["rating"].astype("float32").to_numpy()
    if raw.has_time:
        time = frame["timestamp"].astype("int64").to_numpy()
    else:
        time = np.zeros(len(frame), dtype=np.int64)
    if raw.like_threshold is None:
        liked = np.ones(len(frame), dtype=bool)
    else:
        liked = np.nan_to_num(rating, nan=-np.inf) >= raw.like_threshold

    return Encoded(
        name=raw.name,
        catalogue=Catalogue(
            item_ids=np.asarray([str(value) for value in item_uniques], dtype=np.str_),
            titles=np.asarray(titles, dtype=np.str_),
            categories=categories,
            category_vocab=np.asarray(category_vocab, dtype=np.str_),
            authors=authors,
            author_vocab=author_vocab,
            item_time=item_time,
        ),
        users=UserBase(
            user_ids=np.asarray([str(value) for value in user_uniques], dtype=np.str_),
            regions=regions,
            region_vocab=region_vocab,
        ),
        interactions=Interactions(inter_user, inter_item, rating, time, liked),
        like_threshold=raw.like_threshold,
        has_time=raw.has_time,
        capabilities=dict(raw.capabilities),
        report=raw.report,
        source=raw.source,
        publishers=np.asarray(publishers, dtype=np.str_),
    )


@dataclass(frozen=True)
class Split:
    """Row indexes into `Encoded.interactions`."""

    train: Int64Array
    test: Int64Array
    method: str  # "time" or "random"


def holdout_split(
    user: npt.NDArray[Any],
    time: npt.NDArray[Any] | None,
    *,
    fraction: float = 0.2,
    min_interactions: int = 5,
    seed: int = 0,
) -> Split:
    """Hold out each eligible user's latest `fraction` of interactions (at least one).

    Users with at least `min_interactions` interactions are eligible; the others stay
    entirely in training. Latest by time where timestamps exist (ties broken by row order),
    a seeded random choice otherwise."""
    n = user.shape[0]
    rows = np.arange(n, dtype=np.int64)
    if time is not None:
        order = np.lexsort((rows, time, user))  # by user, then time, then row
        method = "time"
    else:
        noise = np.random.default_rng(seed).random(size=(int(n),))
        order = np.lexsort((noise, np.asarray(user)))
        method = "random"
    sorted_user = user[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    counts = np.diff(np.r_[starts, n])
    held = np.where(counts >= min_interactions, np.maximum(1, (counts * fraction).astype(np.int64)), 0)
    # Position of each sorted row within its user's run, counted from the end.
    run_end = np.repeat(starts + counts, counts)
    from_end = run_end - np.arange(n) - 1
    is_test = from_end < np.repeat(held, counts)
    test = np.sort(order[is_test])
    train = np.sort(order[~is_test])
    return Split(train=train, test=test, method=method)
