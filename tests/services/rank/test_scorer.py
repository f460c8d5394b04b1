"""The scoring pieces without gRPC: one history's cross features equal the training code's,
and a batch of many users scores each exactly as `ServingModel.score` scores it alone."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.evaluation.evaluator import HeldOut, full_history, merged_candidates, run_channels
from recsys.features import ranker_inputs
from recsys.serving_model import ServingModel
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.query import liked_mask
from recsys.store import ModelStore
from recsys.v1 import common_pb2
from services.common.provenance import provenance_from_message, provenance_message
from services.rank.scorer import OnnxScorer, ScoreJob


@pytest.fixture(scope="module")
def model(quick_store: ModelStore) -> ServingModel:
    version = quick_store.current()
    assert version is not None
    loaded = ServingModel.load(quick_store.version_path(version), version=version)
    loaded.warm()
    return loaded


def user_inputs(model: ServingModel, user: int) -> dict[str, np.ndarray]:
    if user < 0:
        return model.user_features.inputs(-1, np.zeros(0, np.int64), np.zeros(0, bool))
    length = model.spec.history_length
    items = np.asarray(model.core.history.items.row(user))[-length:]
    liked = liked_mask(model.core.like_threshold, np.asarray(model.core.history.ratings.row(user)))[-length:]
    return model.user_features.inputs(user, items, liked)


def test_one_users_cross_features_equal_the_training_code_bit_for_bit(model: ServingModel) -> None:
    rng = np.random.default_rng(0)
    n_items = model.core.catalogue.n_items
    compared = 0.0
    for user in [*range(0, model.core.users.n_users, 37), -1]:
        user_row = user_inputs(model, user)
        items = rng.choice(n_items, size=300, replace=True).astype(np.int64)  # with repeats
        items[:4] = [-1, n_items, 10**9, items[10]]  # unknown indexes and a duplicate
        embedding = rng.normal(size=model.spec.embedding_dim).astype(np.float32)
        batch = ranker_inputs(user_row, model.item_features.inputs(items))
        for vector in (embedding, None):
            expected = model.cross_features.compute(batch["history"], batch["history_weight"], items, vector)
            actual = model.cross_features.compute_one_user(
                user_row["history"], user_row["history_weight"], items, vector
            )
            assert actual.dtype == expected.dtype
            np.testing.assert_array_equal(actual, expected)
            compared += float(np.abs(expected[:, :4]).sum())
    assert compared > 0  # the CF features were not all zero: the test compared something


def test_a_batch_of_many_users_scores_each_as_alone(model: ServingModel) -> None:
    rng = np.random.default_rng(1)
    jobs = []
    for n, user in enumerate([0, 5, -1, 17, 42, 300]):
        items = rng.choice(model.core.catalogue.n_items, size=10 + 13 * n, replace=False).astype(np.int64)
        embedding = rng.normal(size=model.spec.embedding_dim).astype(np.float32) if n % 2 else None
        jobs.append(ScoreJob(model, user_inputs(model, user), items, embedding))
    scored = OnnxScorer().score(model, jobs)
    assert len(scored.scores) == len(jobs)
    assert scored.inference_seconds > 0
    for job, scores in zip(jobs, scored.scores, strict=True):
        expected = model.score(job.user, job.items, job.embedding)
        for head in model.spec.heads:
            assert scores[head].shape == (job.rows,)
            np.testing.assert_allclose(scores[head], expected[head], rtol=0, atol=1e-6)


def test_prerank_keeps_the_best_by_dot_product_and_puts_unknown_items_last(model: ServingModel) -> None:
    embeddings = np.asarray(model.item_embeddings, dtype=np.float32)
    user = np.random.default_rng(2).normal(size=model.spec.embedding_dim).astype(np.float32)
    n_items = model.core.catalogue.n_items
    items = np.array([3, -1, 10, 7, n_items, 1, 2, 40, 41, 42], dtype=np.int64)
    known = np.array([3, 10, 7, 1, 2, 40, 41, 42])
    dots = {int(item): float(embeddings[item] @ user) for item in known}
    kept = EmbeddingPreRanker(model.item_embeddings).select(items, user, 5)
    chosen = items[kept.positions].tolist()
    assert set(chosen) == set(sorted(dots, key=lambda item: -dots[item])[:5])
    assert np.all(np.diff(kept.scores) <= 0)  # best first
    np.testing.assert_allclose(kept.scores, [dots[item] for item in chosen], rtol=1e-5, atol=1e-5)
    everything = EmbeddingPreRanker(model.item_embeddings).select(items, user, 20)
    assert everything.positions.shape[0] == items.shape[0]
    assert set(items[everything.positions[-2:]].tolist()) == {-1, n_items}


def test_provenance_crosses_the_wire_bit_for_bit_and_scores_as_the_training_assembly(
    model: ServingModel,
) -> None:
    """Recall's merge output → RecallResponse bytes → the gateway (which drops a blocked
    candidate) → RankRequest bytes → rank's decoding → the scorer: the provenance features
    equal `ranker_batch`'s (what the build trains on) bit for bit, and the batch scores
    each call as `ServingModel.score` does with the same provenance."""
    assert model.spec.provenance_channels, "the quick store's ranker reads provenance"
    users = np.arange(0, model.core.users.n_users, 97, dtype=np.int32)[:6]
    run = run_channels(model, HeldOut(users, [np.zeros(0, np.int32) for _ in users]))
    defaults = model.defaults
    merged = merged_candidates(run, defaults.channel_weights, defaults.channel_quotas, 200)
    jobs, expected_features = [], []
    for query, candidates in zip(run.queries, merged, strict=True):
        assert len(candidates) > 20
        sent = common_pb2.Provenance.FromString(
            provenance_message(candidates.provenance(), with_merge_scores=False).SerializeToString()
        )
        at_gateway = provenance_from_message(sent, len(candidates), candidates.scores)
        kept = np.delete(np.arange(len(candidates)), 3)  # the gateway's blocklist drops one
        forwarded = common_pb2.Provenance.FromString(
            provenance_message(at_gateway.take(kept), with_merge_scores=True).SerializeToString()
        )
        at_rank = provenance_from_message(forwarded, kept.shape[0])
        items = candidates.items[kept].astype(np.int64)
        user = model.user_inputs(query, *full_history(model, query))
        training = model.ranker_batch(user, items, query.embedding, candidates.take(kept).provenance())
        served = model.provenance_inputs(at_rank, items.shape[0])
        assert served.dtype == training["provenance"].dtype
        np.testing.assert_array_equal(served, training["provenance"])
        assert (served[:, :-3] > 0).any(axis=1).all()  # every candidate came from some channel
        jobs.append(ScoreJob(model, user, items, query.embedding, provenance=at_rank))
        expected_features.append(training)
    scored = OnnxScorer().score(model, jobs)
    moved = 0.0
    for job, scores in zip(jobs, scored.scores, strict=True):
        expected = model.score(job.user, job.items, job.embedding, job.provenance)
        without = model.score(job.user, job.items, job.embedding)
        for head in model.spec.heads:
            np.testing.assert_allclose(scores[head], expected[head], rtol=0, atol=1e-6)
        moved += float(np.abs(expected["click"] - without["click"]).max())
    assert moved > 0  # the ranker reads the provenance: without it the scores differ
