"""The ranker on items upserted while serving: content features from their metadata (the
version's category and author tokens), defaults for the id-based ones, finite scores."""

from __future__ import annotations

import time

import numpy as np
import pytest

from recsys.catalogue import NewItems, VersionVocabulary
from recsys.feature_store import CatalogueItem, InProcessFeatureStore
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from services.rank.scorer import OnnxScorer, ScoreJob, _new_item_features


@pytest.fixture(scope="module")
def model(quick_store: ModelStore) -> ServingModel:
    version = quick_store.current()
    assert version is not None
    loaded = ServingModel.load(quick_store.version_path(version), version=version)
    loaded.warm()
    return loaded


async def new_items(model: ServingModel, items: list[CatalogueItem]) -> NewItems:
    store = InProcessFeatureStore()
    await store.upsert_items(items, time.time())
    catalogue = model.core.catalogue
    return NewItems(
        model.version,
        await store.catalogue_revision(),
        catalogue.n_items,
        model.item_lookup,
        VersionVocabulary.of(catalogue),
        await store.catalogue_state(),
        time.time(),
    )


async def test_new_items_get_their_categories_and_defaults_for_the_id_based_features(
    model: ServingModel,
) -> None:
    vocab = [str(name) for name in model.core.catalogue.category_vocab.tolist()]
    view = await new_items(
        model,
        [
            CatalogueItem("new-1", "A", "", (vocab[0], vocab[1])),
            CatalogueItem("new-2", "B", "", ("no such genre",)),
        ],
    )
    n_items = model.core.catalogue.n_items
    items = np.array([3, n_items, n_items + 1, n_items + 7], dtype=np.int64)
    batch = dict(model.item_features.inputs(items))
    _new_item_features(batch, items, [view])
    assert batch["categories"][1, :2].tolist() == [1, 2]
    assert batch["categories"][2].tolist() == [0] * batch["categories"].shape[1]  # unknown genre
    assert batch["categories"][3].tolist() == [0] * batch["categories"].shape[1]  # not a new item
    assert batch["item_id"][1:].tolist() == [0, 0, 0]  # the id-based default: "never seen"
    assert not batch["item_stats"][1:].any()
    np.testing.assert_array_equal(
        batch["categories"][0], model.item_features.inputs(items[:1])["categories"][0]
    )


async def test_the_ranker_scores_new_items_with_finite_probabilities(model: ServingModel) -> None:
    vocab = [str(name) for name in model.core.catalogue.category_vocab.tolist()]
    view = await new_items(
        model, [CatalogueItem(f"new-{n}", "", "", (vocab[n % len(vocab)],)) for n in range(8)]
    )
    n_items = model.core.catalogue.n_items
    items = np.concatenate([np.arange(5), n_items + np.arange(8)]).astype(np.int64)
    length = model.spec.history_length
    history = np.asarray(model.core.history.items.row(0))[-length:]
    users = [
        model.user_features.inputs(0, history, np.ones(history.shape[0], bool)),
        model.user_features.inputs(-1, np.zeros(0, np.int64), np.zeros(0, bool)),
    ]
    jobs = [ScoreJob(model, user, items, None, new_items=view) for user in users]
    scored = OnnxScorer().score(model, jobs)
    for scores in scored.scores:
        for head in model.spec.heads:
            assert scores[head].shape == (items.shape[0],)
            assert np.isfinite(scores[head]).all()
            assert ((scores[head] >= 0) & (scores[head] <= 1)).all()
    # The content features reach the model: new items of different genres score differently.
    assert np.unique(np.round(scored.scores[0]["click"][5:], 6)).shape[0] > 1
