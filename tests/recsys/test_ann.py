"""Which embedding search a version serves from, and that the exact one answers as the graph does."""

from __future__ import annotations

import numpy as np

from recsys.ann import EXACT_SEARCH_CELLS, ExactIndex, HnswIndex, serving_index
from recsys.artifacts import FloatArray


def _unit_rows(rows: int, dim: int, seed: int = 0) -> FloatArray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    unit: FloatArray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def test_a_small_catalogue_is_searched_exactly_and_a_large_one_through_its_index() -> None:
    small = _unit_rows(300, 16)
    index = HnswIndex.build(small)
    assert isinstance(serving_index(index, small), ExactIndex)
    rows = EXACT_SEARCH_CELLS // 16 + 1  # one row past the budget
    large = np.zeros((rows, 16), np.float32)
    assert serving_index(index, large) is index


def test_the_exact_search_gives_the_graphs_neighbours_and_similarities() -> None:
    embeddings = _unit_rows(500, 16)
    exact, graph = ExactIndex(embeddings), HnswIndex.build(embeddings, ef=500)
    query = _unit_rows(1, 16, seed=1)[0]
    for k in (1, 50, 400, 600):  # past the catalogue: all of it
        exact_items, exact_scores = exact.search(query, k)
        graph_items, graph_scores = graph.search(query, k)
        assert exact_items.shape[0] == min(k, 500)
        np.testing.assert_array_equal(exact_items, graph_items)
        np.testing.assert_allclose(exact_scores, graph_scores, atol=1e-5)
        assert np.all(np.diff(exact_scores) <= 0)  # best first
    assert exact.size == 500
    empty_items, empty_scores = exact.search(query, 0)
    assert empty_items.shape == (0,)
    assert empty_scores.shape == (0,)
