"""The core artifacts on Spark: histories, popularity, statistics and the author index (with
`training.spark_cf`'s ItemCF and Swing, every core artifact), the files `training.core_builder`
writes in numpy, from a DataFrame of encoded training interactions.

The frame has one row per training interaction and the columns of `training.encode.Interactions`
plus the interaction's position in the training table (`row`), the tie-break `build_history` keeps
for equal times:

    user int, item int (dense indexes), time bigint (unix seconds, 0 without time),
    rating float (NaN without), liked boolean, row bigint

What runs where: every per-interaction pass (sorting, joining, grouping, summing) is a Spark job.
The driver receives aggregates the size of the catalogue or the user base (sums per item and per
user, `top_per_region` items per region) and the one per-interaction artifact, the history,
streamed in its final order one partition at a time into preallocated arrays. From the sums on,
the arithmetic is core_builder's own (`top_items`, `assemble_popularity`, `assemble_statistics`,
`build_author_index`), so the numbers match to the bit wherever the sums do:

- recency weights are float32 of the same float64 expression (`core_builder.recency_weights`);
- sums of those weights and of ratings are float64 in Spark's order instead of numpy's row order:
  equal while they are exact (integer ratings, weights of a few years' span), within 1e-6 otherwise;
- the ratings' mean and spread are float32 in numpy (`np.nanmean` / `np.nanstd` of float32 ratings)
  and float64 here rounded to float32: the same mean while numpy's float32 sum is exact, a spread
  within a float32 rounding.

`recsys build --engine spark` still encodes and splits in numpy and hands the training table over
as Arrow (`interactions_frame`); a job whose log does not fit the driver has Spark read it
(`read_interactions`), so the driver never holds the interaction table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import (
    Catalogue,
    CoreArtifacts,
    FloatArray,
    Popularity,
    Ragged,
    Statistics,
    UserBase,
    UserHistory,
)
from training.core_builder import (
    CoreConfig,
    EntitySums,
    RatingSummary,
    assemble_popularity,
    assemble_statistics,
    build_author_index,
    top_items,
)
from training.encode import Interactions
from training.spark_cf import to_driver

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

COLUMNS = ("user", "item", "time", "rating", "liked", "row")
SPARK_TYPES = {
    "user": "int",
    "item": "int",
    "time": "bigint",
    "rating": "float",
    "liked": "boolean",
    "row": "bigint",
}
FORMATS = {".parquet": "parquet", ".csv": "csv"}


def interactions_frame(spark: SparkSession, train: Interactions) -> DataFrame:
    """The training interactions as a DataFrame (through Arrow, not pandas), `row` their position."""
    return spark.createDataFrame(interactions_table(train))


def interactions_table(train: Interactions) -> Any:
    """The training interactions as a pyarrow Table with the frame's columns and types (what
    `write_interactions` stores and `read_interactions` reads back)."""
    import pyarrow as pa

    return pa.table(
        {
            "user": np.asarray(train.user, dtype=np.int32),
            "item": np.asarray(train.item, dtype=np.int32),
            "time": np.asarray(train.time, dtype=np.int64),
            "rating": np.asarray(train.rating, dtype=np.float32),
            "liked": np.asarray(train.liked, dtype=np.bool_),
            "row": np.arange(len(train), dtype=np.int64),
        }
    )


def write_interactions(train: Interactions, path: Path) -> Path:
    """The training interactions as one Parquet or CSV file (by suffix) for `read_interactions`."""
    import pyarrow.csv
    import pyarrow.parquet

    kind = _format(path)
    table = interactions_table(train)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        pyarrow.parquet.write_table(table, path)
    else:
        pyarrow.csv.write_csv(table, path)
    return path


def read_interactions(spark: SparkSession, path: str | Path) -> DataFrame:
    """Encoded training interactions that Spark reads itself: Parquet or CSV with a header (by the
    suffix; a file or a directory of part files, as Spark writes them), with the columns user, item,
    time, rating (empty: no rating), liked and row. `path` may be any URL Spark reads (s3a://,
    hdfs://); a local path must exist. The encoding itself is `training.encode`'s: this is how a
    log larger than the driver enters a Spark build, not a raw-data loader."""
    from pyspark.sql import functions as F

    text = str(path)
    kind = _format(Path(text))
    if "://" not in text and not Path(text).exists():
        raise ValueError(f"interactions: no such file or directory {text!r}")
    reader = spark.read.option("header", "true") if kind == "csv" else spark.read
    frame = reader.format(kind).load(text)
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(
            f"interactions: {text} has no column {', '.join(missing)} "
            f"(needs {', '.join(COLUMNS)}; it has {', '.join(frame.columns) or 'none'})"
        )
    typed = {name: F.col(name).cast(SPARK_TYPES[name]) for name in COLUMNS}
    # A CSV's empty cell reads as null; the numpy arrays (and the sums below) spell "no rating" NaN.
    typed["rating"] = F.coalesce(typed["rating"], F.lit(float("nan")).cast("float"))
    return frame.select(*(column.alias(name) for name, column in typed.items()))


def _format(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"interactions: {str(path)!r} ends in neither {' nor '.join(FORMATS)}")
    return kind


@dataclass(frozen=True)
class FrameSummary:
    """What every later job needs to know about the frame (one pass over it)."""

    rows: int
    newest_time: int
    has_time: bool


def summarise(frame: DataFrame, n_users: int, n_items: int) -> FrameSummary:
    """Row count and newest time, checking every user and item index is in range."""
    from pyspark.sql import functions as F

    result = frame.agg(
        F.count(F.lit(1)).alias("rows"),
        F.min("user").alias("min_user"),
        F.max("user").alias("max_user"),
        F.min("item").alias("min_item"),
        F.max("item").alias("max_item"),
        F.max("time").alias("newest"),
        F.max(F.abs("time")).alias("largest_time"),
        F.sum(F.col("user").isNull().cast("int") + F.col("item").isNull().cast("int")).alias("nulls"),
    ).first()
    assert result is not None  # a global aggregate always has its one row
    for name, size in (("user", n_users), ("item", n_items)):
        low, high = result[f"min_{name}"], result[f"max_{name}"]
        if result["rows"] and (low < 0 or high >= size):
            raise ValueError(f"{name}: indexes must be in [0, {size:,}), got {low:,}..{high:,}")
    if result["nulls"]:
        raise ValueError(f"user, item: {result['nulls']:,} missing indexes")
    rows = int(result["rows"])
    return FrameSummary(
        rows=rows,
        newest_time=int(result["newest"] or 0),
        has_time=bool(result["largest_time"]),  # `recency_weights`: all-zero times mean no time
    )


def recency_weight(summary: FrameSummary, half_life_days: float) -> Column:
    """`core_builder.recency_weights` as a column: the same float64 operations in the same order,
    rounded to float32: Java's and numpy's exp may differ in the last float64 bit, which the rounding
    almost never carries into the float32 (the test holds the scores bit-identical on MovieLens-100K)."""
    from pyspark.sql import functions as F

    if not summary.has_time:
        return F.lit(1.0)
    age_days = (F.lit(summary.newest_time) - F.col("time")).cast("double") / F.lit(86_400.0)
    decayed = F.exp(F.lit(-math.log(2.0)) * age_days / F.lit(float(half_life_days)))
    return decayed.cast("float").cast("double")


def history(frame: DataFrame, n_users: int, rows: int | None = None) -> UserHistory:
    """`core_builder.build_history`: every user's interactions by time, then training-table order.

    Spark sorts; the sorted partitions come to the driver one at a time, in order
    (`spark_cf.to_driver`: Arrow batches as raw buffers, not one Python object per interaction), and
    are copied into arrays allocated once for all `rows`."""
    total = frame.count() if rows is None else rows
    items = np.empty(total, dtype=np.int32)
    times = np.empty(total, dtype=np.int64)
    ratings = np.empty(total, dtype=np.float32)
    counts = np.zeros(n_users, dtype=np.int64)
    ordered = frame.orderBy("user", "time", "row")
    dtypes = {"user": "<i4", "item": "<i4", "time": "<i8", "rating": "<f4"}
    filled = 0
    for batch in to_driver(ordered, dtypes):
        user = batch["user"]
        end = filled + user.size
        if end > total:
            raise RuntimeError(f"history: more than the {total:,} rows counted (the frame changed)")
        items[filled:end] = batch["item"]
        times[filled:end] = batch["time"]
        ratings[filled:end] = batch["rating"]
        # Sorted by user, so each batch holds runs of users: count them per run.
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        counts[user[starts]] += np.diff(np.r_[starts, user.size])
        filled = end
    if filled != total:
        raise RuntimeError(f"history: {filled:,} rows arrived of the {total:,} counted (the frame changed)")
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return UserHistory(
        items=Ragged(offsets, items), times=Ragged(offsets, times), ratings=Ragged(offsets, ratings)
    )


def popularity(
    frame: DataFrame, users: UserBase, n_items: int, config: CoreConfig, summary: FrameSummary
) -> Popularity:
    """`core_builder.build_popularity`: recency-weighted interaction sums per item, globally and per
    region (each user's region token from `users.regions`, a broadcast join), and their top lists.

    A region's list is `top_items` of its dense score row, computed in a Python worker per region:
    numpy's selection orders tied scores its own way, which a Spark window cannot reproduce."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    weighted = frame.select(
        "user", "item", recency_weight(summary, config.popularity_half_life_days).alias("w")
    )
    global_sums = _dense(weighted.groupBy("item").agg(F.sum("w").alias("value")), "item", n_items)
    global_scores = global_sums.astype(np.float32)

    n_regions = int(users.region_vocab.shape[0]) + 1
    spark = frame.sparkSession
    regions = spark.createDataFrame(
        pa.table(
            {
                "user": np.arange(users.n_users, dtype=np.int32),
                "region": np.asarray(users.regions, dtype=np.int32),
            }
        )
    )
    per_region = (
        weighted.join(F.broadcast(regions.where(F.col("region") > 0)), "user")
        .groupBy("region", "item")
        .agg(F.sum("w").alias("score"))
    )
    count = int(config.top_per_region)

    def region_top(key: Any, group: Any) -> Any:
        return pa.table(_region_top(int(key[0].as_py()), group, n_items, count))

    tops = (
        per_region.groupBy("region")
        .applyInArrow(region_top, schema="region int, rank int, item int, score float")
        .toArrow()
    )
    lists: list[tuple[npt.NDArray[np.int32], FloatArray]] = [
        (np.zeros(0, np.int32), np.zeros(0, np.float32)) for _ in range(n_regions)
    ]
    region = tops.column("region").to_numpy()
    order = np.lexsort((tops.column("rank").to_numpy(), region))
    region, item, score = (
        region[order],
        tops.column("item").to_numpy()[order],
        tops.column("score").to_numpy()[order],
    )
    for token in np.unique(region).tolist():
        if not 0 < token < n_regions:
            raise ValueError(f"users.regions: token {token} outside the vocabulary (1..{n_regions - 1})")
        rows = region == token
        lists[token] = (item[rows].astype(np.int32), score[rows].astype(np.float32))
    return assemble_popularity(global_scores, lists, config)


def _region_top(token: int, group: Any, n_items: int, count: int) -> dict[str, np.ndarray]:
    """One region's top items from its (item, score) sums, by `core_builder.top_items` on the
    region's dense float32 row, as the numpy builder does."""
    row = np.zeros(n_items, dtype=np.float64)
    row[group.column("item").to_numpy()] = group.column("score").to_numpy()
    scores = row.astype(np.float32)
    top = top_items(scores, count)
    return {
        "region": np.full(top.size, token, dtype=np.int32),
        "rank": np.arange(top.size, dtype=np.int32),
        "item": top,
        "score": scores[top],
    }


def statistics(frame: DataFrame, n_users: int, n_items: int, popularity: Popularity) -> Statistics:
    """`core_builder.build_statistics`: sums per user and per item in Spark, the ratings' mean and
    spread, then the numpy builder's normalisation."""
    from pyspark.sql import functions as F

    rated = ~F.isnan("rating")
    summary = (
        frame.where(rated)
        .agg(
            F.count(F.lit(1)).alias("count"),
            F.sum(F.col("rating").cast("double")).alias("total"),
            F.stddev_pop(F.col("rating").cast("double")).alias("spread"),
        )
        .first()
    )
    assert summary is not None
    if summary["count"]:
        # np.nanmean of float32 ratings: a float32 total divided in float64, rounded to float32.
        mean = float(np.float32(float(np.float32(summary["total"])) / summary["count"]))
        ratings = RatingSummary(mean, float(np.float32(summary["spread"])))
    else:
        ratings = RatingSummary(0.0, 1.0)

    def sums(group: str, size: int) -> EntitySums:
        aggregated = frame.groupBy(group).agg(
            F.count(F.lit(1)).cast("double").alias("count"),
            F.sum(rated.cast("double")).alias("rated"),
            F.coalesce(F.sum(F.when(rated, F.col("rating").cast("double"))), F.lit(0.0)).alias(
                "rating_total"
            ),
            F.sum(F.col("liked").cast("double")).alias("likes"),
        )
        columns = _dense_columns(aggregated, group, size, ("count", "rated", "rating_total", "likes"))
        return EntitySums(**columns)

    return assemble_statistics(sums("user", n_users), sums("item", n_items), ratings, popularity)


def _dense(aggregated: DataFrame, key: str, size: int) -> npt.NDArray[np.float64]:
    return _dense_columns(aggregated, key, size, ("value",))["value"]


def _dense_columns(
    aggregated: DataFrame, key: str, size: int, names: tuple[str, ...]
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-index aggregates (one row per present index) as dense float64 arrays, zero elsewhere."""
    table = aggregated.toArrow()
    index = table.column(key).to_numpy().astype(np.int64)
    dense: dict[str, npt.NDArray[np.float64]] = {}
    for name in names:
        values = np.zeros(size, dtype=np.float64)
        values[index] = table.column(name).to_numpy()
        dense[name] = values
    return dense


def build_core(
    frame: DataFrame,
    catalogue: Catalogue,
    users: UserBase,
    config: CoreConfig,
    like_threshold: float | None,
    progress: Callable[[str], None] | None = None,
) -> CoreArtifacts:
    """`core_builder.build_core` on Spark: every artifact from `frame` (cache it: each is a job)."""
    from training import spark_cf

    def step(name: str) -> None:
        if progress is not None:
            progress(name)

    n_users, n_items = users.n_users, catalogue.n_items
    summary = summarise(frame, n_users, n_items)
    step("history (spark)")
    user_history = history(frame, n_users, summary.rows)
    step("popularity (spark)")
    item_popularity = popularity(frame, users, n_items, config, summary)
    authors = build_author_index(catalogue, item_popularity)
    step("statistics (spark)")
    stats = statistics(frame, n_users, n_items, item_popularity)
    cf_frame = cf_input(frame)
    step("itemcf (spark)")
    itemcf = spark_cf.itemcf(
        cf_frame,
        n_items,
        top_k=config.neighbors,
        max_items_per_user=config.max_items_per_user,
        seed=config.seed,
    )
    step("swing (spark)")
    swing = spark_cf.swing(
        cf_frame,
        n_items,
        top_k=config.neighbors,
        alpha=config.swing_alpha,
        max_users_per_item=config.max_users_per_item,
        max_items_per_user=config.max_items_per_user,
        seed=config.seed,
    )
    return CoreArtifacts(
        catalogue=catalogue,
        users=users,
        history=user_history,
        popularity=item_popularity,
        authors=authors,
        statistics=stats,
        itemcf=itemcf,
        swing=swing,
        like_threshold=like_threshold,
    )


def cf_input(frame: DataFrame) -> DataFrame:
    """The (user, item, weight, order) frame `spark_cf` reads: like weight 1 + liked, order the time,
    as `core_builder` hands them to `training.cf`."""
    from pyspark.sql import functions as F

    return frame.select(
        "user",
        "item",
        (F.lit(1.0) + F.col("liked").cast("double")).alias("weight"),
        F.col("time").alias("order"),
    )
