"""The rank service on the real quick MovieLens-100K store, over real gRPC (port 0), checked
against onnxruntime run directly on features assembled independently of the service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from recsys.features import ranker_inputs, tower_inputs
from recsys.serving_model import RANKER, USER_TOWER, ServingModel
from recsys.stages.query import liked_mask
from recsys.store import ModelStore
from recsys.v1 import common_pb2, rank_pb2, rank_pb2_grpc
from services.common.server import GrpcHost
from services.rank.app import RankApp
from services.rank.settings import RankSettings

TOLERANCE = 1e-6


class Running:
    def __init__(self, app: RankApp, host: GrpcHost, channel: aio.Channel) -> None:
        self.app, self.host, self.channel = app, host, channel
        self.stub = rank_pb2_grpc.RankStub(channel)

    @property
    def model(self) -> ServingModel:
        return self.app.versions.get().model

    async def stop(self) -> None:
        await self.channel.close()
        await self.host.stop(grace=0)


async def start(store: str | Path, *, wait: bool = True, **settings: Any) -> Running:
    # A fixed limit above these tests' 50 callers: they test batching and swaps, and on a busy
    # machine the adaptive limit would queue or shed them (admission has its own tests).
    settings = {"poll_seconds": 0.2, "min_in_flight": 64, "initial_in_flight": 64, **settings}
    app = RankApp(RankSettings(store=str(store), port=0, metrics_port=None, **settings))
    host = GrpcHost(app, app.settings)
    await host.start()
    if wait:
        async with asyncio.timeout(30):
            while not host.readiness.serving:
                await asyncio.sleep(0.05)
    return Running(app, host, aio.insecure_channel(f"127.0.0.1:{host.port}"))


@pytest.fixture
async def rank(quick_store: ModelStore) -> AsyncIterator[Running]:
    running = await start(quick_store.path)
    yield running
    await running.stop()


class DirectScorer:
    """onnxruntime sessions of its own on the version's files, fed features assembled here
    from the version's arrays (the user's stored history, as the in-process store has it)."""

    def __init__(self, model: ServingModel, version_dir: Path) -> None:
        self.model = model
        self.ranker = ort.InferenceSession(str(version_dir / RANKER), providers=["CPUExecutionProvider"])
        self.tower = ort.InferenceSession(str(version_dir / USER_TOWER), providers=["CPUExecutionProvider"])

    def user(self, user_id: str, live: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`live`: the items of an unknown user's live clicks (each one a like)."""
        model = self.model
        index = model.user_lookup.get(user_id, -1)
        length = model.spec.history_length
        if live is not None:
            items, liked = live.astype(np.int64)[-length:], np.ones(live.shape[0], bool)[-length:]
        elif index >= 0:
            items = np.asarray(model.core.history.items.row(index))[-length:]
            liked = liked_mask(model.core.like_threshold, np.asarray(model.core.history.ratings.row(index)))[
                -length:
            ]
        else:
            items, liked = np.zeros(0, np.int64), np.zeros(0, bool)
        return model.user_features.inputs(index, items, liked)

    def embedding(self, user_id: str, live: np.ndarray | None = None) -> np.ndarray:
        inputs = tower_inputs(self.user(user_id, live))
        (vector,) = self.tower.run(["user_embedding"], inputs)
        return np.asarray(vector[0], dtype=np.float32)

    def scores(
        self,
        user_id: str,
        items: np.ndarray,
        embedding: np.ndarray | None = None,
        live: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        model = self.model
        user = self.user(user_id, live)
        vector = self.embedding(user_id, live) if embedding is None else embedding
        batch = ranker_inputs(user, model.item_features.inputs(items))
        batch.update(model.cross_features.inputs(batch["history"], batch["history_weight"], items, vector))
        # These calls send no provenance: every candidate reads as found by no channel.
        batch["provenance"] = np.zeros((items.shape[0], model.spec.provenance_width), np.float32)
        names = [output.name for output in self.ranker.get_outputs()]
        feed = {spec.name: batch[spec.name] for spec in self.ranker.get_inputs()}
        outputs = dict(zip(names, self.ranker.run(names, feed), strict=True))
        return {head: np.asarray(outputs[head]).reshape(-1) for head in model.spec.heads}


def direct(running: Running) -> DirectScorer:
    loaded = running.app.versions.get()
    return DirectScorer(loaded.model, running.app.store.version_path(loaded.version))


def task_scores(response: rank_pb2.RankResponse) -> dict[str, np.ndarray]:
    return {task.task: np.asarray(task.scores, dtype=np.float32) for task in response.task_scores}


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def candidates(model: ServingModel, seed: int, n: int = 200) -> np.ndarray:
    return (
        np.random.default_rng(seed)
        .choice(model.core.catalogue.n_items, size=n, replace=False)
        .astype(np.int64)
    )


# -- scores ---------------------------------------------------------------------------------
async def test_scores_equal_direct_onnxruntime_scoring_of_the_same_features(rank: Running) -> None:
    model, reference = rank.model, direct(rank)
    items = candidates(model, 0)
    for user_id in ("196", "1", "943"):
        # Without recall's embedding (the user tower runs in the service) and with one.
        response = await rank.stub.Rank(
            rank_pb2.RankRequest(user_id=user_id, item_indexes=items.tolist()), timeout=5
        )
        assert list(response.item_indexes) == items.tolist()
        assert response.model_version == rank.app.versions.get().version
        assert not response.unknown_user
        assert response.unknown_items == 0
        expected = reference.scores(user_id, items)
        actual = task_scores(response)
        assert set(actual) == set(model.spec.heads) == {"click", "like"}
        for head in model.spec.heads:
            np.testing.assert_allclose(actual[head], expected[head], rtol=0, atol=TOLERANCE)
        # The default scene's fusion is the version's default: p_click + 1·p_like.
        np.testing.assert_allclose(
            np.asarray(response.scores), expected["click"] + expected["like"], rtol=0, atol=2 * TOLERANCE
        )

        embedding = (
            np.random.default_rng(int(user_id)).normal(size=model.spec.embedding_dim).astype(np.float32)
        )
        response = await rank.stub.Rank(
            rank_pb2.RankRequest(
                user_id=user_id, item_indexes=items.tolist(), user_embedding=embedding.tolist()
            ),
            timeout=5,
        )
        expected = reference.scores(user_id, items, embedding)
        for head in model.spec.heads:
            np.testing.assert_allclose(task_scores(response)[head], expected[head], rtol=0, atol=TOLERANCE)
    # Scores differ between users: the user's features reach the model.
    first = await rank.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=items.tolist()), timeout=5)
    second = await rank.stub.Rank(rank_pb2.RankRequest(user_id="1", item_indexes=items.tolist()), timeout=5)
    assert np.abs(np.asarray(first.scores) - np.asarray(second.scores)).max() > 1e-3


async def test_unknown_users_and_items_are_scored_with_defaults_and_counted(rank: Running) -> None:
    model, reference = rank.model, direct(rank)
    version = {"version": rank.app.versions.get().version}
    users_before = sample("recsys_rank_unknown_users_total", version)
    items_before = sample("recsys_rank_unknown_items_total", version)
    items = np.array([5, -1, model.core.catalogue.n_items, 7, 10**9], dtype=np.int64)
    response = await rank.stub.Rank(
        rank_pb2.RankRequest(user_id="never-seen", item_indexes=items.tolist()), timeout=5
    )
    assert response.unknown_user
    assert response.unknown_items == 3
    assert sample("recsys_rank_unknown_users_total", version) == users_before + 1
    assert sample("recsys_rank_unknown_items_total", version) == items_before + 3
    expected = reference.scores("never-seen", items)
    for head in model.spec.heads:
        np.testing.assert_allclose(task_scores(response)[head], expected[head], rtol=0, atol=TOLERANCE)
    # Every unknown index gets the same default features, hence the same scores.
    click = task_scores(response)["click"]
    assert click[1] == click[2] == click[4]


async def test_an_unknown_user_with_live_clicks_is_scored_from_them(rank: Running) -> None:
    """Without a history from recall, rank reads the user's state itself: an id the version has
    never seen who clicked three items is scored with user token 0, zero statistics and those
    clicks as the history (the user tower's input and the cross features), not as a blank."""
    import time

    from recsys.feature_store import LiveEvent

    model, reference = rank.model, direct(rank)
    user_id = f"live-only-{time.time_ns()}"
    clicked = np.array([11, 12, 13], np.int64)
    now = time.time()
    await rank.app.features.append_events(
        user_id,
        [
            LiveEvent(str(model.core.catalogue.item_ids[item]), "click", 1.0, now - 10 + n, f"{user_id}-{n}")
            for n, item in enumerate(clicked.tolist())
        ],
    )
    items = candidates(model, 4)
    response = await rank.stub.Rank(
        rank_pb2.RankRequest(user_id=user_id, item_indexes=items.tolist()), timeout=5
    )
    assert response.unknown_user
    assert list(response.degraded_reasons) == []
    expected = reference.scores(user_id, items, live=clicked)
    for head in model.spec.heads:
        np.testing.assert_allclose(task_scores(response)[head], expected[head], rtol=0, atol=TOLERANCE)
    blank = reference.scores(user_id, items)
    assert np.abs(task_scores(response)["click"] - blank["click"]).max() > 1e-4


async def test_an_empty_candidate_list_gets_an_empty_answer(rank: Running) -> None:
    response = await rank.stub.Rank(rank_pb2.RankRequest(user_id="196"), timeout=5)
    assert list(response.item_indexes) == []
    assert list(response.scores) == []
    assert {task.task for task in response.task_scores} == {"click", "like"}
    assert all(len(task.scores) == 0 for task in response.task_scores)


# -- fusion ---------------------------------------------------------------------------------
async def test_weighted_sum_and_weighted_product_fusion(rank: Running) -> None:
    items = candidates(rank.model, 1, 50).tolist()
    weighted_sum = rank_pb2.Fusion(method=rank_pb2.FUSION_METHOD_WEIGHTED_SUM, weights={"like": 0.7})
    response = await rank.stub.Rank(
        rank_pb2.RankRequest(user_id="196", item_indexes=items, fusion=weighted_sum), timeout=5
    )
    tasks = task_scores(response)
    click, like = tasks["click"].astype(np.float64), tasks["like"].astype(np.float64)
    np.testing.assert_allclose(np.asarray(response.scores), click + 0.7 * like, rtol=1e-6)

    product = rank_pb2.Fusion(
        method=rank_pb2.FUSION_METHOD_WEIGHTED_PRODUCT,
        weights={"click": 1.0, "like": 2.0},
        exponents={"like": 0.5},
    )
    response = await rank.stub.Rank(
        rank_pb2.RankRequest(user_id="196", item_indexes=items, fusion=product), timeout=5
    )
    tasks = task_scores(response)
    click, like = tasks["click"].astype(np.float64), tasks["like"].astype(np.float64)
    np.testing.assert_allclose(np.asarray(response.scores), (1 + click) * (1 + 2 * like) ** 0.5, rtol=1e-6)
    # The two fusions order the candidates differently enough to matter, or the test proves little.
    assert not np.allclose(np.asarray(response.scores), click + 0.7 * like)


async def test_scenes_configure_fusion(quick_store: ModelStore, tmp_path: Path) -> None:
    scenes = tmp_path / "scenes.json"
    scenes.write_text(
        json.dumps(
            {
                "scenes": {
                    "default": {"fusion": {"weights": {"like": 0.5}}},
                    "home": {
                        "fusion": {
                            "method": "weighted_product",
                            "weights": {"click": 2.0},
                            "exponents": {"like": 3},
                        },
                        "rerank": {"method": "mmr"},  # the gateway's business, ignored here
                    },
                }
            }
        )
    )
    running = await start(quick_store.path, scenes_file=scenes)
    try:
        items = candidates(running.model, 2, 40).tolist()
        default = await running.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=items), timeout=5)
        tasks = task_scores(default)
        click, like = tasks["click"].astype(np.float64), tasks["like"].astype(np.float64)
        np.testing.assert_allclose(np.asarray(default.scores), click + 0.5 * like, rtol=1e-6)
        home = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", scene="home", item_indexes=items), timeout=5
        )
        # home starts from default: weights {like: 0.5, click: 2.0}, exponent 3 for like.
        np.testing.assert_allclose(
            np.asarray(home.scores), (1 + 2.0 * click) * (1 + 0.5 * like) ** 3, rtol=1e-6
        )
        with pytest.raises(aio.AioRpcError) as raised:
            await running.stub.Rank(
                rank_pb2.RankRequest(user_id="196", scene="nope", item_indexes=items), timeout=5
            )
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (raised.value.details() or "").startswith("scene:")
        # A call bringing a complete fusion (the gateway resolved the scene) needs no scene here.
        own = rank_pb2.Fusion(method=rank_pb2.FUSION_METHOD_WEIGHTED_SUM, weights={"like": 2.0})
        response = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", scene="gateway_only", item_indexes=items, fusion=own),
            timeout=5,
        )
        np.testing.assert_allclose(np.asarray(response.scores), click + 2.0 * like, rtol=1e-6)
    finally:
        await running.stop()


def test_a_bad_scenes_file_is_refused_at_start_naming_the_field(tmp_path: Path) -> None:
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps({"scenes": {"home": {"fusion": {"method": "max"}}}}))
    with pytest.raises(ValueError, match=r"scenes\.home\.fusion\.method: must be one of"):
        RankSettings(scenes_file=scenes)


# -- pre-rank --------------------------------------------------------------------------------
async def test_prerank_keeps_the_m_items_with_the_highest_dot_products(rank: Running) -> None:
    model = rank.model
    items = candidates(model, 3, 1000)
    embedding = direct(rank).embedding("196")
    dots = np.asarray(model.item_embeddings, dtype=np.float32)[items] @ embedding
    best = set(items[np.argsort(-dots)[:200]].tolist())
    assert len(best) == 200

    response = await rank.stub.PreRank(
        rank_pb2.PreRankRequest(item_indexes=items.tolist(), user_embedding=embedding.tolist(), keep=200),
        timeout=5,
    )
    kept = np.asarray(response.item_indexes)
    assert set(kept.tolist()) == best
    scores = np.asarray(response.scores)
    assert np.all(np.diff(scores) <= 0)  # highest first
    np.testing.assert_allclose(scores, np.sort(dots)[::-1][:200], rtol=1e-5, atol=1e-6)
    assert scores.min() >= np.sort(dots)[-200] - 1e-5  # nothing dropped beats anything kept

    # Inside Rank: 1,000 recalled items become the 200 ranked ones, in request order.
    ranked = await rank.stub.Rank(
        rank_pb2.RankRequest(
            user_id="196", item_indexes=items.tolist(), user_embedding=embedding.tolist(), prerank_keep=200
        ),
        timeout=5,
    )
    assert len(ranked.item_indexes) == 200
    assert set(ranked.item_indexes) == best
    position = {item: n for n, item in enumerate(items.tolist())}
    assert [position[item] for item in ranked.item_indexes] == sorted(position[item] for item in best)
    expected = direct(rank).scores("196", np.asarray(ranked.item_indexes, dtype=np.int64), embedding)
    np.testing.assert_allclose(task_scores(ranked)["click"], expected["click"], rtol=0, atol=TOLERANCE)


# -- micro-batching ---------------------------------------------------------------------------
async def test_50_concurrent_calls_are_batched_and_each_gets_exactly_its_own_scores(rank: Running) -> None:
    model, reference = rank.model, direct(rank)
    version = {"version": rank.app.versions.get().version}
    batches_before = sample("recsys_rank_batch_size_calls_count", version)
    calls_before = sample("recsys_rank_batch_size_calls_sum", version)
    single_before = sample("recsys_rank_batch_size_calls_bucket", {**version, "le": "1.0"})
    users = [str(user) for user in model.core.users.user_ids[:50].tolist()]
    # Each caller its own user, candidates and candidate count, half with an embedding.
    requests = []
    for n, user in enumerate(users):
        items = candidates(model, 100 + n, 20 + 7 * n)
        embedding = reference.embedding(user) * 0.5 if n % 2 else None
        requests.append((user, items, embedding))
    responses = await asyncio.gather(
        *(
            rank.stub.Rank(
                rank_pb2.RankRequest(
                    user_id=user,
                    item_indexes=items.tolist(),
                    user_embedding=[] if embedding is None else embedding.tolist(),
                ),
                timeout=10,
            )
            for user, items, embedding in requests
        )
    )
    for (user, items, embedding), response in zip(requests, responses, strict=True):
        assert list(response.item_indexes) == items.tolist()
        expected = reference.scores(user, items, embedding)
        for head in model.spec.heads:
            np.testing.assert_allclose(task_scores(response)[head], expected[head], rtol=0, atol=TOLERANCE)
    batches = sample("recsys_rank_batch_size_calls_count", version) - batches_before
    calls = sample("recsys_rank_batch_size_calls_sum", version) - calls_before
    single = sample("recsys_rank_batch_size_calls_bucket", {**version, "le": "1.0"}) - single_before
    assert calls == 50
    assert batches < 50, "no two calls were scored together"
    assert single < batches, "every batch held one call"


# -- versions ---------------------------------------------------------------------------------
async def test_not_serving_until_a_version_is_loaded(quick_candidate: Any, tmp_path: Path) -> None:
    from training.build import publish

    store = tmp_path / "store"
    ModelStore(store, create=True)
    running = await start(store, wait=False)
    try:
        health = health_pb2_grpc.HealthStub(running.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="recsys.v1.Rank"), timeout=2)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(aio.AioRpcError) as raised:
            await running.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=[1]), timeout=2)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        await asyncio.to_thread(publish, quick_candidate, store)
        async with asyncio.timeout(30):
            while not running.host.readiness.serving:
                await asyncio.sleep(0.05)
        status = await health.Check(health_pb2.HealthCheckRequest(service="recsys.v1.Rank"), timeout=2)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        response = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", item_indexes=[1, 2]), timeout=5
        )
        assert len(response.scores) == 2
    finally:
        await running.stop()


async def test_a_version_swap_under_50_concurrent_callers_fails_no_call(
    quick_candidate: Any, tmp_path: Path
) -> None:
    from training.build import publish

    store = tmp_path / "store"
    first = publish(quick_candidate, store).version
    running = await start(store)
    try:
        stop = asyncio.Event()
        versions_seen: set[str] = set()
        failures: list[BaseException] = []
        items = candidates(running.model, 4).tolist()

        async def caller(index: int) -> None:
            while not stop.is_set():
                try:
                    response = await running.stub.Rank(
                        rank_pb2.RankRequest(user_id=str(1 + index % 900), item_indexes=items), timeout=10
                    )
                    assert len(response.scores) == len(items)
                    versions_seen.add(response.model_version)
                except Exception as error:  # any failed call fails the test
                    failures.append(error)

        callers = [asyncio.create_task(caller(index)) for index in range(50)]
        await asyncio.sleep(0.5)
        second = await asyncio.to_thread(lambda: publish(quick_candidate, store).version)
        async with asyncio.timeout(60):
            while running.app.versions.get().version != second:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*callers)
        assert failures == []
        assert versions_seen == {first, second}
        # The previous version stays servable for its grace period.
        response = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", model_version=first, item_indexes=items), timeout=5
        )
        assert response.model_version == first
    finally:
        await running.stop()


async def test_a_bad_version_is_refused_while_the_loaded_one_keeps_serving(
    quick_candidate: Any, tmp_path: Path
) -> None:
    from training.build import publish

    store = tmp_path / "store"
    first = publish(quick_candidate, store).version
    running = await start(store, poll_seconds=3600)  # refreshed by hand below
    try:
        bad = await asyncio.to_thread(lambda: publish(quick_candidate, store).version)
        corrupt = ModelStore(store).version_path(bad) / "ranker" / "ranker.onnx"
        data = bytearray(corrupt.read_bytes())
        data[100] ^= 0xFF
        corrupt.write_bytes(bytes(data))
        assert await running.app.versions.refresh() is False
        response = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", item_indexes=[1, 2]), timeout=5
        )
        assert response.model_version == first
        with pytest.raises(aio.AioRpcError) as raised:
            await running.stub.Rank(
                rank_pb2.RankRequest(user_id="196", model_version=bad, item_indexes=[1]), timeout=5
            )
        assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await running.stop()


async def test_a_version_lacking_a_scene_task_is_refused(quick_store: ModelStore, tmp_path: Path) -> None:
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps({"scenes": {"home": {"fusion": {"weights": {"share": 1.0}}}}}))
    running = await start(quick_store.path, wait=False, scenes_file=scenes)
    try:
        await asyncio.sleep(0.5)
        assert not running.host.readiness.serving
        assert sample("recsys_rank_model_loads_total", {"outcome": "refused"}) >= 1
    finally:
        await running.stop()


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("user_id", rank_pb2.RankRequest(user_id="", item_indexes=[1])),
        ("item_indexes", rank_pb2.RankRequest(user_id="1", item_indexes=list(range(1001)))),
        ("prerank_keep", rank_pb2.RankRequest(user_id="1", item_indexes=[1], prerank_keep=-1)),
        ("user_embedding", rank_pb2.RankRequest(user_id="1", item_indexes=[1], user_embedding=[0.1, 0.2])),
        ("scene", rank_pb2.RankRequest(user_id="1", item_indexes=[1], scene="bogus")),
        (
            "fusion.weights",
            rank_pb2.RankRequest(
                user_id="1", item_indexes=[1], fusion=rank_pb2.Fusion(weights={"share": 1.0})
            ),
        ),
        (
            "fusion.exponents",
            rank_pb2.RankRequest(user_id="1", item_indexes=[1], fusion=rank_pb2.Fusion(exponents={"x": 1.0})),
        ),
        (
            "fusion.weights",
            rank_pb2.RankRequest(
                user_id="1", item_indexes=[1], fusion=rank_pb2.Fusion(weights={"like": float("nan")})
            ),
        ),
        (
            "provenance.ranks",
            rank_pb2.RankRequest(
                user_id="1",
                item_indexes=[1, 2],
                provenance=common_pb2.Provenance(channels=["itemcf"], ranks=b"\x00\x00", scores=bytes(8)),
            ),
        ),
        (
            "provenance.scores",
            rank_pb2.RankRequest(
                user_id="1",
                item_indexes=[1],
                provenance=common_pb2.Provenance(channels=["itemcf"], ranks=bytes(2), scores=bytes(3)),
            ),
        ),
        (
            "provenance.merge_scores",
            rank_pb2.RankRequest(
                user_id="1",
                item_indexes=[1],
                provenance=common_pb2.Provenance(channels=["itemcf"], ranks=bytes(2), scores=bytes(4)),
            ),
        ),
        (
            "fusion.method",
            # An enum value from a newer client this server does not know.
            rank_pb2.RankRequest(
                user_id="1",
                item_indexes=[1],
                fusion=rank_pb2.Fusion(method=rank_pb2.FusionMethod.ValueType(9)),
            ),
        ),
    ],
)
async def test_bad_rank_input_is_invalid_argument_naming_the_field(
    rank: Running, field: str, request_: rank_pb2.RankRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await rank.stub.Rank(request_, timeout=5)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")


@pytest.mark.parametrize(
    ("field", "request_"),
    [
        ("keep", rank_pb2.PreRankRequest(item_indexes=[1], user_embedding=[0.0] * 64, keep=0)),
        ("user_embedding", rank_pb2.PreRankRequest(item_indexes=[1], user_embedding=[0.0] * 3, keep=1)),
        (
            "item_indexes",
            rank_pb2.PreRankRequest(item_indexes=list(range(1001)), user_embedding=[0.0] * 64, keep=1),
        ),
    ],
)
async def test_bad_prerank_input_is_invalid_argument_naming_the_field(
    rank: Running, field: str, request_: rank_pb2.PreRankRequest
) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await rank.stub.PreRank(request_, timeout=5)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")


async def test_an_unknown_model_version_is_failed_precondition(rank: Running) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await rank.stub.Rank(
            rank_pb2.RankRequest(user_id="1", model_version="v0", item_indexes=[1]), timeout=5
        )
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert (raised.value.details() or "").startswith("model_version:")


async def test_work_whose_deadline_has_passed_is_not_scored(rank: Running) -> None:
    """Expired before the feature read, during it, or while queued for a batch: never scored."""
    import time

    from recsys.errors import DeadlineExpired
    from services.rank.engine import RankQuery
    from services.rank.scorer import ScoreJob

    model = rank.model
    version = {"version": rank.app.versions.get().version}
    items = np.asarray(candidates(model, 7, 50), dtype=np.int64)
    rows_before = sample("recsys_rank_scored_rows_total", version)
    expired = {
        stage: sample("recsys_server_expired_work_total", {"service": "rank", "stage": stage})
        for stage in ("user_state", "batch")
    }
    with pytest.raises(DeadlineExpired):
        await rank.app.engine.rank(RankQuery("196", items, deadline=time.monotonic() - 0.001))
    user = rank.app.engine._hydrator.inputs(model, "196", "", None)
    with pytest.raises(DeadlineExpired):
        await rank.app.batcher.score(ScoreJob(model, user, items, None, time.monotonic() - 0.001))
    assert sample("recsys_rank_scored_rows_total", version) == rows_before
    assert (
        sample("recsys_server_expired_work_total", {"service": "rank", "stage": "user_state"})
        == expired["user_state"] + 1
    )
    assert (
        sample("recsys_server_expired_work_total", {"service": "rank", "stage": "batch"})
        == expired["batch"] + 1
    )
    # With time left the same work is scored.
    result = await rank.app.engine.rank(RankQuery("196", items, deadline=time.monotonic() + 5))
    assert result.scores.shape == (50,)
    assert sample("recsys_rank_scored_rows_total", version) == rows_before + 50


async def test_the_history_recall_passes_on_scores_exactly_as_reading_the_feature_store(
    rank: Running,
) -> None:
    """Recall reads the user's state once and the gateway forwards it: rank's scores from that
    history are bit-equal to rank reading the state itself, live events included, and a
    history is its own (another user's history changes the scores)."""
    import time

    from recsys.feature_store import LiveEvent
    from recsys.stages.query import UserHistory
    from recsys.v1 import common_pb2

    model = rank.model
    features = rank.app.features
    now = time.time()
    clicked = [str(model.core.catalogue.item_ids[index]) for index in (11, 12, 13)]
    await features.append_events(
        "196",
        [LiveEvent(item, "click", 1.0, now - 10 + n, f"history-test-{n}") for n, item in enumerate(clicked)],
    )
    items = candidates(model, 3).tolist()
    version = rank.app.versions.get().version
    read_here = await rank.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=items), timeout=5)
    state = await features.user_state(version, "196", now=now)
    history = UserHistory.from_state(state, model.item_lookup, model.core.like_threshold).last(
        model.spec.history_length
    )
    assert history.items[-3:].tolist() == [11, 12, 13]  # the live clicks, most recent last
    message = common_pb2.UserHistory(
        item_indexes=history.items.tolist(), liked=history.liked.tolist(), region_token=history.region
    )
    passed_on = await rank.stub.Rank(
        rank_pb2.RankRequest(user_id="196", item_indexes=items, history=message), timeout=5
    )
    assert list(passed_on.scores) == list(read_here.scores)
    other = await rank.stub.Rank(
        rank_pb2.RankRequest(
            user_id="196", item_indexes=items, history=common_pb2.UserHistory(item_indexes=[5], liked=[True])
        ),
        timeout=5,
    )
    assert list(other.scores) != list(read_here.scores)
    with pytest.raises(aio.AioRpcError) as raised:
        await rank.stub.Rank(
            rank_pb2.RankRequest(
                user_id="196",
                item_indexes=items,
                history=common_pb2.UserHistory(item_indexes=[5, 6], liked=[True]),
            ),
            timeout=5,
        )
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "history.liked" in (raised.value.details() or "")


# -- fail safe -------------------------------------------------------------------------------
async def test_a_rank_started_on_a_nan_current_serves_the_previous_version(
    quick_store: ModelStore, tmp_path: Path
) -> None:
    from tests.support.bad_versions import copy_version, make_current, poison_ranker

    good = quick_store.current()
    assert good is not None
    copy_version(quick_store, good, tmp_path / "store", good, newer_by=0)
    copy_version(quick_store, good, tmp_path / "store", "nan-ranker", newer_by=1)
    store = ModelStore(tmp_path / "store")
    poison_ranker(store, "nan-ranker")
    make_current(store, "nan-ranker")
    running = await start(store.path)  # waits for SERVING
    try:
        response = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", item_indexes=[1, 2]), timeout=5
        )
        assert response.model_version == good
        assert np.isfinite(response.scores).all()
        assert running.app.versions.fallback_from == "nan-ranker"
    finally:
        await running.stop()


async def test_non_finite_scores_at_serving_are_unavailable_not_internal(
    rank: Running, tmp_path: Path
) -> None:
    """A model that passed its probe but gives NaN on real inputs: the call fails as an outage
    (the gateway falls back to pre-rank), never INTERNAL."""
    from recsys.onnx_models import OnnxModel
    from tests.support.bad_versions import copy_version, poison_ranker

    model = rank.model
    copy_version(ModelStore(rank.app.store.path), model.version, tmp_path / "copy", "nan", newer_by=0)
    poison_ranker(ModelStore(tmp_path / "copy"), "nan")
    original = model.ranker
    model.ranker = OnnxModel(tmp_path / "copy" / "nan" / RANKER)
    try:
        with pytest.raises(aio.AioRpcError) as raised:
            await rank.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=[1, 2]), timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "non-finite scores" in (raised.value.details() or "")
    finally:
        model.ranker = original


async def test_scoring_without_the_feature_store_says_so(rank: Running) -> None:
    class Down:
        async def user_state(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("redis is down")

    engine = rank.app.engine
    features = engine._features
    engine._features = Down()  # type: ignore[assignment]
    try:
        response = await rank.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=[1, 2]), timeout=5)
    finally:
        engine._features = features
    assert list(response.degraded_reasons) == ["feature_store_unavailable"]
    assert len(response.scores) == 2
    healthy = await rank.stub.Rank(rank_pb2.RankRequest(user_id="196", item_indexes=[1, 2]), timeout=5)
    assert list(healthy.degraded_reasons) == []


async def test_a_changed_scenes_file_is_applied_without_a_restart_and_a_bad_one_refused(
    quick_store: ModelStore, tmp_path: Path
) -> None:
    from services.common.wiring import config_metrics

    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps({"scenes": {"home": {"fusion": {"weights": {"like": 0.5}}}}}))
    running = await start(quick_store.path, scenes_file=scenes, poll_seconds=0.05)
    metrics = config_metrics("rank")

    async def home_scores() -> np.ndarray:
        answer = await running.stub.Rank(
            rank_pb2.RankRequest(user_id="196", scene="home", item_indexes=items), timeout=5
        )
        tasks = task_scores(answer)
        click, like = tasks["click"].astype(np.float64), tasks["like"].astype(np.float64)
        return np.asarray(answer.scores) - click - like * weight  # 0 when `weight` is in force

    try:
        items = candidates(running.model, 2, 40).tolist()
        weight = 0.5
        np.testing.assert_allclose(await home_scores(), 0, atol=1e-5)
        scenes.write_text(json.dumps({"scenes": {"home": {"fusion": {"weights": {"like": 3.0}}}}}))
        weight = 3.0
        async with asyncio.timeout(10):
            while not np.allclose(await home_scores(), 0, atol=1e-5):
                await asyncio.sleep(0.05)
        # A head this model does not have: refused against the served version, 3.0 stays.
        rejected = metrics.reloads.labels("rejected")._value.get()
        scenes.write_text(json.dumps({"scenes": {"home": {"fusion": {"weights": {"share": 1.0}}}}}))
        async with asyncio.timeout(10):
            while metrics.reloads.labels("rejected")._value.get() == rejected:
                await asyncio.sleep(0.05)
        assert metrics.valid._value.get() == 0
        np.testing.assert_allclose(await home_scores(), 0, atol=1e-5)
        assert running.host.readiness.serving
    finally:
        await running.stop()
