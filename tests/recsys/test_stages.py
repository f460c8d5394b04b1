"""Stage logic on small hand-computed examples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recsys.artifacts import AuthorIndex, Popularity, Ragged
from recsys.errors import InvalidArgument
from recsys.evaluation.metrics import auc, ndcg_at_k, recall_at_k
from recsys.feature_store import LiveEvent, Snapshot, UserState
from recsys.feature_store.bloom import ExposureFilterConfig, item_digests
from recsys.features import (
    CrossFeatures,
    FeatureSpec,
    PairScores,
    Provenance,
    history_inputs,
    history_matrix,
    provenance_features,
    provenance_width,
)
from recsys.neighbors import NeighborTable
from recsys.stages.filters import ExposureFilter
from recsys.stages.fusion import Fusion
from recsys.stages.merge import WeightedMerge
from recsys.stages.query import EMPTY_INT, UserHistory, UserQuery, build_query
from recsys.stages.sources import (
    AuthorSource,
    Candidates,
    GeoSource,
    NeighborSource,
    group_sum,
    not_excluded,
    popular_source,
)
from tests.recsys.feature_store import tiny_core


def query(
    recent: list[int],
    liked: list[bool] | None = None,
    excluded: tuple[int, ...] = (),
    region: int = 0,
    **kw: object,
) -> UserQuery:
    return UserQuery(
        user_index=0,
        region_token=region,
        recent_items=np.array(recent, np.int32),
        recent_liked=np.array(liked if liked is not None else [False] * len(recent)),
        excluded=np.unique(np.array([*recent, *excluded], np.int32)),
        **kw,  # type: ignore[arg-type]
    )


TABLE = NeighborTable(
    neighbors=np.array([[1, 2, -1], [0, 3, 2], [4, 0, -1], [1, -1, -1], [2, -1, -1]], np.int32),
    scores=np.array([[0.9, 0.5, 0], [0.9, 0.4, 0.2], [0.7, 0.5, 0], [0.4, 0, 0], [0.7, 0, 0]], np.float32),
)


def test_neighbor_source_aggregates_with_recency_and_rating_weights() -> None:
    source = NeighborSource("itemcf", TABLE, decay=0.5, liked_boost=2.0)
    # recent: item 0 (older, liked → weight 0.5·2 = 1), item 1 (newest, weight 1)
    result = source.candidates(query([0, 1], [True, False]), quota=10)
    # item 2: 0.5·1 (via 0) + 0.2·1 (via 1) = 0.7; item 3: 0.4·1 = 0.4; 0 and 1 are excluded
    assert result.items.tolist() == [2, 3]
    np.testing.assert_allclose(result.scores, [0.7, 0.4], rtol=1e-6)
    assert source.candidates(query([0, 1], [True, False]), quota=1).items.tolist() == [2]
    assert len(source.candidates(query([]), quota=10)) == 0


def test_group_sum_gives_the_same_sums_sorted_or_by_catalogue_bincount() -> None:
    rng = np.random.default_rng(4)
    for n_items, entries in ((50, 400), (2000, 100), (18_000, 200_000)):
        items = rng.integers(0, n_items, entries).astype(np.int32)
        weights = rng.normal(size=entries).astype(np.float32)  # signed, as a signed EASE table
        sorted_items, sorted_sums = group_sum(items, weights)
        dense_items, dense_sums = group_sum(items, weights, n_items)
        assert dense_items.dtype == sorted_items.dtype == np.int32
        np.testing.assert_array_equal(dense_items, sorted_items)
        np.testing.assert_array_equal(dense_items, np.unique(items))
        np.testing.assert_allclose(dense_sums, sorted_sums, rtol=1e-5, atol=1e-6)
        expected = np.zeros(n_items)
        np.add.at(expected, items, weights.astype(np.float64))
        np.testing.assert_allclose(dense_sums, expected[dense_items], rtol=1e-5, atol=1e-6)


def test_excluded_items_never_come_back() -> None:
    source = NeighborSource("itemcf", TABLE)
    result = source.candidates(query([0, 1], excluded=(2,)), quota=10)
    assert 2 not in result.items.tolist()
    mask = not_excluded(np.array([5, 1, 9, 3]), np.array([1, 3, 7], np.int32))
    assert mask.tolist() == [True, False, True, False]


def test_an_unknown_user_with_live_events_is_queried_from_them() -> None:
    """An id the version has never seen (index −1, empty snapshot) whose live events name
    items the version knows: those items, in event order, are the query's history, its
    exclusions and its engaged authors, and the query is no cold start. Impressions and items
    the version does not know are left out; without such events the user stays cold."""
    core = tiny_core()
    core = dataclasses.replace(
        core,
        catalogue=dataclasses.replace(
            core.catalogue,
            authors=np.array([0, 1, 1, 2, 0, 2], np.int32),
            author_vocab=np.array(["ann", "ben"], np.str_),
        ),
    )
    events = (
        LiveEvent("item-4", "click", 1.0, 100.0, "e1"),
        LiveEvent("item-1", "impression", 1.0, 101.0, "e2"),  # shown, not consumed
        LiveEvent("not-in-this-version", "click", 1.0, 102.0, "e3"),
        LiveEvent("item-2", "rating", 2.0, 103.0, "e4"),  # below the like threshold (4.0)
        LiveEvent("item-3", "like", 1.0, 104.0, "e5"),
    )
    state = UserState(Snapshot.empty(), events, exposure_filter=None, cache_items=())
    lookup = {str(item): index for index, item in enumerate(core.catalogue.item_ids.tolist())}
    history = UserHistory.from_state(state, lookup, core.like_threshold)
    assert history.items.tolist() == [4, 2, 3]
    assert history.liked.tolist() == [True, False, True]
    assert history.region == 0

    live = build_query(core, -1, region_token=2, history_items=history.items, history_liked=history.liked)
    assert live.user_index == -1
    assert not live.cold_start
    assert live.region_token == 2  # the request's region still applies
    assert live.recent_items.tolist() == [4, 2, 3]
    assert live.recent_liked.tolist() == [True, False, True]
    assert live.excluded.tolist() == [2, 3, 4]
    # item 3 (author 2, liked: weight 2) and item 2 (author 1, weight 1); item 4 has none
    assert live.engaged_authors.tolist() == [2, 1]
    np.testing.assert_allclose(live.engaged_author_weights, [2 / 3, 1 / 3], rtol=1e-6)
    # The item-to-item channels start from them: 4 → 2; 2 → 4, 0; 3 → 1 (2, 3, 4 consumed).
    assert set(NeighborSource("itemcf", TABLE).candidates(live, quota=10).items.tolist()) == {0, 1}

    assert build_query(core, -1, region_token=2).cold_start
    no_known_items = UserState(Snapshot.empty(), events[1:3], exposure_filter=None, cache_items=())
    unusable = UserHistory.from_state(no_known_items, lookup, core.like_threshold)
    assert unusable.items.tolist() == []
    assert build_query(core, -1, history_items=unusable.items, history_liked=unusable.liked).cold_start
    assert build_query(core, -1, history_items=EMPTY_INT, history_liked=np.zeros(0, bool)).cold_start
    # A known user is queried from their stored history, as before.
    alice = build_query(core, 0)
    assert not alice.cold_start
    assert alice.recent_items.tolist() == [0, 3, 5]


def test_a_neighbor_source_reading_further_back_weighs_the_whole_history() -> None:
    # The version's recent items are [1]; the whole history is 4, 0, 1 (oldest → newest).
    history = np.array([4, 0, 1], np.int32)
    recent = query([1], [False], history_items=history, history_liked=np.array([True, False, False]))
    recent = dataclasses.replace(recent, excluded=np.unique(history))
    assert NeighborSource("ease", TABLE).candidates(recent, 10).items.tolist() == [3, 2]
    whole = NeighborSource("ease", TABLE, decay=1.0, liked_boost=1.0, history_items=500)
    result = whole.candidates(recent, 10)
    # 2: 0.7 (via 4) + 0.5 (via 0) + 0.2 (via 1); 3: 0.4 (via 1); consumed 4, 0, 1 never come back,
    # neither the recent one's neighbour 0 nor the older items' neighbours 4 and 1.
    assert result.items.tolist() == [2, 3]
    np.testing.assert_allclose(result.scores, [1.4, 0.4], rtol=1e-6)
    last_two = NeighborSource("ease", TABLE, decay=0.5, liked_boost=1.0, history_items=2)
    # 0 (older: 0.5) and 1 (newest: 1): 2 gets 0.5·0.5 + 0.2 = 0.45, 3 gets 0.4
    np.testing.assert_allclose(last_two.candidates(recent, 10).scores, [0.45, 0.4], rtol=1e-6)
    # A query without its whole history (built by hand) falls back to its recent items.
    assert whole.candidates(query([0, 1]), 10).items.tolist() == [2, 3]


def test_geo_popular_and_author_sources() -> None:
    popularity = Popularity(
        global_scores=np.array([5, 9, 1, 7, 3], np.float32),
        global_top=np.array([1, 3, 0, 4, 2], np.int32),
        by_region=Ragged(np.array([0, 0, 3]), np.array([4, 2, 1], np.int32)),
        by_region_scores=Ragged(np.array([0, 0, 3]), np.array([8, 6, 2], np.float32)),
    )
    assert popular_source(popularity).candidates(query([1]), 2).items.tolist() == [3, 0]
    geo = GeoSource(popularity)
    assert geo.candidates(query([2], region=1), 5).items.tolist() == [4, 1]
    assert len(geo.candidates(query([2], region=0), 5)) == 0  # unknown region: nothing
    authors = AuthorIndex(
        items=Ragged(np.array([0, 0, 2, 3]), np.array([0, 4, 2], np.int32)),
        scores=Ragged(np.array([0, 0, 2, 3]), np.array([1.0, 0.5, 0.8], np.float32)),
    )
    result = AuthorSource(authors).candidates(
        query(
            [0],
            engaged_authors=np.array([2, 1], np.int32),
            engaged_author_weights=np.array([0.75, 0.25], np.float32),
        ),
        quota=5,
    )
    # author 2 → item 2 (0.8·0.75 = 0.6); author 1 → item 4 (0.5·0.25); item 0 consumed
    assert result.items.tolist() == [2, 4]
    np.testing.assert_allclose(result.scores, [0.6, 0.125])


def test_weighted_merge_is_reciprocal_rank_fusion_with_channel_masks() -> None:
    merge = WeightedMerge(("a", "b"), {"a": 1.0, "b": 2.0}, rank_offset=1.0)
    lists = {
        "a": Candidates(np.array([10, 11], np.int32), np.array([5, 4], np.float32)),
        "b": Candidates(np.array([11, 12], np.int32), np.array([0.9, 0.1], np.float32)),
    }
    merged = merge.merge(lists, budget=3)
    # 10: 1/1 = 1; 11: 1/2 + 2/1 = 2.5; 12: 2/2 = 1 → 11, then 10 and 12 tie (by index)
    assert merged.items.tolist() == [11, 10, 12]
    np.testing.assert_allclose(merged.scores, [2.5, 1.0, 1.0])
    assert merged.channels_of(0) == ["a", "b"]
    assert merged.channels_of(2) == ["b"]
    assert merge.merge(lists, budget=1).items.tolist() == [11]


def test_the_merge_keeps_each_candidates_rank_and_scaled_score_per_channel() -> None:
    merge = WeightedMerge(("a", "b", "c"), {"a": 1.0, "b": 1.0, "c": 1.0}, rank_offset=1.0)
    lists = {
        "a": Candidates(np.array([10, 11, 13], np.int32), np.array([4.0, 2.0, 1.0], np.float32)),
        "b": Candidates(np.array([13, 12], np.int32), np.array([-0.5, -2.0], np.float32)),
    }
    merged = merge.merge(lists, budget=3)
    # 10: 1; 13: 1/3 + 1 = 1.33; 11: 1/2; 12: 1/2 → 13, 10, then 11 (ties by index), 12 cut
    assert merged.items.tolist() == [13, 10, 11]
    assert merged.channel_ranks.tolist() == [[2, 0, -1], [0, -1, -1], [1, -1, -1]]
    # Each channel's score over the largest |score| of its list (a: 4, b: 2); 0 when absent.
    expected = np.array([[0.25, -0.25, 0], [1, 0, 0], [0.5, 0, 0]], np.float32)
    np.testing.assert_allclose(merged.channel_scores, expected)
    provenance = merged.take(np.array([2, 0])).provenance()
    assert provenance.ranks.tolist() == [[1, -1, -1], [2, 0, -1]]
    np.testing.assert_allclose(provenance.merge_scores, [0.5, 4 / 3], rtol=1e-6)
    empty = merge.merge({}, budget=3)
    assert empty.channel_ranks.shape == (0, 3)
    assert empty.channel_scores.shape == (0, 3)


def _merge_by_definition(
    names: tuple[str, ...],
    weights: dict[str, float],
    offset: float,
    lists: dict[str, Candidates],
    budget: int,
) -> list[tuple[int, float, int, list[int], list[float]]]:
    """Reciprocal-rank fusion item by item, in plain Python: (item, score, mask, ranks, scaled)."""
    rows: dict[int, list] = {}  # type: ignore[type-arg]
    for bit, name in enumerate(names):
        candidates = lists.get(name)
        if candidates is None or len(candidates) == 0 or weights.get(name, 1.0) <= 0:
            continue
        top = max(abs(float(score)) for score in candidates.scores)
        for rank, (item, score) in enumerate(
            zip(candidates.items.tolist(), candidates.scores.tolist(), strict=True)
        ):
            row = rows.setdefault(item, [0.0, 0, [-1] * len(names), [0.0] * len(names)])
            row[0] += weights.get(name, 1.0) / (offset + rank)
            row[1] |= 1 << bit
            row[2][bit] = rank
            row[3][bit] = score / top if top > 0 else 0.0
    best = sorted(rows.items(), key=lambda entry: (-entry[1][0], entry[0]))[:budget]
    return [(item, row[0], row[1], row[2], row[3]) for item, row in best]


@pytest.mark.parametrize("seed", range(20))
def test_the_merge_matches_its_definition_on_random_lists(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = tuple(f"channel{index}" for index in range(int(rng.integers(1, 10))))
    weights = {name: float(rng.choice([0.0, 0.25, 1.0, 2.0])) for name in names}
    lists = {}
    for name in names:
        if rng.random() < 0.2:
            continue  # the channel gave nothing
        size = int(rng.integers(0, 80))
        scores = np.sort(rng.normal(size=size)).astype(np.float32)[::-1]
        if rng.random() < 0.1:
            scores = np.zeros(size, np.float32)  # a list of zero scores scales to zeros
        items = rng.choice(int(rng.integers(max(size, 1), 150)), size, replace=False).astype(np.int32)
        lists[name] = Candidates(items, scores.copy())
    budget = int(rng.integers(1, 200))
    offset = float(rng.choice([1.0, 60.0]))
    merged = WeightedMerge(names, weights, rank_offset=offset).merge(lists, budget)
    expected = _merge_by_definition(names, weights, offset, lists, budget)
    assert merged.items.tolist() == [item for item, *_ in expected]
    np.testing.assert_allclose(merged.scores, [score for _, score, *_ in expected], rtol=1e-6)
    assert merged.channel_masks.tolist() == [mask for _, _, mask, *_ in expected]
    assert merged.channel_ranks.tolist() == [ranks for *_, ranks, _ in expected]
    np.testing.assert_allclose(
        merged.channel_scores.reshape(len(expected), len(names)),
        np.array([scaled for *_, scaled in expected], np.float32).reshape(len(expected), len(names)),
        rtol=1e-6,
    )


def test_the_merge_refuses_more_channels_than_its_masks_hold() -> None:
    with pytest.raises(ValueError, match="at most 64 channels"):
        WeightedMerge(tuple(f"c{index}" for index in range(65)), {})


def test_provenance_features_by_the_specs_channel_order() -> None:
    provenance = Provenance(
        ("b", "cache", "a"),
        np.array([[0, -1, 3], [-1, 0, -1], [-1, -1, -1]], np.int16),
        np.array([[1.0, 0, 0.5], [0, 1.0, 0], [0, 0, 0]], np.float32),
        np.array([0.5, 1.0, 0.0], np.float32),
    )
    features = provenance_features(("a", "b", "z"), provenance)
    assert features.shape == (3, provenance_width(("a", "b", "z"))) == (3, 9)
    # row 0: a at rank 3 → 1/log2(5), score 0.5; b at rank 0 → 1, score 1; z absent;
    # merge rank 1 (of 3, by merge score) → 1/log2(3), score 0.5 / 1; found by 2 of 3.
    expected = [1 / np.log2(5), 0.5, 1.0, 1.0, 0, 0, 1 / np.log2(3), 0.5, 2 / 3]
    np.testing.assert_allclose(features[0], expected, rtol=1e-6)
    # row 1: only the cache, which the spec does not read; merge rank 0 → 1.
    np.testing.assert_allclose(features[1], [0, 0, 0, 0, 0, 0, 1.0, 1.0, 0], rtol=1e-6)
    # row 2: a random negative recall never returned: nothing at all.
    assert not features[2].any()
    assert not provenance_features(("a", "b", "z"), Provenance.absent(4)).any()


def test_fusion_formulas() -> None:
    scores = {"click": np.array([0.5, 0.2], np.float32), "like": np.array([0.1, 0.9], np.float32)}
    summed = Fusion("weighted_sum", {"like": 2.0}).fuse(scores)
    np.testing.assert_allclose(summed, [0.5 + 0.2, 0.2 + 1.8], rtol=1e-6)
    product = Fusion("weighted_product", {"click": 1.0, "like": 2.0}, {"like": 0.5}).fuse(scores)
    np.testing.assert_allclose(product, [1.5 * 1.2**0.5, 1.2 * 2.8**0.5], rtol=1e-6)
    with pytest.raises(InvalidArgument, match=r"fusion.weights: unknown tasks \['share'\]"):
        Fusion("weighted_sum", {"share": 1.0}).validate(("click", "like"))


def test_metrics_on_hand_examples() -> None:
    ranked = np.array([5, 3, 8, 1])
    relevant = np.array([3, 1, 7])
    assert recall_at_k(ranked, relevant, 2) == pytest.approx(1 / 2)
    assert recall_at_k(ranked, relevant, 4) == pytest.approx(2 / 3)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(ranked, relevant, 10) == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / ideal)
    assert auc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5]), np.array([True, False])) == pytest.approx(0.5)


SPEC = FeatureSpec(
    10,
    20,
    3,
    3,
    3,
    history_length=4,
    max_categories=2,
    user_stat_names=("a",),
    item_stat_names=("b",),
    embedding_dim=2,
    heads=("click",),
)


def test_history_inputs_match_the_vectorised_training_version() -> None:
    items = np.array([3, 7, 1, 9, 4, 2], np.int32)
    liked = np.array([True, False, False, True, False, True])
    tokens, weights = history_inputs(SPEC, items[:5], liked[:5])
    assert tokens.tolist() == [5, 10, 2, 8]  # items 4, 9, 1, 7 (+1), most recent first
    assert weights.tolist() == [1.0, 2.0, 1.0, 1.0]
    matrix, matrix_weights = history_matrix(SPEC, items, liked, np.array([0, 0]), np.array([5, 1]))
    assert matrix[0].tolist() == tokens.tolist()
    assert matrix_weights[0].tolist() == weights.tolist()
    assert matrix[1].tolist() == [4, 0, 0, 0]


def test_pair_scores_and_cross_features() -> None:
    pairs = PairScores(TABLE.neighbors, TABLE.scores)
    np.testing.assert_allclose(
        pairs.lookup(np.array([0, 1, 3, 9, -1]), np.array([2, 3, 0, 0, 0])), [0.5, 0.4, 0, 0, 0]
    )
    embeddings = np.eye(5, 2, dtype=np.float32)
    cross = CrossFeatures(pairs, pairs, embeddings)
    features = cross.compute(
        np.array([[1, 2, 0]]),
        np.array([[1.0, 3.0, 0.0]], np.float32),
        np.array([2]),
        np.array([0.5, 2.0], np.float32),
    )
    # history items 0 (w 1) and 1 (w 3) → candidate 2: sims 0.5 and 0.2
    mean = (0.5 * 1 + 0.2 * 3) / 4
    np.testing.assert_allclose(features[0], [mean, 0.5, np.log1p(mean), np.log1p(0.5), 0.0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_one_history_against_many_candidates_scores_every_pair_as_lookup_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items, width = int(rng.integers(2, 120)), int(rng.integers(1, 12))
    width = min(width, n_items)
    neighbors = np.stack([rng.choice(n_items, width, replace=False) for _ in range(n_items)])
    neighbors[rng.random(neighbors.shape) < 0.2] = -1  # short rows pad with −1
    pairs = PairScores(neighbors, rng.random(neighbors.shape).astype(np.float32))
    # Unknown indexes on both sides, and candidates repeated (each copy gets the same row).
    history = rng.integers(-2, n_items + 2, size=int(rng.integers(1, 30)))
    candidates = rng.integers(-2, n_items + 2, size=int(rng.integers(1, 50)))
    for _ in range(2):  # the per-thread map is clean again after a call
        result = pairs.lookup_history(history, candidates)
        expected = pairs.lookup(
            np.broadcast_to(history[None, :], (candidates.shape[0], history.shape[0])),
            np.broadcast_to(candidates[:, None], (candidates.shape[0], history.shape[0])),
        )
        np.testing.assert_array_equal(result, expected)


def test_exposure_filter_drops_shown_items_and_counts_them() -> None:
    config = ExposureFilterConfig(capacity=100, error_rate=0.001)
    ids = [f"item-{i}" for i in range(50)]
    shown = config.new_slice()
    shown.add_many(ids[:10])
    stage = ExposureFilter(config.snapshot([shown.to_bytes()]), item_digests(ids))
    candidates = Candidates(
        np.arange(50, dtype=np.int32)[::-1].copy(), np.linspace(1, 0, 50, dtype=np.float32)
    )
    result = stage.apply(candidates)
    assert stage.identifier == "exposure"
    assert result.removed == 10
    assert set(result.kept.items.tolist()) == set(range(10, 50))
    assert result.kept.items.tolist() == list(range(49, 9, -1))  # order and scores kept
    assert np.allclose(result.kept.scores, candidates.scores[:40])
    nothing_shown = ExposureFilter(config.snapshot([]), item_digests(ids))
    assert not nothing_shown.active
    assert nothing_shown.apply(candidates).kept is candidates
