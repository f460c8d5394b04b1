"""Content inputs of the item tower (`recsys.content`): the tokens the build and serving share,
and new items embedded by a real exported item tower (the shared quick MovieLens store)."""

from __future__ import annotations

import datetime
import math
import subprocess
import sys

import numpy as np
import pytest

from recsys.catalogue import VersionVocabulary
from recsys.content import (
    N_YEAR_BUCKETS,
    ContentTokens,
    embed_items,
    hash_bucket,
    publication_year,
    title_words,
    year_bucket,
)
from recsys.feature_store import CatalogueItem
from recsys.features import FeatureSpec
from recsys.serving_model import ServingModel
from recsys.store import ModelStore

SPEC = FeatureSpec(
    n_user_tokens=3,
    n_item_tokens=3,
    n_category_tokens=2,
    n_author_tokens=2,
    n_region_tokens=2,
    history_length=4,
    max_categories=2,
    user_stat_names=("a",),
    item_stat_names=("a",),
    embedding_dim=4,
    heads=("click",),
    n_publisher_buckets=64,
    n_title_buckets=128,
    max_title_tokens=4,
    n_year_buckets=N_YEAR_BUCKETS,
)


def unix(year: int) -> float:
    return datetime.datetime(year, 7, 1, tzinfo=datetime.UTC).timestamp()


def test_hash_buckets_are_stable_across_processes_and_leave_0_for_absent() -> None:
    here = [hash_bucket(text, 1000, "title") for text in ("penguin", "dune", "ursula")]
    assert all(1 <= bucket < 1000 for bucket in here)
    assert hash_bucket("", 1000, "title") == 0
    # Salted per feature: the same text is another bucket as a publisher (with this salt).
    assert hash_bucket("penguin", 1000, "publisher") != hash_bucket("penguin", 1000, "title")
    # Another interpreter with another string-hash seed gives the same buckets.
    code = (
        "from recsys.content import hash_bucket;"
        "print([hash_bucket(t, 1000, 'title') for t in ('penguin', 'dune', 'ursula')])"
    )
    for seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "", **_pythonpath()},
        )
        assert other.stdout.strip() == str(here)
    with pytest.raises(ValueError, match="n_buckets"):
        hash_bucket("x", 1, "title")


def _pythonpath() -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.environ.get("PYTHONPATH", ".")}


def test_title_words_drop_stop_words_numbers_repeats_and_keep_the_limit() -> None:
    assert title_words("Usual Suspects, The (1995)", 8) == ["usual", "suspects"]
    assert title_words("Star Wars: Star Wars Episode IV", 8) == ["star", "wars", "episode", "iv"]
    assert title_words("Le Fabuleux Destin d'Amélie Poulain", 3) == ["fabuleux", "destin", "amélie"]
    assert title_words("", 8) == []
    assert title_words("(1995) ...", 8) == []


def test_publication_years_come_from_years_or_unix_seconds() -> None:
    assert publication_year(1995.0) == 1995
    assert publication_year(unix(2004)) == 2004
    assert publication_year(unix(1950)) == 1950  # before 1970: negative unix seconds
    assert publication_year(None) is None
    assert publication_year(math.nan) is None
    assert publication_year(0.0) is None  # Book-Crossing's placeholder
    assert year_bucket(None) == 0
    assert year_bucket(1900) == year_bucket(1850) == 1
    assert year_bucket(2039) == year_bucket(2500) == N_YEAR_BUCKETS - 1
    assert year_bucket(1994) == year_bucket(1995) != year_bucket(1996)


def test_absent_metadata_is_token_0_and_present_metadata_is_not() -> None:
    tokens = ContentTokens.of(
        SPEC,
        ["", "Dune Messiah (1969)"],
        ["", "  Chilton  BOOKS "],
        [None, 1969.0],
    )
    assert tokens.publisher.tolist()[0] == 0
    assert tokens.publication_year.tolist()[0] == 0
    assert tokens.title_tokens[0].tolist() == [0, 0, 0, 0]
    assert tokens.publisher[1] == hash_bucket("chilton books", 64, "publisher")
    assert tokens.publication_year[1] == year_bucket(1969)
    assert tokens.title_tokens[1].tolist() == [
        hash_bucket("dune", 128, "title"),
        hash_bucket("messiah", 128, "title"),
        0,
        0,
    ]
    assert set(tokens.inputs()) == {"publisher", "publication_year", "title_tokens"}
    assert [spec.name for spec in SPEC.item_tower_inputs()][-3:] == [
        "publisher",
        "publication_year",
        "title_tokens",
    ]
    # The ranker keeps the item's id-and-vocabulary inputs only.
    assert "title_tokens" not in {spec.name for spec in SPEC.ranker_inputs()}
    with pytest.raises(ValueError, match="lengths differ"):
        ContentTokens.of(SPEC, ["a"], [], [None])


def test_a_spec_without_content_reads_as_before() -> None:
    old = FeatureSpec.from_json({key: value for key, value in SPEC.to_json().items() if "bucket" not in key})
    assert not old.has_content
    assert [spec.name for spec in old.item_tower_inputs()] == ["item_id", "categories", "author"]
    assert FeatureSpec.from_json(SPEC.to_json()) == SPEC


def film(model: ServingModel, index: int, item_id: str) -> CatalogueItem:
    """A new item with the metadata of the version's item `index` (MovieLens: no author or
    publisher; the release year as unix seconds, as UpsertItems takes it)."""
    catalogue = model.core.catalogue
    genres = tuple(
        str(catalogue.category_vocab[token - 1]) for token in catalogue.categories[index] if token > 0
    )
    year = float(catalogue.item_time[index])
    return CatalogueItem(
        item_id,
        str(catalogue.titles[index]),
        "",
        genres,
        "",
        unix(int(year)) if math.isfinite(year) else None,
    )


def test_the_item_tower_embeds_unseen_items_from_their_metadata(quick_store: ModelStore) -> None:
    version = quick_store.current()
    assert version is not None
    path = quick_store.version_path(version)
    model = ServingModel.load(path)
    assert model.spec.has_content
    catalogue = model.core.catalogue
    popular = np.asarray(model.core.popularity.global_top)[:200]
    copies = [film(model, int(index), f"copy-{index}") for index in popular]
    vectors = embed_items(model, copies)
    assert vectors.shape == (200, model.spec.embedding_dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # From a version directory: the same vectors.
    np.testing.assert_allclose(embed_items(path, copies[:5]), vectors[:5], atol=1e-6)
    # The tower places a film it has never seen by its metadata: near the film it copies
    # (id-based embeddings of the version's items), for most films among its 1% nearest.
    similarity = vectors @ np.asarray(model.item_embeddings).T
    own = similarity[np.arange(200), popular]
    ranks = (similarity > own[:, None]).sum(axis=1)
    assert np.median(ranks) <= 0.01 * catalogue.n_items, np.median(ranks)
    # Different metadata, different embeddings; the same metadata under another id, the same.
    assert np.min(np.linalg.norm(vectors[1:] - vectors[:-1], axis=1)) > 1e-3
    again = embed_items(model, [film(model, int(popular[0]), "another-id")])
    np.testing.assert_allclose(again[0], vectors[0], atol=1e-6)
    # Each content input changes the embedding: the title, the year, the publisher.
    base = copies[0]
    variants = [
        base,
        CatalogueItem("v", "Completely Different Words", base.author, base.categories, "", base.published_at),
        CatalogueItem("v", base.title, base.author, base.categories, "", unix(1931)),
        CatalogueItem("v", base.title, base.author, base.categories, "Some Studio", base.published_at),
        CatalogueItem("v"),  # nothing known: still a finite unit vector
    ]
    embedded = embed_items(model, variants)
    assert np.isfinite(embedded).all()
    for row in range(1, 5):
        assert np.linalg.norm(embedded[row] - embedded[0]) > 1e-4, row
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)


def test_the_embedder_reads_categories_and_authors_by_the_versions_names(quick_store: ModelStore) -> None:
    version = quick_store.current()
    assert version is not None
    model = ServingModel.load(quick_store.version_path(version))
    embedder = model.content_embedder
    assert embedder is not None
    vocabulary = VersionVocabulary.of(model.core.catalogue)
    name = str(model.core.catalogue.category_vocab[0])
    inputs = embedder.inputs([CatalogueItem("x", categories=(name.upper(), "no such genre"))])
    assert inputs["item_id"].tolist() == [0]
    assert inputs["categories"][0].tolist()[:1] == vocabulary.category_tokens([name])
    assert inputs["categories"][0].tolist()[1:] == [0] * (model.spec.max_categories - 1)
    assert inputs["author"].tolist() == [0]
    assert embedder.embed([]).shape == (0, model.spec.embedding_dim)
