"""Rerank selectors on hand-made examples, against a brute-force DPP greedy, and under
business rules on random inputs."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from recsys.evaluation.diversity import category_coverage, distinct_categories, intra_list_diversity
from recsys.stages.rerank import (
    DppSelector,
    MmrSelector,
    NewCandidates,
    NewItemTraffic,
    RerankRules,
    Selector,
    TopKSelector,
    selector_for,
)

# A, B (a near-duplicate of A: cosine 0.99, 0.141 towards C), C, D: rewards decreasing.
NEAR = math.sqrt(1 - 0.99**2)
EMBEDDINGS = np.array([[1, 0, 0], [0.99, NEAR, 0], [0, 1, 0], [0, 0, 1]], np.float32)
REWARDS = np.array([1.0, 0.9, 0.8, 0.0], np.float32)
ITEMS = np.array([40, 41, 42, 43], np.int32)
NO_CATEGORIES = np.zeros((4, 1), np.int32)
NO_AUTHORS = np.zeros(4, np.int32)


def select(
    selector: Selector,
    rewards: npt.NDArray[np.float32] = REWARDS,
    embeddings: npt.NDArray[np.float32] | None = EMBEDDINGS,
    categories: npt.NDArray[np.int32] | None = None,
    authors: npt.NDArray[np.int32] | None = None,
    count: int | None = None,
) -> list[int]:
    n = rewards.shape[0]
    chosen = selector.select(
        np.arange(n, dtype=np.int32),
        rewards,
        embeddings,
        np.zeros((n, 1), np.int32) if categories is None else categories,
        np.zeros(n, np.int32) if authors is None else authors,
        n if count is None else count,
    )
    return [int(position) for position in chosen]


# -- MMR -----------------------------------------------------------------------------------
def test_mmr_with_theta_one_is_reward_order() -> None:
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=30).astype(np.float32)
    embeddings = rng.normal(size=(30, 8)).astype(np.float32)
    expected = np.argsort(-rewards, kind="stable")[:12].tolist()
    assert select(MmrSelector(1.0, 5), rewards, embeddings, count=12) == expected
    assert select(TopKSelector(), rewards, None, count=12) == expected


def test_mmr_prefers_a_dissimilar_item_over_a_near_duplicate() -> None:
    # θ = 0.5. After A, B scores 0.5·0.9 − 0.5·0.99 < 0 while C scores 0.5·0.8 − 0 = 0.4.
    # Third, with A and C in the window: B −0.045 < D 0 → D, then B.
    assert select(MmrSelector(0.5, window=5)) == [0, 2, 3, 1]
    # With a window of 1 only C is remembered: B scores 0.45 − 0.5·0.141 = 0.38 > D's 0.
    assert select(MmrSelector(0.5, window=1)) == [0, 2, 1, 3]


def test_mmr_returns_positions_not_items() -> None:
    positions = MmrSelector(0.5, 5).select(ITEMS, REWARDS, EMBEDDINGS, NO_CATEGORIES, NO_AUTHORS, 2)
    assert positions.dtype == np.int32
    assert positions.tolist() == [0, 2]
    assert ITEMS[positions].tolist() == [40, 42]


def test_rewards_are_rescaled_so_their_scale_does_not_matter() -> None:
    # Any affine map with a positive slope leaves the choices unchanged.
    for selector in (MmrSelector(0.5, 5), DppSelector(0.5, 5)):
        assert select(selector, REWARDS * 37.0 - 12.0) == select(selector)


# -- DPP -----------------------------------------------------------------------------------
def test_dpp_picks_diverse_items_by_hand() -> None:
    # θ = 0.5: score = 0.5·reward + 0.5·log residual². After A: B's residual² is
    # 1 − 0.99² = 0.0199 (log −3.9) → −1.5; C's is 1 → 0.4. After A, C: B lies in their
    # span (residual 0) and D is orthogonal → D, then B.
    assert select(DppSelector(0.5, window=5)) == [0, 2, 3, 1]
    # Window 1: once C is chosen A has left the window; B's residual² against C is 0.98.
    assert select(DppSelector(0.5, window=1)) == [0, 2, 1, 3]
    assert select(DppSelector(1.0, window=5)) == [0, 1, 2, 3]


def brute_force_dpp(
    rewards: npt.NDArray[np.float64],
    embeddings: npt.NDArray[np.float64],
    theta: float,
    window: int,
    count: int,
) -> list[int]:
    """The paper's windowed greedy on L = diag(q)·S·diag(q), q = exp(θ/(2(1−θ))·reward):
    each step adds the item maximising log det L over the last `window` chosen plus it."""
    reward = (rewards - rewards.min()) / (rewards.max() - rewards.min())
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    quality = np.exp(theta / (2 * (1 - theta)) * reward)
    kernel = quality[:, None] * (unit @ unit.T) * quality[None, :]
    chosen: list[int] = []
    for _ in range(count):
        recent = chosen[-window:]
        best, best_value = -1, -np.inf
        for candidate in range(reward.shape[0]):
            if candidate in chosen:
                continue
            subset = [*recent, candidate]
            sign, value = np.linalg.slogdet(kernel[np.ix_(subset, subset)])
            assert sign > 0
            if value > best_value + 1e-12:
                best, best_value = candidate, value
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(40))
def test_dpp_incremental_cholesky_chooses_what_the_brute_force_greedy_chooses(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 25))
    dim = int(rng.integers(4, 10))
    window = int(rng.integers(1, dim))  # below the dimension: every determinant stays positive
    theta = float(rng.uniform(0.1, 0.9))
    count = int(rng.integers(1, n + 1))
    embeddings = rng.normal(size=(n, dim)).astype(np.float32)
    rewards = rng.normal(size=n).astype(np.float32)
    fast = select(DppSelector(theta, window), rewards, embeddings, count=count)
    slow = brute_force_dpp(rewards.astype(np.float64), embeddings.astype(np.float64), theta, window, count)
    assert fast == slow


def test_dpp_window_slides_many_times_without_drifting() -> None:
    rng = np.random.default_rng(7)
    embeddings = rng.normal(size=(80, 12)).astype(np.float32)
    rewards = rng.normal(size=80).astype(np.float32)
    fast = select(DppSelector(0.6, 6), rewards, embeddings, count=60)
    assert fast == brute_force_dpp(rewards.astype(np.float64), embeddings.astype(np.float64), 0.6, 6, 60)


def test_dpp_survives_duplicates_and_more_picks_than_dimensions() -> None:
    # 3-D embeddings, 10 picks, a window of 8, exact duplicates and a zero row: the
    # residuals hit 0 and the list must still be complete, ordered by reward among the
    # spanned items.
    embeddings = np.array([[1, 0, 0]] * 4 + [[0, 1, 0]] * 3 + [[0, 0, 1]] * 2 + [[0, 0, 0]], np.float32)
    rewards = np.linspace(1, 0, 10).astype(np.float32)
    chosen = select(DppSelector(0.5, 8), rewards, embeddings)
    assert sorted(chosen) == list(range(10))
    assert chosen[:3] == [0, 4, 7]  # one of each direction first
    assert chosen[3:] == [1, 2, 3, 5, 6, 8, 9]


def test_selectors_are_deterministic_and_accept_theta_zero() -> None:
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(20, 6)).astype(np.float32)
    rewards = rng.normal(size=20).astype(np.float32)
    for selector in (MmrSelector(0.0, 3), DppSelector(0.0, 3)):
        first = select(selector, rewards, embeddings, count=10)
        assert first == select(selector, rewards, embeddings, count=10)
        assert len(set(first)) == 10


# -- count and inputs ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "selector",
    [TopKSelector(RerankRules(max_consecutive_author=1)), MmrSelector(0.7, 3), DppSelector(0.7, 3)],
    ids=["topk", "mmr", "dpp"],
)
@pytest.mark.parametrize("count", [0, 1, 3, 4, 10])
def test_returns_exactly_min_count_n_unique_positions(selector: Selector, count: int) -> None:
    chosen = select(selector, count=count, authors=np.array([1, 1, 1, 2], np.int32))
    assert len(chosen) == min(count, 4)
    assert len(set(chosen)) == len(chosen)


def test_empty_candidates() -> None:
    empty = np.zeros(0, np.int32)
    for selector in (TopKSelector(), MmrSelector(0.5, 3), DppSelector(0.5, 3)):
        chosen = selector.select(
            empty, np.zeros(0, np.float32), np.zeros((0, 4), np.float32), np.zeros((0, 2), np.int32), empty, 5
        )
        assert chosen.tolist() == []


def test_equal_rewards_keep_candidate_order() -> None:
    rewards = np.ones(4, np.float32)
    assert select(TopKSelector(), rewards, None) == [0, 1, 2, 3]
    assert select(MmrSelector(1.0, 3), rewards) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rewards": np.ones(3, np.float32)}, "rewards"),
        ({"rewards": np.array([1, np.nan, 0, 0], np.float32)}, "rewards"),
        ({"embeddings": np.ones((3, 3), np.float32)}, "embeddings"),
        ({"embeddings": None}, "embeddings"),
        ({"categories": np.zeros((3, 1), np.int32)}, "categories"),
        ({"authors": np.zeros(5, np.int32)}, "authors"),
        ({"count": -1}, "count"),
    ],
)
def test_bad_inputs_name_the_argument(change: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {
        "items": ITEMS,
        "rewards": REWARDS,
        "embeddings": EMBEDDINGS,
        "categories": NO_CATEGORIES,
        "authors": NO_AUTHORS,
        "count": 2,
    } | change
    with pytest.raises(ValueError, match=f"^{field}:"):
        MmrSelector(0.5, 3).select(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: MmrSelector(1.5, 3), "theta"),
        (lambda: DppSelector(-0.1, 3), "theta"),
        (lambda: DppSelector(0.5, 0), "window"),
        (lambda: RerankRules(max_consecutive_category=0), "max_consecutive_category"),
        (lambda: RerankRules(max_consecutive_author=True), "max_consecutive_author"),
        (lambda: RerankRules(first_screen=-1), "first_screen"),
        (lambda: RerankRules(first_screen_max_per_author=0), "first_screen_max_per_author"),
        (lambda: selector_for("random", 0.5, 3, None), "method"),  # type: ignore[arg-type]
    ],
)
def test_bad_configuration_names_the_field(build: object, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        build()  # type: ignore[operator]


def test_selector_for_builds_each_method() -> None:
    rules = RerankRules(max_consecutive_author=1)
    assert isinstance(selector_for("mmr", 0.5, 3, rules), MmrSelector)
    assert isinstance(selector_for("dpp", 0.5, 3, rules), DppSelector)
    topk = selector_for("none", 0.5, 3, rules)
    assert isinstance(topk, TopKSelector)
    assert topk.identifier == "top_k"
    assert topk.rules == rules


# -- business rules ------------------------------------------------------------------------
def test_consecutive_category_rule_skips_then_relaxes_when_nothing_else_is_left() -> None:
    # Rewards in order 0…4; items 0, 1, 2, 3 are category 7, item 4 category 8. At most one
    # category-7 item in a row: 0, then 4 (1 is skipped), then 1; after that only 7s are
    # left, so the rule gives way rather than shortening the list.
    rewards = np.array([1.0, 0.9, 0.8, 0.7, 0.1], np.float32)
    categories = np.array([[7], [7], [7], [7], [8]], np.int32)
    rules = RerankRules(max_consecutive_category=1)
    for selector in (TopKSelector(rules), MmrSelector(1.0, 3, rules)):
        assert select(selector, rewards, np.eye(5, dtype=np.float32), categories) == [0, 4, 1, 2, 3]


def test_multi_category_items_extend_every_run() -> None:
    # Item 0 is both 1 and 2, so right after it neither item 1 (cat 2) nor item 2 (cat 1)
    # may come at one in a row: item 3 (cat 3) does, then 1 and 2.
    rewards = np.array([1.0, 0.9, 0.8, 0.1], np.float32)
    categories = np.array([[1, 2], [2, 0], [1, 0], [3, 0]], np.int32)
    rules = RerankRules(max_consecutive_category=1)
    assert select(TopKSelector(rules), rewards, None, categories) == [0, 3, 1, 2]


def test_unknown_author_and_no_category_never_form_runs() -> None:
    rules = RerankRules(max_consecutive_category=1, max_consecutive_author=1, first_screen_max_per_author=1)
    rewards = np.array([1.0, 0.9, 0.8, 0.1], np.float32)
    authors = np.array([0, 0, 0, 5], np.int32)
    assert select(TopKSelector(rules), rewards, None, np.zeros((4, 2), np.int32), authors) == [0, 1, 2, 3]


def test_first_screen_caps_apply_only_within_the_first_screen() -> None:
    # Author 1 has the five best items; at most 2 of them in the first 3 positions.
    rewards = np.linspace(1, 0, 6).astype(np.float32)
    authors = np.array([1, 1, 1, 1, 1, 2], np.int32)
    rules = RerankRules(first_screen=3, first_screen_max_per_author=2)
    assert select(TopKSelector(rules), rewards, None, authors=authors) == [0, 1, 5, 2, 3, 4]
    category_rules = RerankRules(first_screen=3, first_screen_max_per_category=1)
    categories = np.array([[1], [1], [2], [2], [3], [3]], np.int32)
    assert select(TopKSelector(category_rules), rewards, None, categories) == [0, 2, 4, 1, 3, 5]


def random_catalogue(
    seed: int, n: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=n).astype(np.float32)
    embeddings = rng.normal(size=(n, 16)).astype(np.float32)
    categories = rng.integers(1, 9, size=(n, 3)).astype(np.int32)
    categories[rng.random((n, 3)) < 0.4] = 0  # 0 to 3 categories per item
    authors = rng.integers(0, 12, size=n).astype(np.int32)
    return rewards, embeddings, categories, authors


RULES = RerankRules(
    max_consecutive_category=2,
    max_consecutive_author=1,
    first_screen=10,
    first_screen_max_per_category=4,
    first_screen_max_per_author=2,
)


@pytest.mark.parametrize(
    "selector",
    [
        TopKSelector(RULES),
        MmrSelector(0.6, 5, RULES),
        DppSelector(0.6, 5, RULES),
        DppSelector(0.95, 8, RULES),
    ],
    ids=["topk", "mmr", "dpp", "dpp-high-theta"],
)
def test_answers_respect_the_business_rules_on_random_inputs(selector: Selector) -> None:
    for seed in range(30):
        rewards, embeddings, categories, authors = random_catalogue(seed, 60)
        chosen = np.array(select(selector, rewards, embeddings, categories, authors, count=30))
        assert len(chosen) == 30
        assert len(set(chosen.tolist())) == 30
        assert RULES.violations(categories[chosen], authors[chosen]) == [], seed


def test_violations_describe_each_broken_rule() -> None:
    categories = np.array([[1], [1], [1], [2]], np.int32)
    authors = np.array([3, 3, 4, 3], np.int32)
    rules = RerankRules(
        max_consecutive_category=2, max_consecutive_author=1, first_screen=4, first_screen_max_per_author=2
    )
    assert rules.violations(categories, authors) == [
        "position 1: author 3 more than 1 times in a row",
        "position 2: category 1 more than 2 times in a row",
        "position 3: author 3 more than 2 times in the first 4",
    ]
    assert RerankRules().violations(categories, authors) == []


def test_rules_lower_reward_only_as_much_as_needed() -> None:
    # Under the rules top-k still picks the best compliant item at every position.
    rewards, _, categories, authors = random_catalogue(11, 40)
    chosen = select(TopKSelector(RULES), rewards, None, categories, authors, count=20)
    unconstrained = select(TopKSelector(), rewards, None, count=20)
    assert chosen[0] == unconstrained[0]
    assert sum(rewards[chosen]) <= sum(rewards[unconstrained])


# -- diversity report ----------------------------------------------------------------------
def test_intra_list_diversity_and_category_coverage() -> None:
    assert intra_list_diversity(np.eye(3, dtype=np.float32)) == pytest.approx(1.0)
    assert intra_list_diversity(np.ones((4, 2), np.float32)) == pytest.approx(0.0)
    assert intra_list_diversity(np.array([[1, 0], [-1, 0]], np.float32)) == pytest.approx(2.0)
    assert intra_list_diversity(np.ones((1, 2), np.float32)) == 0.0
    categories = np.array([[1, 2], [2, 0], [5, 0]], np.int32)
    assert distinct_categories(categories) == 3
    assert category_coverage(categories, 6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"^n_categories:"):
        category_coverage(categories, 0)


def test_mmr_and_dpp_lists_are_more_diverse_than_top_k() -> None:
    # Clustered candidates whose best rewards sit in one cluster: top-k stays in it.
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(5, 16))
    cluster = np.repeat(np.arange(5), 20)
    embeddings = (centres[cluster] + 0.1 * rng.normal(size=(100, 16))).astype(np.float32)
    rewards = (np.where(cluster == 0, 1.0, 0.0) + 0.3 * rng.random(100)).astype(np.float32)
    top = select(TopKSelector(), rewards, embeddings, count=10)
    baseline = intra_list_diversity(embeddings[top])
    for selector in (MmrSelector(0.5, 5), DppSelector(0.5, 5)):
        chosen = select(selector, rewards, embeddings, count=10)
        assert intra_list_diversity(embeddings[chosen]) > baseline + 0.3


# -- new-item traffic ------------------------------------------------------------------------
# Ten candidates, rewards 1.0, 0.9, … 0.1: rescaled, position k has reward 1 − k/9.
TEN = np.linspace(1.0, 0.1, 10).astype(np.float32)


def new_candidates(
    fresh: list[int],
    impressions: dict[int, int] | None = None,
    n: int = 10,
    *,
    slots: int,
    boost: float = 0.0,
    boost_half_life_impressions: float = 100.0,
) -> NewCandidates:
    mask = np.zeros(n, dtype=bool)
    mask[fresh] = True
    shown = np.zeros(n, np.int64)
    for position, count in (impressions or {}).items():
        shown[position] = count
    traffic = NewItemTraffic(slots, boost=boost, boost_half_life_impressions=boost_half_life_impressions)
    return NewCandidates(traffic, mask, shown)


def select_new(
    selector: Selector, new: NewCandidates, count: int, rewards: npt.NDArray[np.float32] = TEN
) -> list[int]:
    n = rewards.shape[0]
    chosen = selector.select(
        np.arange(n, dtype=np.int32),
        rewards,
        np.eye(n, dtype=np.float32),
        np.zeros((n, 1), np.int32),
        np.zeros(n, np.int32),
        count,
        new,
    )
    return [int(position) for position in chosen]


def test_new_items_beyond_the_slots_are_passed_over() -> None:
    # The four best are new; two slots: the next two new ones give way to 4, 5, …
    new = new_candidates([0, 1, 2, 3], slots=2)
    assert select_new(TopKSelector(), new, 6) == [0, 1, 4, 5, 6, 7]


def test_slots_not_filled_by_score_are_filled_by_the_best_remaining_new_items_last() -> None:
    new = new_candidates([6, 8, 9], slots=2)
    # No new item makes the top five by score: the last two positions go to the best new ones.
    assert select_new(TopKSelector(), new, 5) == [0, 1, 2, 6, 8]
    # Fewer new candidates than slots: all of them, the rest by score.
    assert select_new(TopKSelector(), new_candidates([9], slots=2), 4) == [0, 1, 2, 9]


def test_the_boost_lifts_a_new_item_and_halves_every_half_life_of_impressions() -> None:
    # The new item is the worst (rescaled reward 0); boost 0.5 puts it between 4 (5/9) and 5 (4/9).
    assert select_new(TopKSelector(), new_candidates([9], slots=1, boost=0.5), 10) == [
        0,
        1,
        2,
        3,
        4,
        9,
        5,
        6,
        7,
        8,
    ]
    # 100 impressions: 0.25, between 6 (3/9) and 7 (2/9); 300: 0.0625, below 8 (1/9).
    shown_100 = new_candidates([9], {9: 100}, slots=1, boost=0.5)
    assert select_new(TopKSelector(), shown_100, 10) == [0, 1, 2, 3, 4, 5, 6, 9, 7, 8]
    shown_300 = new_candidates([9], {9: 300}, slots=1, boost=0.5)
    assert select_new(TopKSelector(), shown_300, 10) == list(range(10))
    # Boosted to nothing, it still holds its reserved slot in a shorter list.
    assert select_new(TopKSelector(), shown_300, 5) == [0, 1, 2, 3, 9]
    np.testing.assert_allclose(
        NewItemTraffic(1, boost=0.5, boost_half_life_impressions=100).boosts(np.array([0, 100, 300, 50])),
        [0.5, 0.25, 0.0625, 0.5 / math.sqrt(2)],
    )


def test_the_boost_ranks_new_items_among_themselves_by_impressions() -> None:
    # Equal rewards: the less shown new item is boosted more and comes first.
    rewards = np.ones(4, np.float32)
    new = new_candidates([1, 2], {1: 200, 2: 0}, n=4, slots=2, boost=1.0, boost_half_life_impressions=100)
    assert select_new(TopKSelector(), new, 4, rewards) == [2, 1, 0, 3]


def test_the_cap_is_hard_when_only_new_items_are_left() -> None:
    assert select_new(TopKSelector(), new_candidates(list(range(10)), slots=2), 5) == [0, 1]
    assert select_new(TopKSelector(), new_candidates([0, 1, 2, 3, 4, 5, 6, 7], slots=2), 6) == [0, 1, 8, 9]


def test_no_traffic_or_no_new_candidate_changes_nothing() -> None:
    plain = select_new(TopKSelector(), new_candidates([], slots=2, boost=1.0), 6)
    assert plain == [0, 1, 2, 3, 4, 5]
    # slots 0 is off: neither the boost nor a cap applies.
    assert select_new(TopKSelector(), new_candidates([8, 9], slots=0, boost=5.0), 6) == plain


@pytest.mark.parametrize(
    "selector",
    [
        TopKSelector(RerankRules(max_consecutive_category=1)),
        MmrSelector(0.6, 4, RerankRules(max_consecutive_category=2, max_consecutive_author=1)),
        DppSelector(0.6, 4, RerankRules(first_screen=5, first_screen_max_per_category=2)),
    ],
    ids=["top_k", "mmr", "dpp"],
)
def test_new_item_slots_hold_with_every_selector_and_rule_on_random_inputs(selector: Selector) -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        n, count, slots = int(rng.integers(5, 40)), int(rng.integers(1, 25)), int(rng.integers(1, 4))
        fresh = rng.random(n) < rng.random()
        new = NewCandidates(NewItemTraffic(slots, boost=float(rng.random())), fresh, rng.integers(0, 500, n))
        chosen = selector.select(
            np.arange(n, dtype=np.int32),
            rng.normal(size=n).astype(np.float32),
            rng.normal(size=(n, 6)).astype(np.float32),
            rng.integers(1, 4, size=(n, 2)).astype(np.int32),
            rng.integers(0, 4, size=n).astype(np.int32),
            count,
            new,
        )
        n_fresh = int(fresh.sum())
        length = min(count, n, n - n_fresh + slots)
        assert len(chosen) == len(set(chosen.tolist())) == length
        assert int(fresh[chosen].sum()) == min(slots, n_fresh, length)


@pytest.mark.parametrize(
    ("traffic", "field"),
    [
        ({"slots": -1}, "slots"),
        ({"slots": 1.5}, "slots"),
        ({"slots": 1, "max_age_seconds": 0}, "max_age_seconds"),
        ({"slots": 1, "boost": -0.1}, "boost"),
        ({"slots": 1, "boost": math.inf}, "boost"),
        ({"slots": 1, "boost_half_life_impressions": 0}, "boost_half_life_impressions"),
    ],
)
def test_bad_new_item_traffic_names_the_field(traffic: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        NewItemTraffic(**traffic)  # type: ignore[arg-type]


def test_new_candidates_must_align_with_the_candidates() -> None:
    new = NewCandidates(NewItemTraffic(1), np.zeros(3, dtype=bool), np.zeros(10, np.int64))
    with pytest.raises(ValueError, match=r"^fresh: "):
        select_new(TopKSelector(), new, 5)
