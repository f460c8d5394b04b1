"""ONNX export and the parity gate on a small real Keras model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recsys.artifacts import Catalogue
from recsys.content import N_YEAR_BUCKETS, ContentEmbedder, ContentTokens
from recsys.feature_store import CatalogueItem
from recsys.features import FeatureSpec
from recsys.onnx_models import OnnxModel
from training.export import ParityError, check_parity, export_onnx
from training.models.ranker import RankerConfig, build_ranker, serving_twin
from training.models.two_tower import (
    TwoTowerConfig,
    build_two_tower,
    log_sampling_probability,
    train_two_tower,
)

SPEC = FeatureSpec(
    n_user_tokens=30,
    n_item_tokens=50,
    n_category_tokens=5,
    n_author_tokens=4,
    n_region_tokens=3,
    history_length=6,
    max_categories=2,
    user_stat_names=("a", "b", "c"),
    item_stat_names=("a", "b", "c", "d"),
    embedding_dim=8,
    heads=("click", "like"),
)


def _inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    highs = {"user_id": 30, "item_id": 50, "history": 50, "categories": 5, "author": 4, "region": 3}
    inputs = {}
    for spec in SPEC.ranker_inputs():
        shape = (rows, *(int(size) for size in spec.shape[1:] if size is not None))
        if spec.dtype == "int64":
            inputs[spec.name] = rng.integers(0, highs[spec.name], shape).astype(np.int64)
        else:
            inputs[spec.name] = rng.random(shape).astype(np.float32)
    return inputs


def test_exported_ranker_matches_keras_and_takes_inputs_by_name() -> None:
    model = build_ranker(
        SPEC, RankerConfig(id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4)
    )
    data = export_onnx(model, SPEC.ranker_inputs())
    session = OnnxModel(data)
    assert set(session.input_names) == {spec.name for spec in SPEC.ranker_inputs()}
    assert set(session.output_names) == {"click", "like"}
    parity = check_parity(model, data, _inputs(1200))
    assert parity.rows == 1200
    assert parity.max_abs_diff <= 1e-5
    # Inputs are matched by name, not position: a shuffled dict gives the same scores.
    inputs = _inputs(5, seed=1)
    shuffled = dict(reversed(list(inputs.items())))
    np.testing.assert_array_equal(session.run(inputs)["click"], session.run(shuffled)["click"])


def test_parity_gate_refuses_a_model_that_differs() -> None:
    model = build_ranker(
        SPEC, RankerConfig(id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4)
    )
    other = build_ranker(
        SPEC, RankerConfig(id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4, seed=1)
    )
    data = export_onnx(other, SPEC.ranker_inputs())  # different weights
    with pytest.raises(ParityError, match="differs from TensorFlow"):
        check_parity(model, data, _inputs(1000))
    with pytest.raises(ParityError, match="at least 1000 rows"):
        check_parity(model, export_onnx(model, SPEC.ranker_inputs()), _inputs(10))


@pytest.mark.parametrize("attention", ["dot", "din"])
def test_a_ranker_reading_provenance_exports_with_parity_for_each_attention(attention: str) -> None:
    spec = dataclasses.replace(SPEC, provenance_channels=("itemcf", "swing", "two_tower"))
    assert [item.name for item in spec.ranker_inputs()][-1] == "provenance"
    assert spec.provenance_width == 9
    config = RankerConfig(
        id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4, attention=attention
    )
    model = build_ranker(spec, config)
    data = export_onnx(serving_twin(model, spec, config), spec.ranker_inputs())  # as the build does
    assert "provenance" in OnnxModel(data).input_names
    rng = np.random.default_rng(3)
    inputs = _inputs(1000)
    inputs["provenance"] = rng.random((1000, spec.provenance_width)).astype(np.float32)
    assert check_parity(model, data, inputs).max_abs_diff <= 1e-5
    # The provenance moves the scores: the model reads it.
    moved = dict(inputs, provenance=np.zeros_like(inputs["provenance"]))
    assert not np.allclose(OnnxModel(data).run(moved)["click"], OnnxModel(data).run(inputs)["click"])


@pytest.mark.parametrize("attention", ["dot", "din"])
def test_the_exported_twin_computes_the_trained_ranker_with_matrix_products(attention: str) -> None:
    """The build trains the broadcast formulation and exports the MatMul one (see
    training.models.layers): same weights, same scores, and the sums over the history and
    the experts leave the exported graph as MatMuls instead of Mul + ReduceSum."""
    import onnx

    config = RankerConfig(
        id_dim=4, side_dim=2, experts=2, expert_units=(8,), tower_units=4, attention=attention
    )
    model = build_ranker(SPEC, config)
    twin = serving_twin(model, SPEC, config)
    assert check_parity(model, export_onnx(twin, SPEC.ranker_inputs()), _inputs(1000)).max_abs_diff <= 1e-5

    def ops(data: bytes) -> list[str]:
        return [node.op_type for node in onnx.load_from_string(data).graph.node]

    trained, exported = (
        ops(export_onnx(model, SPEC.ranker_inputs())),
        ops(export_onnx(twin, SPEC.ranker_inputs())),
    )
    assert exported.count("MatMul") > trained.count("MatMul")
    # history pooling, attention (dot: logits and pooling) and each head's expert mix
    assert trained.count("ReduceSum") - exported.count("ReduceSum") >= (5 if attention == "dot" else 4)
    # A twin of a differently seeded model would not pass: the weights are what is carried.
    other = build_ranker(SPEC, RankerConfig(**{**config.__dict__, "seed": 1}))
    with pytest.raises(ParityError):
        check_parity(
            model, export_onnx(serving_twin(other, SPEC, config), SPEC.ranker_inputs()), _inputs(1000)
        )


def test_an_unknown_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="attention: must be one of dot, din"):
        build_ranker(SPEC, RankerConfig(attention="transformer"))


def test_the_list_wise_loss_is_softmax_cross_entropy_per_list() -> None:
    from training.models.ranker import _batches, _list_loss, _rows, mean_list_ndcg

    logits = np.array([2.0, 0.0, -1.0, 1.0, 1.0, 3.0], np.float32)
    clicks = np.array([1, 0, 0, 0, 1, 0], np.float32)  # list 0: rows 0-2; list 1: rows 3-4; list 2: row 5
    segments = np.array([0, 0, 0, 1, 1, 2], np.int32)
    loss = float(_list_loss(logits, clicks, segments, 3))  # TensorFlow takes the arrays as they are
    first = np.log(np.exp(logits[:3]).sum()) - 2.0
    second = np.log(np.exp(logits[3:5]).sum()) - 1.0
    assert loss == pytest.approx((first + second) / 2, rel=1e-5)  # the list without a positive adds nothing
    starts, ends = np.array([0, 3, 5]), np.array([3, 5, 6])
    assert _rows(starts, ends, np.array([2, 0])).tolist() == [5, 0, 1, 2]
    assert [chunk.tolist() for chunk in _batches(starts, ends, np.array([0, 1, 2]), 4)] == [[0], [1, 2]]
    # NDCG over lists: list 0 ranks its positive first (1.0); list 1 second (1/log2(3)).
    assert mean_list_ndcg(logits, clicks.astype(bool), segments) == pytest.approx((1 + 1 / np.log2(3)) / 2)


CONTENT_SPEC = dataclasses.replace(
    SPEC,
    n_publisher_buckets=32,
    n_title_buckets=64,
    max_title_tokens=4,
    n_year_buckets=N_YEAR_BUCKETS,
)
WORDS = ("dune", "wars", "star", "night", "love", "sea", "war", "peace", "garden", "city", "ghost", "river")


def _content_catalogue() -> Catalogue:
    """The vocabularies the embedder reads names with: categories 1 = Fiction … 4, authors 1 … 3."""
    n = CONTENT_SPEC.n_item_tokens - 1
    return Catalogue(
        item_ids=np.array([f"item-{index}" for index in range(n)], dtype=np.str_),
        titles=np.array([f"Title {index}" for index in range(n)], dtype=np.str_),
        categories=np.zeros((n, CONTENT_SPEC.max_categories), dtype=np.int32),
        category_vocab=np.array(["Fiction", "History", "Poetry", "Science"], dtype=np.str_),
        authors=np.zeros(n, dtype=np.int32),
        author_vocab=np.array(["Le Guin", "Beard", "Sagan"], dtype=np.str_),
        item_time=np.full(n, np.nan, dtype=np.float32),
    )


def _unseen_items(count: int, seed: int) -> list[CatalogueItem]:
    rng = np.random.default_rng(seed)
    categories = ("Fiction", "History", "Poetry", "Science", "Unknown genre")
    authors = ("Le Guin", "Beard", "Sagan", "Somebody new", "")
    return [
        CatalogueItem(
            f"new-{seed}-{row}",
            " ".join(rng.choice(WORDS, size=int(rng.integers(0, 5)))),
            str(rng.choice(authors)),
            tuple(str(name) for name in rng.choice(categories, size=int(rng.integers(0, 3)), replace=False)),
            str(rng.choice(("Penguin", "Tor", "", "A Small Press"))),
            None if row % 7 == 0 else float(rng.uniform(-1e9, 1.8e9)),
        )
        for row in range(count)
    ]


def test_the_exported_item_tower_embeds_an_unseen_item_from_its_metadata_with_parity() -> None:
    """Trained with item-id dropout (a few steps on random rows), exported to ONNX: items with
    item token 0 and only metadata embed in onnxruntime as in Keras, fed by input name, and
    different metadata gives different embeddings."""
    config = TwoTowerConfig(
        embedding_dim=8,
        id_dim=8,
        side_dim=4,
        hidden=16,
        batch_size=64,
        epochs=1,
        item_id_dropout=0.5,
        holdout_fraction=0.0,
    )
    towers = build_two_tower(CONTENT_SPEC, config)
    assert {spec.name for spec in CONTENT_SPEC.item_tower_inputs()} == set(towers.item_model.input)
    rng = np.random.default_rng(0)
    rows = 640
    catalogue = _content_catalogue()
    content = ContentTokens.of(
        CONTENT_SPEC,
        [" ".join(rng.choice(WORDS, size=3)) for _ in range(rows)],
        [str(name) for name in rng.choice(["Penguin", "Tor", ""], size=rows)],
        rng.uniform(1950, 2020, size=rows),
    )
    items: dict[str, np.ndarray] = {
        "item_id": rng.integers(1, CONTENT_SPEC.n_item_tokens, rows).astype(np.int64),
        "categories": rng.integers(0, CONTENT_SPEC.n_category_tokens, (rows, 2)).astype(np.int64),
        "author": rng.integers(0, CONTENT_SPEC.n_author_tokens, rows).astype(np.int64),
        **content.inputs(),
    }
    users: dict[str, np.ndarray] = {
        "user_id": rng.integers(0, 30, rows).astype(np.int64),
        "region": rng.integers(0, 3, rows).astype(np.int64),
        "history": rng.integers(0, 50, (rows, 6)).astype(np.int64),
        "history_weight": rng.random((rows, 6)).astype(np.float32),
    }
    losses = train_two_tower(towers, users, items, log_sampling_probability(items["item_id"]))
    assert len(losses) == 1
    assert np.isfinite(losses[0])
    assert losses[0] > 0  # the steps ran

    data = export_onnx(towers.item_model, CONTENT_SPEC.item_tower_inputs())
    session = OnnxModel(data)
    assert set(session.input_names) == {spec.name for spec in CONTENT_SPEC.item_tower_inputs()}
    embedder = ContentEmbedder(CONTENT_SPEC, catalogue, session)
    unseen = _unseen_items(1200, seed=1)
    feed = embedder.inputs(unseen)
    assert feed["item_id"].tolist() == [0] * 1200
    parity = check_parity(towers.item_model, data, feed)
    assert parity.max_abs_diff <= 1e-5
    vectors = embedder.embed(unseen)
    expected = np.asarray(towers.item_model(feed, training=False)["item_embedding"])
    np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # One field at a time: each moves the embedding.
    base = CatalogueItem("a", "star wars", "Le Guin", ("Fiction",), "Tor", 1.0e9)
    variants = [
        base,
        dataclasses.replace(base, title="garden city"),
        dataclasses.replace(base, author="Sagan"),
        dataclasses.replace(base, categories=("Science",)),
        dataclasses.replace(base, publisher="Penguin"),
        dataclasses.replace(base, published_at=-1.0e9),
        dataclasses.replace(base, item_id="b"),  # the id of a new item is not an input
    ]
    embedded = embedder.embed(variants)
    for row in range(1, 6):
        assert np.abs(embedded[row] - embedded[0]).max() > 1e-4, variants[row]
    np.testing.assert_array_equal(embedded[6], embedded[0])


def test_large_tables_are_exported_as_initializers_with_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables past the threshold go into the ONNX model as initializers after conversion
    (tf2onnx never carries them through its passes): the model takes only the features by
    name, holds every weight, and matches Keras."""
    import onnx

    import training.export as export

    towers = build_two_tower(SPEC, TwoTowerConfig(embedding_dim=8, id_dim=8, side_dim=4, hidden=16))
    large = [v for v in towers.user_model.variables if int(np.prod(v.shape)) >= 30 * 8]
    assert large, "the user id table should count as large at this threshold"
    monkeypatch.setattr(export, "LARGE_VARIABLE", 30 * 8)
    data = export_onnx(towers.user_model, SPEC.user_tower_inputs())
    graph = onnx.load_from_string(data).graph
    assert [value.name for value in graph.input] == [spec.name for spec in SPEC.user_tower_inputs()]
    initialisers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    grafted = [value for name, value in initialisers.items() if name.startswith("weight__")]
    assert len(grafted) == len(large)
    assert any(np.array_equal(value, np.asarray(large[0].numpy())) for value in grafted)
    inputs = {
        name: value for name, value in _inputs(1200, seed=3).items() if name in OnnxModel(data).input_names
    }
    parity = check_parity(towers.user_model, data, inputs)
    assert parity.max_abs_diff <= 1e-5
