"""EASE against a direct computation of its closed form, exclusion, and the catalogue limit."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.evaluation import ease
from recsys.evaluation.ease import MAX_ITEMS, PAD, EaseModel

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
