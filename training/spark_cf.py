"""ItemCF and Swing on Spark: the tables `training.cf` builds, from interactions Spark holds itself.

For logs past one machine (10⁸–10⁹ interactions) the co-occurrence work runs on any Spark master
(`local[*]` by default, a standalone cluster or Kubernetes alike) while the driver receives only the
result, the `n_items × top_k` neighbour table. The definitions, the caps and the ordering are those of
`training/cf.py`, and so are the numbers (a test holds the two engines to the same neighbours, scores
within 1e-6):

- **the caps**: a user over `max_items_per_user` keeps the latest by `order` (the larger item on ties);
  Swing's items over `max_users_per_item` keep the users with the largest `xxhash64(seed, item, user)`,
  the pseudo-random sample `training.cf.member_hash` computes the same way in numpy;
- **ItemCF** (weighted cosine) is a self-join of the unit-normalised like weights on the user and a sum
  per item pair: Σ_u |I_u|² rows, 20 M on MovieLens-100K;
- **Swing** is grouped by item: each item's (sampled) users arrive with their whole (capped) histories,
  one row per user, and the group is computed by `training.cf._swing_row`, the numpy builder's own code,
  in Spark's Python workers (`applyInPandas`). Spreading the classic user-pair formulation over rows
  instead would emit Σ_{u,v} |I_u ∩ I_v|² rows (450 M on MovieLens-100K); per item the work is what the
  single-machine builder does, distributed by item.
- **ranking**: each item's neighbours by float32 score, descending, ties by the smaller item index;
  the table (n_items × top_k) reaches the driver streamed partition by partition (`to_driver`).

PySpark needs a JVM (Java 17) and pyarrow (`pip install '.[spark]'`; Java is not a Python package).
Data moves between Spark and Python as Arrow, never through pandas.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.neighbors import PAD, NeighborTable
from training.cf import (
    DEFAULT_TOP_K,
    ITEMCF_MAX_ITEMS_PER_USER,
    SWING_MAX_ITEMS_PER_USER,
    SWING_MAX_USERS_PER_ITEM,
    _one_blas_thread,
    _swing_row,
    _top_k_row,
)

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

DEFAULT_MASTER = "local[*]"


def spark_session(master: str = DEFAULT_MASTER, *, app: str = "recsys-build", **config: str) -> SparkSession:
    """A Spark session for the build (`master`: any Spark master URL). No web UI: a build is a batch job,
    and on a shared machine the UI's port is one more thing to collide on."""
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master(master)
        .appName(app)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")  # the build prints its own stages
    )
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local workers run this interpreter (its packages), not whatever `python3` the PATH finds;
        # on a cluster the executors' image decides (PYSPARK_PYTHON or spark.pyspark.python).
        # (PySpark reads the variable when the context starts.)
        os.environ["PYSPARK_PYTHON"] = sys.executable
    for key, value in config.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def interactions_frame(
    spark: SparkSession,
    user: np.ndarray,
    item: np.ndarray,
    weight: np.ndarray | None = None,
    order: np.ndarray | None = None,
) -> DataFrame:
    """A DataFrame of (user, item, weight, order) from index arrays, for tests and for a build whose
    interactions are already in memory; at scale Spark reads them from Parquet or CSV itself."""
    import pyarrow as pa

    table = pa.table(
        {
            "user": np.asarray(user, dtype=np.int32),
            "item": np.asarray(item, dtype=np.int32),
            "weight": np.ones(len(user)) if weight is None else np.asarray(weight, dtype=np.float64),
            "order": np.zeros(len(user), np.int64) if order is None else np.asarray(order, dtype=np.int64),
        }
    )
    return spark.createDataFrame(table)


def capped(
    frame: DataFrame, group: str, member: str, cap: int | None, *, recency: str | None, seed: int
) -> DataFrame:
    """At most `cap` rows per `group`: the largest `recency` (larger `member` on ties), or without
    `recency` the largest `xxhash64(seed, group, member)`: `training.cf._keep_per_group`'s rule."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if cap is None:
        return frame
    key: Column = (
        F.col(recency)
        if recency is not None
        else F.xxhash64(F.lit(seed).cast("int"), F.col(group).cast("int"), F.col(member).cast("int"))
    )
    ranked = Window.partitionBy(group).orderBy(key.desc(), F.col(member).desc())
    return frame.withColumn("_rank", F.row_number().over(ranked)).where(F.col("_rank") <= cap).drop("_rank")


def itemcf(
    frame: DataFrame,
    n_items: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    max_items_per_user: int | None = ITEMCF_MAX_ITEMS_PER_USER,
    seed: int = 0,
) -> NeighborTable:
    """`training.cf.build_itemcf` on Spark: `frame` has user, item, weight (> 0) and order columns."""
    from pyspark.sql import functions as F

    kept = capped(frame, "user", "item", max_items_per_user, recency="order", seed=seed)
    norms = kept.groupBy("item").agg(F.sqrt(F.sum(F.col("weight") * F.col("weight"))).alias("norm"))
    unit = kept.join(norms, "item").select("user", "item", (F.col("weight") / F.col("norm")).alias("v"))
    left = unit.select("user", F.col("item").alias("i"), F.col("v").alias("vi"))
    right = unit.select("user", F.col("item").alias("j"), F.col("v").alias("vj"))
    pairs = (
        left.join(right, "user")
        .where(F.col("i") != F.col("j"))
        .groupBy("i", "j")
        .agg(F.sum(F.col("vi") * F.col("vj")).alias("score"))
    )
    return _top_k(pairs.withColumnRenamed("i", "item").withColumnRenamed("j", "neighbor"), n_items, top_k)


def swing(
    frame: DataFrame,
    n_items: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    alpha: float = 1.0,
    max_users_per_item: int | None = SWING_MAX_USERS_PER_ITEM,
    max_items_per_user: int | None = SWING_MAX_ITEMS_PER_USER,
    seed: int = 0,
) -> NeighborTable:
    """`training.cf.build_swing` on Spark: `frame` has user, item and order columns."""
    from pyspark.sql import functions as F

    kept = capped(frame, "user", "item", max_items_per_user, recency="order", seed=seed).select(
        "user", "item"
    )
    audiences = capped(kept, "item", "user", max_users_per_item, recency=None, seed=seed)
    histories = kept.groupBy("user").agg(F.sort_array(F.collect_list("item")).alias("history"))
    crowded = audiences.groupBy("item").count().where(F.col("count") >= 2).select("item")
    members = audiences.join(crowded, "item").join(histories, "user")
    alpha = float(alpha)

    def rows_of(key: Any, group: Any) -> Any:
        import pyarrow as pa

        return pa.table(_swing_group(int(key[0].as_py()), group, alpha, top_k))

    # Arrow in and out of the Python workers (no pandas round trip).
    scored = members.groupBy("item").applyInArrow(rows_of, schema="item int, neighbor int, score double")
    return _top_k(scored, n_items, top_k)


def _swing_group(item: int, group: Any, alpha: float, top_k: int) -> dict[str, np.ndarray]:
    """One item's Swing row from its members' rows (user, history) in an Arrow table, by the numpy
    builder's code: the members in ascending user order and each history ascending, as the builder's
    CSR holds them, so the arithmetic (and every float) is the same."""
    users = group.column("user").to_numpy()
    by_user = np.argsort(users, kind="stable")
    column = group.column("history").combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    flat = column.values.to_numpy().astype(np.int32)
    histories = [flat[offsets[row] : offsets[row + 1]] for row in by_user.tolist()]
    lengths = np.array([history.size for history in histories], dtype=np.int64)
    indptr = np.concatenate(([0], np.cumsum(lengths)))
    with _one_blas_thread():
        columns, values = _swing_row(
            item, np.arange(len(histories)), indptr, np.concatenate(histories), alpha
        )
    best_columns, best_values = _top_k_row(columns, values.astype(np.float32), top_k)
    return {
        "item": np.full(best_columns.size, item, dtype=np.int32),
        "neighbor": best_columns.astype(np.int32),
        "score": best_values.astype(np.float64),
    }


def _top_k(scored: DataFrame, n_items: int, top_k: int) -> NeighborTable:
    """Each item's `top_k` (item, neighbor, score) rows by float32 score, ties by the smaller neighbour,
    gathered into a table (items without neighbours are all padding)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ranking = Window.partitionBy("item").orderBy(F.col("score").cast("float").desc(), F.col("neighbor").asc())
    best = (
        scored.withColumn("rank", F.row_number().over(ranking))
        .where(F.col("rank") <= top_k)
        .select("item", "rank", "neighbor", F.col("score").cast("float").alias("score"))
    )
    neighbors = np.full((n_items, top_k), PAD, dtype=np.int32)
    scores = np.zeros((n_items, top_k), dtype=np.float32)
    # Up to n_items × top_k rows (10⁸ for 10⁶ items): streamed into the table, never collected whole.
    for batch in to_driver(best, {"item": "<i4", "rank": "<i4", "neighbor": "<i4", "score": "<f4"}):
        rows, ranks = batch["item"].astype(np.int64), batch["rank"].astype(np.int64) - 1
        neighbors[rows, ranks] = batch["neighbor"]
        scores[rows, ranks] = batch["score"]
    return NeighborTable(neighbors, scores)


def to_driver(frame: DataFrame, dtypes: dict[str, str]) -> Iterator[dict[str, np.ndarray]]:
    """`frame`'s columns as numpy arrays of `dtypes` (little-endian numpy codes), one Arrow batch at
    a time, partition after partition in the frame's order. Spark's Python workers pack each batch
    into one row of raw column buffers, and `toLocalIterator` hands the driver one partition at a
    time (the next one prefetched): the driver holds neither the whole result (as `toArrow` would)
    nor a Python object per row (as `collect` would)."""
    schema = ", ".join(f"{name} binary" for name in dtypes)
    packed = frame.select(*dtypes).mapInArrow(functools.partial(_pack_batches, dtypes), schema=schema)
    for row in packed.toLocalIterator(prefetchPartitions=True):
        yield {name: np.frombuffer(row[name], dtype=dtype) for name, dtype in dtypes.items()}


def _pack_batches(dtypes: dict[str, str], batches: Iterator[Any]) -> Iterator[Any]:
    """Each Arrow batch as one row of column buffers (in Spark's Python workers)."""
    import pyarrow as pa

    for batch in batches:
        if batch.num_rows == 0:
            continue
        yield pa.RecordBatch.from_pydict(
            {
                name: pa.array([batch.column(name).to_numpy(zero_copy_only=False).astype(dtype).tobytes()])
                for name, dtype in dtypes.items()
            }
        )
