"""The Spark CF tables against the numpy builder's on a real data set, with the build's own inputs.

    python loadtest/spark_cf_equality.py --dataset book-crossing [--master local[2]]

Encodes the data set as `recsys build` does, builds ItemCF and Swing from every interaction with
the build's default caps (`training.core_builder.CoreConfig`) in numpy (`training/cf.py`) and on
Spark (`training/spark_cf.py`), and prints, per table: wall time of each engine, items whose
neighbour lists differ, the largest score difference, then one JSON line. The test command holds
MovieLens-100K to the same standard (tests/training/test_spark_cf.py); this is the larger set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import spark_cf  # after the path: run from a checkout
from training.cf import build_itemcf, build_swing
from training.core_builder import CoreConfig
from training.data import default_data_dir, load_book_crossing, load_movielens_100k
from training.encode import encode

LOADERS = {"book-crossing": load_book_crossing, "ml-100k": load_movielens_100k}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(LOADERS), default="book-crossing")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--master", default="local[*]", help="Spark master URL")
    args = parser.parse_args()

    encoded = encode(LOADERS[args.dataset](args.data_dir or default_data_dir()))
    data = encoded.interactions
    config = CoreConfig()
    weight = 1.0 + data.liked.astype(np.float32)
    started = time.perf_counter()
    spark = spark_cf.spark_session(args.master, **{"spark.sql.shuffle.partitions": "16"})
    frame = spark_cf.interactions_frame(spark, data.user, data.item, weight, data.time).cache()
    frame.count()
    session_seconds = time.perf_counter() - started

    builds = {
        "itemcf": (
            lambda: build_itemcf(
                data.user,
                data.item,
                weight,
                encoded.n_users,
                encoded.n_items,
                top_k=config.neighbors,
                max_items_per_user=config.max_items_per_user,
                order=data.time,
            ),
            lambda: spark_cf.itemcf(
                frame, encoded.n_items, top_k=config.neighbors, max_items_per_user=config.max_items_per_user
            ),
        ),
        "swing": (
            lambda: build_swing(
                data.user,
                data.item,
                encoded.n_users,
                encoded.n_items,
                top_k=config.neighbors,
                alpha=config.swing_alpha,
                max_users_per_item=config.max_users_per_item,
                max_items_per_user=config.max_items_per_user,
                order=data.time,
                seed=config.seed,
            ),
            lambda: spark_cf.swing(
                frame,
                encoded.n_items,
                top_k=config.neighbors,
                alpha=config.swing_alpha,
                max_users_per_item=config.max_users_per_item,
                max_items_per_user=config.max_items_per_user,
                seed=config.seed,
            ),
        ),
    }
    rows = []
    for name, (on_numpy, on_spark) in builds.items():
        started = time.perf_counter()
        expected = on_numpy()
        numpy_seconds = time.perf_counter() - started
        started = time.perf_counter()
        actual = on_spark()
        spark_seconds = time.perf_counter() - started
        differ = int((actual.neighbors != expected.neighbors).any(axis=1).sum())
        rows.append(
            {
                "table": name,
                "items": encoded.n_items,
                "items_with_neighbours": int((expected.neighbors[:, 0] >= 0).sum()),
                "numpy_seconds": round(numpy_seconds, 2),
                "spark_seconds": round(spark_seconds, 2),
                "items_differing": differ,
                "max_score_difference": float(np.max(np.abs(actual.scores - expected.scores))),
                "identical": bool(
                    np.array_equal(actual.neighbors, expected.neighbors)
                    and np.array_equal(actual.scores, expected.scores)
                ),
            }
        )
    spark.stop()
    machine = f"{os.cpu_count()} cpu, {platform.machine()}, Python {platform.python_version()}"
    print(f"{args.dataset}: {len(data):,} interactions, {encoded.n_users:,} users, {encoded.n_items:,} items")
    print(f"machine: {machine}; Spark {args.master}, session + data {session_seconds:.1f} s")
    print("| table | items with neighbours | numpy s | Spark s | items differing | max score difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cells = [
            row["table"],
            f"{row['items_with_neighbours']:,} of {row['items']:,}",
            row["numpy_seconds"],
            row["spark_seconds"],
            row["items_differing"],
            f"{row['max_score_difference']:.2e}",
        ]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    print(json.dumps({"dataset": args.dataset, "machine": machine, "master": args.master, "rows": rows}))


if __name__ == "__main__":
    main()
