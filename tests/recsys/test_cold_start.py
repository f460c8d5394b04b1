"""The item cold-start evaluation on a small slice: the quick MovieLens-100K store, with
"new" twins of some of its items (their genres only, ids it never saw) and the held-out
ratings of the originals as the new items' events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.content import embed_items
from recsys.evaluation.cold_start import (
    METHODS,
    ColdStartSet,
    cold_start_set_from_json,
    cold_start_set_to_json,
    content_embeddings,
    evaluate_item_cold_start,
    evaluate_item_cold_start_seeds,
    rank_fusion,
)
from recsys.feature_store import CatalogueItem
from recsys.onnx_models import OnnxModel
from recsys.serving_model import ITEM_TOWER, ServingModel
from recsys.store import ModelStore
from training.report import write_report


@pytest.fixture(scope="module")
def version(quick_store: ModelStore) -> tuple[ServingModel, OnnxModel, ColdStartSet]:
    name = quick_store.current()
    assert name is not None
    path = quick_store.version_path(name)
    model = ServingModel.load(path, version=name)
    users = np.load(path / "eval/heldout_user.npy")
    items = np.load(path / "eval/heldout_item.npy")
    catalogue = model.core.catalogue
    # Twins of 300 items in the held-out part: their genres, no id the version knows.
    originals = np.unique(items)[::3][:300]
    twins = tuple(
        CatalogueItem(
            f"twin-{catalogue.item_ids[item]}",
            title=f"Twin of {catalogue.titles[item]}",
            categories=tuple(
                str(catalogue.category_vocab[token - 1]) for token in catalogue.categories[item] if token > 0
            ),
        )
        for item in originals.tolist()
    )
    position = {int(item): index for index, item in enumerate(originals.tolist())}
    keep = np.isin(items, originals)
    event_users = tuple(str(catalogue_user) for catalogue_user in model.core.users.user_ids[users[keep]])
    event_items = np.asarray([position[int(item)] for item in items[keep]], dtype=np.int32)
    return model, OnnxModel(path / ITEM_TOWER), ColdStartSet(twins, event_users, event_items)


def test_every_method_is_measured_over_the_new_items_alone(
    version: tuple[ServingModel, OnnxModel, ColdStartSet],
) -> None:
    model, tower, new = version
    result = evaluate_item_cold_start(model, tower, new, seed=3)
    assert set(result["methods"]) == set(METHODS)
    for values in result["methods"].values():
        assert set(values) == {"recall@50", "hit_rate@50", "ndcg@10"}
        assert all(0.0 <= value <= 1.0 for value in values.values())
    assert len({values["recall@50"] for values in result["methods"].values()}) >= 4  # methods differ
    assert result["new_items"] == 300
    assert result["events"] == len(new.event_users)
    assert result["replayed_events"] == round(0.1 * len(new.event_users))
    assert 0 < result["items_with_look_alike_vector"] <= 300
    users = len(set(new.event_users))
    assert 0 < result["users"] < users
    assert result["users"] + result["validation_users"] <= users
    assert sum(result["merge"]["weights"].values()) > 0
    # Genres and co-engagement carry signal that a random order does not.
    methods = result["methods"]
    assert methods["content_tower"]["recall@50"] > methods["random"]["recall@50"]
    assert methods["look_alike"]["recall@50"] > methods["random"]["recall@50"]
    # The same seed gives the same figures; another seed replays other events.
    assert evaluate_item_cold_start(model, tower, new, seed=3)["methods"] == methods
    assert (
        evaluate_item_cold_start(model, tower, new, seed=4)["methods"]["look_alike"] != methods["look_alike"]
    )


def test_seeds_give_means_and_spreads_and_the_set_round_trips(
    version: tuple[ServingModel, OnnxModel, ColdStartSet], quick_store: ModelStore, tmp_path: Path
) -> None:
    model, tower, new = version
    restored = cold_start_set_from_json(cold_start_set_to_json(new))
    assert restored.items == new.items
    assert restored.event_users == new.event_users
    np.testing.assert_array_equal(restored.event_items, new.event_items)
    summary = evaluate_item_cold_start_seeds(model, tower, restored, seed=0, seeds=2)
    assert summary["seeds"] == [0, 1]
    assert len(summary["runs"]) == 2
    for method in METHODS:
        values = [run["methods"][method]["recall@50"] for run in summary["runs"]]
        assert summary["methods"][method]["recall@50"] == pytest.approx(np.mean(values), abs=1e-5)
        assert summary["methods"][method]["recall@50_std"] == pytest.approx(np.std(values), abs=1e-5)
    # The evaluation report's section and plot.
    name = quick_store.current()
    assert name is not None
    metrics = json.loads((quick_store.version_path(name) / "eval/metrics.json").read_text())
    write_report(tmp_path / "report.md", {**metrics, "item_cold_start": summary}, "ml-100k", [])
    report = (tmp_path / "report.md").read_text()
    assert "## Item cold start" in report
    merge = summary["methods"]["merge"]
    assert f"| merge | {merge['recall@50']:.4f} ± {merge['recall@50_std']:.4f} |" in report
    assert (tmp_path / "cold_start.png").stat().st_size > 1000


def test_new_items_are_embedded_as_served_and_known_ones_refused(
    version: tuple[ServingModel, OnnxModel, ColdStartSet],
) -> None:
    model, tower, new = version
    embedded = content_embeddings(model, tower, new.items[:20])
    np.testing.assert_allclose(embedded, embed_items(model, new.items[:20]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-5)
    known = model.core.catalogue
    with pytest.raises(ValueError, match="already in version"):
        evaluate_item_cold_start(
            model,
            tower,
            ColdStartSet((CatalogueItem(str(known.item_ids[0])),), ("1",), np.zeros(1, np.int32)),
        )


def test_rank_fusion_adds_weighted_reciprocal_ranks() -> None:
    first, second = np.asarray([3, 1, 2], np.int32), np.asarray([1, 4], np.int32)
    # Item 1: 1/62 + 2/61; item 3: 1/61; item 4: 2/62; item 2: 1/63.
    assert rank_fusion([first, second], [1.0, 2.0], 6, 10).tolist() == [1, 4, 3, 2]
    assert rank_fusion([first, second], [1.0, 0.0], 6, 2).tolist() == [3, 1]
