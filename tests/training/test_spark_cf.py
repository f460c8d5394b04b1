"""The Spark engine builds the numpy builder's artifacts: the ItemCF and Swing tables and the rest of
the core, histories, popularity, statistics, authors (MovieLens-100K and a small synthetic set, Spark
local; one session for the module: starting one takes seconds)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.cf import build_itemcf, build_swing

pytest.importorskip("pyspark", reason="PySpark is not installed (pip install '.[spark]')")
pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install '.[spark]')")
if shutil.which("java") is None:
    pytest.skip("no Java runtime for Spark (Java 17)", allow_module_level=True)

from training import spark_cf, spark_core  # after the skips: they are useless without Spark

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
def spark() -> Iterator[Any]:
    session = spark_cf.spark_session("local[2]", **{"spark.sql.shuffle.partitions": "8"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def frame(movielens: dict[str, Any], spark: Any) -> Any:
    return spark_cf.interactions_frame(
        spark, movielens["user"], movielens["item"], movielens["weight"], movielens["order"]
    )


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


class MemorySink:
    """An `ArraySink` keeping what `save_core` writes: the files a version would hold."""

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}

    def save_array(self, relative_path: str, array: Any) -> Path:
        self.files[relative_path] = np.asarray(array)
        return Path(relative_path)

    def save_json(self, relative_path: str, data: Any) -> Path:
        self.files[relative_path] = data
        return Path(relative_path)


def core_files(core: Any) -> dict[str, Any]:
    from recsys.artifacts import save_core

    sink = MemorySink()
    save_core(core, sink)
    return sink.files


def assert_same_files(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Integer arrays and JSON identical, float arrays within 1e-6."""
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        got = actual[path]
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert got.dtype == value.dtype, path
            assert got.shape == value.shape, path
            np.testing.assert_allclose(got, value, rtol=0, atol=1e-6, err_msg=path)
        elif isinstance(value, np.ndarray):
            assert got.dtype == value.dtype, path
            np.testing.assert_array_equal(got, value, err_msg=path)
        else:
            assert got == value, path


def test_spark_core_writes_the_numpy_core_files(spark: Any) -> None:
    from training.core_builder import CoreConfig, build_core
    from training.data import default_data_dir, load_movielens_100k
    from training.encode import encode, holdout_split

    encoded = encode(load_movielens_100k(default_data_dir()))
    train = encoded.interactions.take(
        holdout_split(encoded.interactions.user, encoded.interactions.time).train
    )
    # The history's tie-break is exercised: users rate several films in the same second.
    assert (np.unique(np.stack([train.user, train.time]), axis=1).shape[1]) < len(train)
    # Small CF caps: the tables are proven above at real caps; here they show that build_core's Spark
    # path builds them from the same frame, in seconds.
    config = CoreConfig(seed=2, neighbors=20, max_items_per_user=40, max_users_per_item=40)
    expected = build_core(train, encoded.catalogue, encoded.users, config, encoded.like_threshold)
    on_spark = dataclasses.replace(config, engine="spark", spark_master="local[2]")
    steps: list[str] = []
    actual = build_core(
        train, encoded.catalogue, encoded.users, on_spark, encoded.like_threshold, steps.append
    )
    assert steps[0] == "history (spark)"
    assert "swing (spark)" in steps
    assert expected.popularity.by_region.lengths()[1:].min() == config.top_per_region  # real region lists
    assert_same_files(core_files(actual), core_files(expected))
    # Bit-identical where the sums are exact (integer ratings, a few months of recency weights).
    np.testing.assert_array_equal(actual.popularity.global_scores, expected.popularity.global_scores)
    np.testing.assert_array_equal(actual.statistics.item_stats, expected.statistics.item_stats)


@pytest.fixture(scope="module")
def synthetic() -> Any:
    """A synthetic set without time, some ratings missing, authors and regions."""
    from training.data.synthetic import SyntheticSpec, generate_synthetic
    from training.encode import Interactions, encode

    encoded = encode(
        generate_synthetic(SyntheticSpec(users=400, items=300, interactions=6000, regions=6, with_time=False))
    )
    data = encoded.interactions
    rating = data.rating.copy()
    rating[::7] = np.nan
    interactions = Interactions(data.user, data.item, rating, data.time, data.liked)
    return dataclasses.replace(encoded, interactions=interactions)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_spark_reads_interactions_and_builds_the_numpy_artifacts(
    spark: Any, synthetic: Any, tmp_path: Path, suffix: str
) -> None:
    from training import core_builder

    train, users, catalogue = synthetic.interactions, synthetic.users, synthetic.catalogue
    assert not train.time.any()
    assert np.isnan(train.rating).any()
    path = spark_core.write_interactions(train, tmp_path / f"train{suffix}")
    frame = spark_core.read_interactions(spark, path).cache()
    summary = spark_core.summarise(frame, users.n_users, catalogue.n_items)
    assert summary.rows == len(train)
    assert not summary.has_time
    config = core_builder.CoreConfig(top_popular=50, top_per_region=20)

    history = spark_core.history(frame, users.n_users, summary.rows)
    expected_history = core_builder.build_history(train, users.n_users)
    for name in ("items", "times", "ratings"):
        np.testing.assert_array_equal(getattr(history, name).offsets, getattr(expected_history, name).offsets)
        np.testing.assert_array_equal(getattr(history, name).values, getattr(expected_history, name).values)

    popularity = spark_core.popularity(frame, users, catalogue.n_items, config, summary)
    expected_popularity = core_builder.build_popularity(train, users, catalogue.n_items, config)
    np.testing.assert_array_equal(popularity.global_scores, expected_popularity.global_scores)
    np.testing.assert_array_equal(popularity.global_top, expected_popularity.global_top)
    np.testing.assert_array_equal(popularity.by_region.offsets, expected_popularity.by_region.offsets)
    np.testing.assert_array_equal(popularity.by_region.values, expected_popularity.by_region.values)
    np.testing.assert_array_equal(
        popularity.by_region_scores.values, expected_popularity.by_region_scores.values
    )
    authors = core_builder.build_author_index(catalogue, popularity)
    expected_authors = core_builder.build_author_index(catalogue, expected_popularity)
    assert expected_authors.items.values.size == catalogue.n_items  # every synthetic item has an author
    np.testing.assert_array_equal(authors.items.values, expected_authors.items.values)

    statistics = spark_core.statistics(frame, users.n_users, catalogue.n_items, popularity)
    expected_statistics = core_builder.build_statistics(
        train, users.n_users, catalogue.n_items, expected_popularity
    )
    np.testing.assert_allclose(statistics.user_stats, expected_statistics.user_stats, rtol=0, atol=1e-6)
    np.testing.assert_allclose(statistics.item_stats, expected_statistics.item_stats, rtol=0, atol=1e-6)
    frame.unpersist()


def test_read_interactions_names_what_is_wrong(spark: Any, synthetic: Any, tmp_path: Path) -> None:
    import pyarrow.parquet

    with pytest.raises(ValueError, match=r"ends in neither \.parquet nor \.csv"):
        spark_core.read_interactions(spark, tmp_path / "train.json")
    with pytest.raises(ValueError, match="no such file or directory"):
        spark_core.read_interactions(spark, tmp_path / "absent.parquet")
    table = spark_core.interactions_table(synthetic.interactions).drop_columns(["row", "liked"])
    pyarrow.parquet.write_table(table, tmp_path / "unordered.parquet")
    with pytest.raises(ValueError, match="has no column liked, row"):
        spark_core.read_interactions(spark, tmp_path / "unordered.parquet")
    frame = spark_core.read_interactions(
        spark, spark_core.write_interactions(synthetic.interactions, tmp_path / "ok.csv")
    )
    with pytest.raises(ValueError, match=r"item: indexes must be in \[0, 10\)"):
        spark_core.summarise(frame, synthetic.n_users, 10)
