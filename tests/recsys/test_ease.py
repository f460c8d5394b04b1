"""EASE against a direct computation of its closed form, exclusion, the catalogue limit, and the
truncated neighbour table the `ease` channel serves."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.artifacts import Ragged
from recsys.evaluation import ease
from recsys.evaluation.ease import MAX_ITEMS, PAD, CatalogueEase, EaseGram, EaseModel, gram_matrix

# 5 users × 4 items, binary.
CONSUMED = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [0, 1, 1, 0],
        [1, 0, 0, 1],
        [0, 0, 1, 1],
    ]
)


def fit(consumed: np.ndarray, l2: float) -> EaseModel:
    users, items = np.nonzero(consumed)
    return EaseModel.fit(users, items, consumed.shape[0], consumed.shape[1], l2)


def closed_form(consumed: np.ndarray, l2: float) -> np.ndarray:
    """B_ij = −P_ij / P_jj with P = (XᵀX + λI)⁻¹, and B_jj = 0, element by element."""
    x = consumed.astype(np.float64)
    inverse = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    n_items = x.shape[1]
    weights = np.zeros((n_items, n_items))
    for i in range(n_items):
        for j in range(n_items):
            if i != j:
                weights[i, j] = -inverse[i, j] / inverse[j, j]
    return weights


@pytest.mark.parametrize("l2", [0.5, 10.0])
def test_weights_match_the_closed_form(l2: float) -> None:
    model = fit(CONSUMED, l2)
    assert model.weights.dtype == np.float64
    np.testing.assert_allclose(model.weights, closed_form(CONSUMED, l2), atol=1e-12)
    assert (np.diag(model.weights) == 0).all()
    assert model.l2 == l2


def test_a_large_catalogue_is_fitted_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ease, "FLOAT64_MAX_ITEMS", 3)
    model = fit(CONSUMED, 0.5)
    assert model.weights.dtype == np.float32
    np.testing.assert_allclose(model.weights, closed_form(CONSUMED, 0.5), atol=1e-5)


def test_scores_are_the_history_times_the_weights() -> None:
    model = fit(CONSUMED, 1.0)
    histories = [np.array([0, 1]), np.array([3]), np.array([], dtype=np.int64), np.array([2, 2])]
    indicator = np.zeros((4, 4))
    indicator[0, [0, 1]] = indicator[1, 3] = indicator[3, 2] = 1
    np.testing.assert_allclose(model.score_users(histories), indicator @ model.weights, atol=1e-12)


def test_top_k_excludes_the_given_items_best_first() -> None:
    model = fit(CONSUMED, 1.0)
    histories = [np.flatnonzero(row) for row in CONSUMED]
    top = model.top_k(histories, 2, exclude=histories, batch_size=2)
    assert top.dtype == np.int32
    assert top.shape == (5, 2)
    scores = model.score_users(histories)
    for user, history in enumerate(histories):
        allowed = np.setdiff1d(np.arange(4), history)
        expected = allowed[np.argsort(-scores[user, allowed], kind="stable")][:2].tolist()
        assert top[user].tolist() == expected + [PAD] * (2 - len(expected))
        assert not set(top[user].tolist()) & set(history.tolist())


def test_top_k_pads_when_fewer_items_are_left() -> None:
    model = fit(CONSUMED, 1.0)
    top = model.top_k([np.array([0])], 4, exclude=[np.array([0, 1, 2])])
    assert top.tolist() == [[3, PAD, PAD, PAD]]


def test_refuses_catalogues_above_max_items() -> None:
    with pytest.raises(ValueError, match=rf"n_items: {MAX_ITEMS + 1} is above EASE's MAX_ITEMS"):
        EaseModel.fit(np.array([0]), np.array([0]), 1, MAX_ITEMS + 1, 1.0)


@pytest.mark.parametrize(
    ("users", "items", "l2", "problem"),
    [
        ([0, 0], [1, 1], 1.0, r"pair \(0, 1\) occurs more than once"),
        ([0], [4], 1.0, "item_index: 4 is outside"),
        ([0], [1], 0.0, "l2"),
    ],
)
def test_refuses_bad_inputs(users: list[int], items: list[int], l2: float, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        EaseModel.fit(np.array(users), np.array(items), 1, 4, l2)


def test_top_k_refuses_mismatched_exclusions_and_bad_k() -> None:
    model = fit(CONSUMED, 1.0)
    with pytest.raises(ValueError, match="exclude: has 0 entries, histories has 1"):
        model.top_k([np.array([0])], 1, exclude=[])
    with pytest.raises(ValueError, match="k: expected an integer in"):
        model.top_k([np.array([0])], 5, exclude=[np.array([0])])


def movielens_slice(rows: int) -> tuple[Ragged, int]:
    """The first `rows` ratings of MovieLens-100K as histories (user → item indexes)."""
    from training.data.paths import default_data_dir

    ratings = np.loadtxt(default_data_dir() / "ml-100k" / "u.data", dtype=np.int64, max_rows=rows)
    _, users = np.unique(ratings[:, 0], return_inverse=True)
    _, items = np.unique(ratings[:, 1], return_inverse=True)
    order = np.lexsort((items, users))
    n_users = int(users.max()) + 1
    return Ragged.from_groups(users[order], items[order].astype(np.int32), n_users), int(items.max()) + 1


@pytest.mark.parametrize("max_dense", [10_000, 400])
def test_the_neighbor_table_is_each_items_top_k_of_the_dense_weights(max_dense: int) -> None:
    """On a real slice (with and without the most-consumed restriction): row i holds the k largest
    positive B[i, j] (what consuming i adds to j), best first, ties by the smaller index."""
    history, n_items = movielens_slice(5000)
    fitted = CatalogueEase.fit(history, n_items, 50.0, max_dense=max_dense)
    kept = fitted.kept
    assert kept.shape[0] == min(n_items, max_dense)
    if max_dense < n_items:  # the most consumed items
        counts = np.bincount(np.asarray(history.values), minlength=n_items)
        assert counts[kept].min() >= np.delete(counts, kept).max()
    k = 20
    table = fitted.neighbor_table(k)
    table.validate()
    assert table.neighbors.shape == (n_items, k)
    dense = fitted.model.weights.astype(np.float32)
    assert not np.allclose(dense, dense.T)  # B is not symmetric: rows and columns differ
    for position, item in enumerate(kept):
        row = dense[position]
        positive = np.flatnonzero(row > 0)
        best = positive[np.lexsort((positive, -row[positive]))][:k]
        count = best.shape[0]
        assert table.neighbors[item, :count].tolist() == kept[best].tolist()
        np.testing.assert_array_equal(table.scores[item, :count], row[best])
        assert (table.neighbors[item, count:] == PAD).all()
    outside = np.setdiff1d(np.arange(n_items), kept)
    assert (table.neighbors[outside] == PAD).all()
    # The baseline's lists come from the same fit: an item outside `kept` is never recommended.
    lists = fitted.top_k([np.asarray(history.row(user)) for user in range(5)], 50)
    for user, items in enumerate(lists):
        assert not set(items.tolist()) & set(np.asarray(history.row(user)).tolist())
        assert set(items.tolist()) <= set(kept.tolist())


def test_a_signed_table_keeps_each_items_k_strongest_weights_negative_ones_last() -> None:
    history, n_items = movielens_slice(5000)
    fitted = CatalogueEase.fit(history, n_items, 50.0, max_dense=400)
    k = 30
    table = fitted.neighbor_table(k, signed=True)
    table.validate()
    dense = fitted.model.weights.astype(np.float32)
    negatives = 0
    for position, item in enumerate(fitted.kept):
        row = dense[position]
        nonzero = np.flatnonzero(row != 0)
        strongest = nonzero[np.lexsort((nonzero, -np.abs(row[nonzero])))][:k]
        expected = strongest[np.lexsort((strongest, -row[strongest]))]
        assert table.neighbors[item, : expected.shape[0]].tolist() == fitted.kept[expected].tolist()
        np.testing.assert_array_equal(table.scores[item, : expected.shape[0]], row[expected])
        negatives += int((row[expected] < 0).sum())
    assert negatives > 0  # B has negative weights among the strongest: the table keeps them


def test_one_gram_matrix_fits_every_l2_as_a_fresh_fit_would() -> None:
    history, n_items = movielens_slice(2000)
    gram = EaseGram.of(history, n_items)
    for l2 in (10.0, 300.0):
        np.testing.assert_array_equal(
            gram.fit(l2).model.weights, CatalogueEase.fit(history, n_items, l2).model.weights
        )
    users = np.repeat(np.arange(history.n_rows), history.lengths())
    np.testing.assert_array_equal(
        gram.gram, gram_matrix(users, np.asarray(history.values), history.n_rows, n_items)
    )


def test_the_gram_matrix_is_the_same_from_pairs_as_from_the_dense_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    history, n_items = movielens_slice(3000)
    users = np.repeat(np.arange(history.n_rows), history.lengths())
    items = np.asarray(history.values)
    dense = gram_matrix(users, items, history.n_rows, n_items)
    monkeypatch.setattr(ease, "_DENSE_GRAM_CELLS", 0)  # every catalogue takes the pairs path
    monkeypatch.setattr(ease, "_PAIRS_PER_BATCH", 5000)  # in several batches
    pairs = gram_matrix(users, items, history.n_rows, n_items)
    indicator = np.zeros((history.n_rows, n_items))
    indicator[users, items] = 1
    np.testing.assert_array_equal(dense, indicator.T @ indicator)
    np.testing.assert_array_equal(pairs, dense)
