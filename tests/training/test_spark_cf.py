"""The Spark engine builds the numpy builder's ItemCF and Swing tables (MovieLens-100K, Spark local)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from training.cf import build_itemcf, build_swing

pytest.importorskip("pyspark", reason="PySpark is not installed (pip install '.[spark]')")
pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install '.[spark]')")
if shutil.which("java") is None:
    pytest.skip("no Java runtime for Spark (Java 17)", allow_module_level=True)

from training import spark_cf  # after the skips: it is useless without Spark

# PySpark 4.3 warns that it has not been certified with pandas 3 (the train extra's pin); the tables
# below are what says whether it works.
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")

# Caps that bite on MovieLens-100K: 49 users have more than 300 ratings, 117 items more than 200 users.
MAX_ITEMS_PER_USER = 300
MAX_USERS_PER_ITEM = 200


@pytest.fixture(scope="module")
def movielens() -> dict[str, Any]:
    from training.data import default_data_dir, load_movielens_100k
    from training.encode import encode

    encoded = encode(load_movielens_100k(default_data_dir()))
    interactions = encoded.interactions
    return {
        "user": interactions.user,
        "item": interactions.item,
        "weight": 1.0 + interactions.liked.astype(np.float32),
        "order": interactions.time,
        "n_users": encoded.n_users,
        "n_items": encoded.n_items,
    }


@pytest.fixture(scope="module")
def frame(movielens: dict[str, Any]) -> Iterator[Any]:
    spark = spark_cf.spark_session("local[2]", **{"spark.sql.shuffle.partitions": "8"})
    yield spark_cf.interactions_frame(
        spark, movielens["user"], movielens["item"], movielens["weight"], movielens["order"]
    )
    spark.stop()


def assert_same_table(spark_table: Any, numpy_table: Any) -> None:
    assert spark_table.neighbors.shape == numpy_table.neighbors.shape
    different = np.flatnonzero((spark_table.neighbors != numpy_table.neighbors).any(axis=1))
    assert different.size == 0, f"{different.size} items differ, first {different[:5].tolist()}"
    np.testing.assert_allclose(spark_table.scores, numpy_table.scores, rtol=0, atol=1e-6)


def test_spark_itemcf_equals_the_numpy_builder(movielens: dict[str, Any], frame: Any) -> None:
    expected = build_itemcf(
        movielens["user"],
        movielens["item"],
        movielens["weight"],
        movielens["n_users"],
        movielens["n_items"],
        max_items_per_user=MAX_ITEMS_PER_USER,
        order=movielens["order"],
    )
    actual = spark_cf.itemcf(frame, movielens["n_items"], max_items_per_user=MAX_ITEMS_PER_USER)
    assert (expected.neighbors[:, 0] >= 0).mean() > 0.9  # a real table, not padding
    assert_same_table(actual, expected)


def numpy_swing(movielens: dict[str, Any], seed: int) -> Any:
    return build_swing(
        movielens["user"],
        movielens["item"],
        movielens["n_users"],
        movielens["n_items"],
        max_users_per_item=MAX_USERS_PER_ITEM,
        max_items_per_user=MAX_ITEMS_PER_USER,
        order=movielens["order"],
        seed=seed,
    )


def test_spark_swing_equals_the_numpy_builder(movielens: dict[str, Any], frame: Any) -> None:
    expected = numpy_swing(movielens, seed=3)
    actual = spark_cf.swing(
        frame,
        movielens["n_items"],
        max_users_per_item=MAX_USERS_PER_ITEM,
        max_items_per_user=MAX_ITEMS_PER_USER,
        seed=3,
    )
    assert (expected.neighbors[:, 0] >= 0).mean() > 0.9
    assert_same_table(actual, expected)
    # The item sample is seeded: another seed computes popular items from other users.
    other = numpy_swing(movielens, seed=4)
    assert not np.array_equal(other.scores, expected.scores)
