"""LookAlikeSource and look_alike_vectors on hand-computed values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recsys.stages.query import UserQuery
from recsys.stages.sources import LookAlikeSource, look_alike_vectors


def _query(embedding: list[float] | None, excluded: tuple[int, ...] = ()) -> UserQuery:
    return UserQuery(
        user_index=-1,
        region_token=0,
        recent_items=np.zeros(0, np.int32),
        recent_liked=np.zeros(0, bool),
        excluded=np.asarray(sorted(excluded), np.int32),
        embedding=None if embedding is None else np.asarray(embedding, np.float32),
    )


def test_vectors_are_the_normalised_mean_of_the_first_engagers_unit_embeddings() -> None:
    users = np.asarray([[2.0, 0.0], [0.0, 5.0], [3.0, 4.0], [0.0, -1.0]], np.float32)
    vectors, counts = look_alike_vectors([[0, 1], [2], [], [0, 0, 1, 3]], users, limit=2)
    # Item 0: (1, 0) + (0, 1), normalised: each user counts alike, however long their vector.
    np.testing.assert_allclose(vectors[0], [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_allclose(vectors[1], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(vectors[2], [0.0, 0.0])  # nobody engaged: no vector
    # Item 3: a repeated engager counts once, and only the first 2 distinct users (0, 1) do.
    np.testing.assert_allclose(vectors[3], [2**-0.5, 2**-0.5], rtol=1e-6)
    np.testing.assert_array_equal(counts, [2, 1, 0, 2])
    with pytest.raises(ValueError, match="limit"):
        look_alike_vectors([[0]], users, limit=0)


def test_candidates_are_the_engaged_new_items_by_cosine_with_the_user() -> None:
    vectors = np.asarray([[1.0, 0.0], [0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], np.float32)
    source = LookAlikeSource(np.asarray([100, 101, 102, 103], np.int32), vectors)
    assert source.identifier == "look_alike"
    assert len(source) == 3  # item 102 has no engager
    found = source.candidates(_query([0.0, 2.0]), 10)
    # Cosines: 101 → 0.8, 100 → 0, 103 → 0; shifted by +1 (every score positive), best first.
    assert found.items.tolist()[0] == 101
    assert sorted(found.items.tolist()[1:]) == [100, 103]
    np.testing.assert_allclose(found.scores, [1.8, 1.0, 1.0], rtol=1e-6)
    assert source.candidates(_query([1.0, 0.0]), 1).items.tolist() == [100]
    assert source.candidates(_query([1.0, 0.0], excluded=(100,)), 1).items.tolist() == [101]
    assert len(source.candidates(_query(None), 10)) == 0  # no user embedding: nothing
    assert len(source.candidates(_query([1.0, 0.0]), 0)) == 0
    with pytest.raises(ValueError, match="embedding"):
        source.candidates(dataclasses.replace(_query([1.0, 0.0, 0.0])), 5)
    with pytest.raises(ValueError, match="vectors"):
        LookAlikeSource(np.asarray([1, 2], np.int32), np.zeros((3, 2), np.float32))
