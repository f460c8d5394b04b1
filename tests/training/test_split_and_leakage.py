"""The held-out split, and the proof that no held-out interaction reaches any artifact."""

from __future__ import annotations

from typing import Any

import numpy as np

from recsys.artifacts import load_core
from recsys.evaluation.ease import CatalogueEase
from training.cf import build_itemcf
from training.core_builder import recency_weights
from training.encode import holdout_split


def test_time_split_holds_out_each_eligible_users_latest_fifth() -> None:
    # user 0: 10 interactions, user 1: 4 (not eligible), user 2: 5
    user = np.array([0] * 10 + [1] * 4 + [2] * 5)
    time = np.concatenate([np.arange(10)[::-1] * 10, np.arange(4), [5, 1, 4, 2, 3]])
    split = holdout_split(user, time)
    assert split.method == "time"
    held = {int(row) for row in split.test}
    # user 0: latest 2 of 10 are rows with times 90 and 80 → rows 0 and 1
    assert {0, 1} <= held
    # user 1: none; user 2: one, its latest (time 5 → row 14)
    assert held == {0, 1, 14}
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(user.shape[0]))


def test_random_split_is_seeded_and_holds_at_least_one() -> None:
    user = np.repeat(np.arange(50), 7)
    first = holdout_split(user, None, seed=3)
    again = holdout_split(user, None, seed=3)
    other = holdout_split(user, None, seed=4)
    assert first.method == "random"
    np.testing.assert_array_equal(first.test, again.test)
    assert not np.array_equal(first.test, other.test)
    assert np.all(np.bincount(user[first.test], minlength=50) == 1)  # max(1, int(0.2·7)) = 1


def test_no_held_out_interaction_reaches_the_stored_artifacts(quick_store: Any) -> None:
    path = quick_store.version_path(quick_store.current())
    core = load_core(path, mmap=False)
    held_user = np.load(path / "eval" / "heldout_user.npy")
    held_item = np.load(path / "eval" / "heldout_item.npy")
    history = core.history.items
    train_user = np.repeat(np.arange(history.n_rows), history.lengths())
    train_item = np.asarray(history.values)
    n_items = core.catalogue.n_items
    # 1. No held-out (user, item) pair is in any user's stored history / consumed set.
    train_keys = set((train_user.astype(np.int64) * n_items + train_item).tolist())
    held_keys = (held_user.astype(np.int64) * n_items + held_item).tolist()
    assert not train_keys.intersection(held_keys)
    assert len(held_keys) > 15_000
    # 2. Popularity is exactly the recency-weighted count of the stored training part.
    times = np.asarray(core.history.times.values)
    expected = np.bincount(train_item, weights=recency_weights(times, 60.0), minlength=n_items)
    np.testing.assert_allclose(core.popularity.global_scores, expected, rtol=1e-5)
    # 3. The ItemCF table is rebuilt identically from the training part alone.
    ratings = np.asarray(core.history.ratings.values)
    liked = np.nan_to_num(ratings, nan=-np.inf) >= (core.like_threshold or 0)
    rebuilt = build_itemcf(
        train_user,
        train_item,
        1.0 + liked.astype(np.float32),
        history.n_rows,
        n_items,
        top_k=core.itemcf.k,
        order=times,
    )
    np.testing.assert_array_equal(rebuilt.neighbors, core.itemcf.neighbors)
    # 4. The EASE table is refitted identically from the training part alone, with the λ and k
    # chosen on validation.
    extra = quick_store.manifest(quick_store.current()).extra
    assert core.ease is not None
    refitted = CatalogueEase.fit(history, n_items, float(extra["ease_l2"]))
    rebuilt_ease = refitted.neighbor_table(int(extra["ease_neighbors"]), signed=extra["ease_signed"])
    np.testing.assert_array_equal(rebuilt_ease.neighbors, core.ease.neighbors)
    np.testing.assert_array_equal(rebuilt_ease.scores, core.ease.scores)
    # 5. Item statistics count training interactions only.
    counts = np.bincount(train_item, minlength=n_items)
    log_counts = np.log1p(counts) / np.log1p(counts.max())
    np.testing.assert_allclose(core.statistics.item_stats[:, 0], log_counts, rtol=1e-5, atol=1e-6)


def test_the_rankers_rows_are_recalls_candidates_and_no_held_out_pair_is_a_positive(
    quick_candidate: Any,
) -> None:
    """The ranker trains on what recall served from the fit part: each row is one of that
    user's merged candidates (or a random negative recall did not return), its positives are
    training-part interactions (the validation period), and no held-out pair is one."""
    rows = quick_candidate.ranker_rows
    assert rows is not None
    assert rows.user.shape[0] > 5_000
    assert rows.click.any()
    assert rows.from_recall.mean() > 0.8
    n_items = quick_candidate.core.catalogue.n_items
    for user in np.unique(rows.user):
        mine = rows.user == user
        candidates = rows.candidates[int(user)]
        assert np.isin(rows.item[mine & rows.from_recall], candidates).all()
        assert not np.isin(rows.item[mine & ~rows.from_recall], candidates).any()
        assert not rows.click[mine & ~rows.from_recall].any()  # random negatives are negatives
    history = quick_candidate.core.history.items
    train_keys = np.repeat(np.arange(history.n_rows), history.lengths()).astype(
        np.int64
    ) * n_items + np.asarray(history.values, dtype=np.int64)
    held_keys = quick_candidate.heldout_user.astype(np.int64) * n_items + quick_candidate.heldout_item
    positive_keys = rows.user[rows.click] * n_items + rows.item[rows.click]
    assert np.isin(positive_keys, train_keys).all()
    assert not np.isin(positive_keys, held_keys).any()
    negative_keys = rows.user[~rows.from_recall] * n_items + rows.item[~rows.from_recall]
    assert not np.isin(negative_keys, train_keys).any()  # random negatives were never consumed
