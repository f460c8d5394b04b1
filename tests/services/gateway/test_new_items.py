"""Items that enter while serving (issue 17): `CatalogueService` on the gateway's port, the
new_items channel, rank's content features and the gateway's answers, on the real quick
MovieLens-100K store with recall, rank and the gateway as real gRPC servers on loopback —
on the embedded feature store and on the real Redis (a key prefix of the test's own)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from recsys.cli import main
from recsys.feature_store import InProcessFeatureStore
from recsys.feature_store.push import push_core
from recsys.feature_store.redis_store import RedisFeatureStore
from recsys.serving_model import ALL_CHANNELS, ServingModel
from recsys.store import ModelStore
from recsys.v1 import catalogue_pb2, catalogue_pb2_grpc, gateway_pb2, recall_pb2, recall_pb2_grpc
from services.common.auth import CATALOGUE_SCOPE, SERVICE_SCOPE
from services.gateway.engine import RecommendQuery
from services.recall.app import RecallApp
from tests.recsys.feature_store import REDIS_URL, delete_prefix, unique_prefix
from tests.services.gateway.test_gateway import Stack, start_stack, stop_stack

POLL = 0.5  # every service's catalogue poll interval in these tests (seconds)
# Three services poll on their own clocks: each has seen a change one interval after it was
# made, plus the time to lay the catalogue out and to answer the request that checks.
WITHIN = POLL + 1.0
USER = "196"
SCENE = "new_items_only"  # only the new_items channel recalls (tests/services/gateway/test_gateway.py)


@pytest.fixture(scope="module")
def fast_catalogue_polls() -> Iterator[None]:
    """The services read their settings when the stack starts: set the poll interval there."""
    names = [f"RECSYS_{service}_CATALOGUE_POLL_SECONDS" for service in ("RECALL", "RANK", "GATEWAY")]
    names.append("RECSYS_RECALL_LOOK_ALIKE_POLL_SECONDS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, str(POLL)))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", params=["memory", "redis"])
async def stack(
    request: pytest.FixtureRequest,
    quick_store: ModelStore,
    tmp_path_factory: pytest.TempPathFactory,
    fast_catalogue_polls: None,
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"new-items-{request.param}")
    if request.param == "memory":
        running = await start_stack(quick_store, tmp, InProcessFeatureStore())
        yield running
        await stop_stack(running)
        return
    from recsys.artifacts import load_core

    prefix = unique_prefix()
    features = RedisFeatureStore(REDIS_URL, prefix, read_timeout=1.0, write_timeout=1.0)
    version = quick_store.current()
    assert version is not None
    try:
        await push_core(features, version, load_core(quick_store.version_path(version)))
        running = await start_stack(quick_store, tmp, features)
        yield running
        await stop_stack(running)
    finally:
        await features.close()
        await delete_prefix(prefix)


def catalogue(stack: Stack) -> catalogue_pb2_grpc.CatalogueServiceAsyncStub:
    return catalogue_pb2_grpc.CatalogueServiceStub(stack.channel)


def favourite_genre(model: ServingModel, user_id: str) -> str:
    items = np.asarray(model.core.history.items.row(model.user_lookup[user_id]))
    tokens = np.asarray(model.core.catalogue.categories)[items].reshape(-1)
    token, _ = Counter(token for token in tokens.tolist() if token > 0).most_common(1)[0]
    return str(model.core.catalogue.category_vocab[token - 1])


def new_book(item_id: str, genre: str, title: str = "", days_old: float = 0.0) -> catalogue_pb2.CatalogueItem:
    item = catalogue_pb2.CatalogueItem(
        item_id=item_id,
        title=title or f"A new {genre} film",
        author="",
        categories=[genre],
        publisher="Studio",
    )
    item.published_at.FromSeconds(int(time.time() - days_old * 86_400))
    return item


async def answer_ids(stack: Stack, user_id: str = USER, scene: str = SCENE, count: int = 10) -> list[str]:
    response = await stack.recommend(user_id, scene=scene, count=count, dry_run=True)
    return [item.item_id for item in response.items]


async def seconds_until(stack: Stack, present: dict[str, bool], scene: str = SCENE) -> float:
    """Seconds until the user's answers in `scene` have (True) or lack (False) each item."""
    started = time.monotonic()
    while True:
        ids = set(await answer_ids(stack, scene=scene, count=20))
        if all((item in ids) is wanted for item, wanted in present.items()):
            return time.monotonic() - started
        if time.monotonic() - started > 4 * WITHIN:
            pytest.fail(f"{present} not reached in {4 * WITHIN} s; the answer has {sorted(ids)}")
        await asyncio.sleep(0.05)


# -- upserted items are served ------------------------------------------------------------------
async def test_an_upserted_item_is_recommended_and_ranked_within_one_poll_without_a_restart(
    stack: Stack,
) -> None:
    genre = favourite_genre(stack.model, USER)
    item_id = f"new-{unique_prefix()[-8:]}"
    assert item_id not in await answer_ids(stack)
    n_items = stack.model.core.catalogue.n_items

    upserted = await catalogue(stack).UpsertItems(
        catalogue_pb2.UpsertItemsRequest(items=[new_book(item_id, genre, title="Brand New Film")]), timeout=5
    )
    assert (upserted.added, upserted.updated) == (1, 0)
    assert await seconds_until(stack, {item_id: True}) <= WITHIN

    response = await stack.recommend(USER, scene=SCENE, count=20, dry_run=True)
    (item,) = [item for item in response.items if item.item_id == item_id]
    assert item.title == "Brand New Film"
    assert list(item.channels) == ["new_items"]
    assert math.isfinite(item.score)
    # Ranked by the ranker from its content features: task scores, finite probabilities.
    assert set(item.task_scores) >= {"click"}
    assert all(0.0 <= value <= 1.0 for value in item.task_scores.values())
    assert not response.degraded_reasons
    # Its dense index lies beside the version's own, the same in every service.
    indexes = set()
    for app in (stack.gateway_app, stack.recall.app, stack.rank.app):
        view = app.catalogue.view(response.model_version)  # type: ignore[attr-defined]
        assert view is not None
        indexes.add(view.index(item_id))
    (index,) = indexes
    assert index is not None
    assert index >= n_items

    # An unknown user is a cold start: the newest items reach them too.
    cold = await stack.recommend(f"nobody-{item_id}", scene=SCENE, count=20, dry_run=True)
    assert cold.cold_start
    assert item_id in [entry.item_id for entry in cold.items]

    # Users can act on it at once: the click is accepted, and a consumed item is not
    # recommended to them again.
    report = await stack.stub.ReportEvents(
        gateway_pb2.ReportEventsRequest(
            events=[gateway_pb2.Event(user_id=USER, item_id=item_id, type=gateway_pb2.EVENT_TYPE_CLICK)]
        ),
        timeout=5,
    )
    assert (report.accepted, report.rejected) == (1, 0)
    assert item_id not in await answer_ids(stack, count=20)
    assert item_id in await answer_ids(stack, user_id="1", count=20)


async def test_an_update_keeps_the_items_index_and_changes_what_is_shown(stack: Stack) -> None:
    genre = favourite_genre(stack.model, USER)
    item_id = f"new-{unique_prefix()[-8:]}"
    await catalogue(stack).UpsertItems(
        catalogue_pb2.UpsertItemsRequest(items=[new_book(item_id, genre)]), timeout=5
    )
    await seconds_until(stack, {item_id: True})
    version = stack.gateway_app.versions.get().version
    before = stack.gateway_app.catalogue.view(version)
    assert before is not None
    index = before.index(item_id)
    updated = await catalogue(stack).UpsertItems(
        catalogue_pb2.UpsertItemsRequest(items=[new_book(item_id, genre, title="Director's cut")]), timeout=5
    )
    assert (updated.added, updated.updated) == (0, 1)
    started = time.monotonic()
    while True:
        response = await stack.recommend(USER, scene=SCENE, count=20, dry_run=True)
        titles = {item.item_id: item.title for item in response.items}
        if titles.get(item_id) == "Director's cut":
            break
        assert time.monotonic() - started <= WITHIN, titles.get(item_id)
        await asyncio.sleep(0.05)
    after = stack.gateway_app.catalogue.view(version)
    assert after is not None
    assert after.index(item_id) == index


# -- withdrawn items are never served again -----------------------------------------------------
async def test_withdrawn_items_new_or_the_versions_own_never_appear_again(stack: Stack) -> None:
    genre = favourite_genre(stack.model, USER)
    suffix = unique_prefix()[-8:]
    gone, kept = f"gone-{suffix}", f"kept-{suffix}"
    await catalogue(stack).UpsertItems(
        catalogue_pb2.UpsertItemsRequest(items=[new_book(gone, genre), new_book(kept, genre, days_old=1)]),
        timeout=5,
    )
    await seconds_until(stack, {gone: True, kept: True})
    own = (await answer_ids(stack, scene="default", count=5))[0]  # one of the version's own items

    withdrawn = await catalogue(stack).WithdrawItems(
        catalogue_pb2.WithdrawItemsRequest(item_ids=[gone, own, gone, "no-such-item"]), timeout=5
    )
    assert (withdrawn.withdrawn, withdrawn.already_withdrawn, withdrawn.unknown) == (3, 0, 1)
    assert await seconds_until(stack, {gone: False, kept: True}) <= WITHIN
    assert await seconds_until(stack, {own: False}, scene="default") <= WITHIN

    for scene in ("default", SCENE, "unranked", "diverse_mmr", "diverse_dpp"):
        for user in (USER, "1", "405", f"nobody-{suffix}"):
            ids = await answer_ids(stack, user_id=user, scene=scene, count=50)
            assert gone not in ids, (scene, user)
            assert own not in ids, (scene, user)
    # Nor from the gateway's own popular list (what it serves when recall is down), once the
    # gateway has polled the withdrawal itself (answers lack the item as soon as recall has:
    # the gateway's poll may come a moment later).
    model = stack.model
    version = stack.gateway_app.versions.get().version
    async with asyncio.timeout(WITHIN):
        while True:
            view = stack.gateway_app.catalogue.view(version)
            if view is not None and model.item_lookup[own] in view.withdrawn.tolist():
                break
            await asyncio.sleep(0.05)
    fallback = stack.gateway_app.engine._fallback(model, RecommendQuery(user_id=USER), view)
    assert model.item_lookup[own] not in fallback.items.tolist()
    # A second withdrawal changes nothing (the call is idempotent).
    again = await catalogue(stack).WithdrawItems(
        catalogue_pb2.WithdrawItemsRequest(item_ids=[own]), timeout=5
    )
    assert (again.withdrawn, again.already_withdrawn) == (0, 1)
    # Events on a withdrawn new item are refused like those on an unknown item.
    report = await stack.stub.ReportEvents(
        gateway_pb2.ReportEventsRequest(
            events=[gateway_pb2.Event(user_id=USER, item_id=gone, type=gateway_pb2.EVENT_TYPE_CLICK)]
        ),
        timeout=5,
    )
    assert report.rejected == 1


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (catalogue_pb2.UpsertItemsRequest(), "items"),
        (
            catalogue_pb2.UpsertItemsRequest(
                items=[catalogue_pb2.CatalogueItem(item_id="ok"), catalogue_pb2.CatalogueItem()]
            ),
            "items[1].item_id",
        ),
        (
            catalogue_pb2.UpsertItemsRequest(items=[catalogue_pb2.CatalogueItem(item_id="x" * 129)]),
            "items[0].item_id",
        ),
        (
            catalogue_pb2.UpsertItemsRequest(
                items=[catalogue_pb2.CatalogueItem(item_id="a", title="t" * 513)]
            ),
            "items[0].title",
        ),
        (
            catalogue_pb2.UpsertItemsRequest(
                items=[catalogue_pb2.CatalogueItem(item_id="a", categories=["c"] * 17)]
            ),
            "items[0].categories",
        ),
        (
            catalogue_pb2.UpsertItemsRequest(
                items=[catalogue_pb2.CatalogueItem(item_id="a", categories=["ok", " "])]
            ),
            "items[0].categories[1]",
        ),
        (
            catalogue_pb2.UpsertItemsRequest(
                items=[catalogue_pb2.CatalogueItem(item_id=f"i{n}") for n in range(1001)]
            ),
            "items",
        ),
        (catalogue_pb2.WithdrawItemsRequest(), "item_ids"),
        (catalogue_pb2.WithdrawItemsRequest(item_ids=["fine", ""]), "item_ids[1]"),
        (catalogue_pb2.WithdrawItemsRequest(item_ids=["y" * 129]), "item_ids[0]"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_applies_nothing(
    stack: Stack, request_message: object, field: str
) -> None:
    revision = await stack.features.catalogue_revision()
    method = (
        catalogue(stack).UpsertItems
        if isinstance(request_message, catalogue_pb2.UpsertItemsRequest)
        else catalogue(stack).WithdrawItems
    )
    with pytest.raises(aio.AioRpcError) as raised:
        await method(request_message, timeout=5)  # type: ignore[arg-type]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")
    assert await stack.features.catalogue_revision() == revision


async def test_a_published_time_before_1970_is_refused(stack: Stack) -> None:
    item = catalogue_pb2.CatalogueItem(item_id="old")
    item.published_at.FromSeconds(-86_400)
    with pytest.raises(aio.AioRpcError) as raised:
        await catalogue(stack).UpsertItems(catalogue_pb2.UpsertItemsRequest(items=[item]), timeout=5)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("items[0].published_at:")


# -- authentication -------------------------------------------------------------------------------
CATALOGUE_KEY, SERVICE_KEY = "catalogue-editor-key", "web-backend-key"  # made up, hashed into the file


@pytest.fixture(scope="module")
async def guarded(
    quick_store: ModelStore, tmp_path_factory: pytest.TempPathFactory, fast_catalogue_polls: None
) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("catalogue-auth")
    api_keys = tmp / "api-keys.json"
    api_keys.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "sha256": hashlib.sha256(CATALOGUE_KEY.encode()).hexdigest(),
                        "subject": "cms",
                        "scopes": [CATALOGUE_SCOPE],
                    },
                    {
                        "sha256": hashlib.sha256(SERVICE_KEY.encode()).hexdigest(),
                        "subject": "web",
                        "scopes": [SERVICE_SCOPE],
                    },
                ]
            }
        )
    )
    running = await start_stack(
        quick_store, tmp, InProcessFeatureStore(), auth_required=True, auth_api_keys_file=api_keys
    )
    yield running
    await stop_stack(running)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_the_catalogue_refuses_unauthenticated_callers_and_callers_without_its_scope(
    guarded: Stack,
) -> None:
    stub = catalogue(guarded)
    upsert = catalogue_pb2.UpsertItemsRequest(items=[new_book("guarded-1", "Drama")])
    withdraw = catalogue_pb2.WithdrawItemsRequest(item_ids=["50"])
    for call in (stub.UpsertItems(upsert, timeout=5), stub.WithdrawItems(withdraw, timeout=5)):
        with pytest.raises(aio.AioRpcError) as raised:
            await call
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    for call in (
        stub.UpsertItems(upsert, metadata=bearer("not-a-key"), timeout=5),
        stub.UpsertItems(upsert, metadata=bearer(SERVICE_KEY), timeout=5),
        stub.WithdrawItems(withdraw, metadata=bearer(SERVICE_KEY), timeout=5),
    ):
        with pytest.raises(aio.AioRpcError) as raised:
            await call
        assert raised.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(aio.AioRpcError) as raised:
        await stub.UpsertItems(upsert, metadata=bearer(SERVICE_KEY), timeout=5)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert CATALOGUE_SCOPE in (raised.value.details() or "")
    assert await guarded.features.catalogue_revision() == 0  # nothing got through

    upserted = await stub.UpsertItems(upsert, metadata=bearer(CATALOGUE_KEY), timeout=5)
    assert upserted.added == 1
    assert (await stub.WithdrawItems(withdraw, metadata=bearer(CATALOGUE_KEY), timeout=5)).withdrawn == 1


# -- the command line ----------------------------------------------------------------------------
async def test_recsys_catalogue_add_and_withdraw_over_the_running_gateway(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    genre = favourite_genre(stack.model, USER)
    suffix = unique_prefix()[-8:]
    first, second = f"cli-a-{suffix}", f"cli-b-{suffix}"
    path = tmp_path / "new.csv"
    path.write_text(
        "item_id,title,author,categories,publisher,published_at\n"
        f"{first},From the command line,Someone,{genre}|Other,Pub,2026-01-01\n"
        f"{second},Another one,,{genre},,\n",
        encoding="utf-8",
    )
    addr = ["--addr", f"127.0.0.1:{stack.gateway.port}"]
    # The CLI blocks (a sync client): off the loop the servers run on.
    assert await asyncio.to_thread(main, ["catalogue", "add", str(path), "--batch-size", "1", *addr]) == 0
    assert capsys.readouterr().out == f"2 items from {path}: 2 added, 0 updated\n"
    assert await seconds_until(stack, {first: True, second: True}) <= WITHIN

    assert await asyncio.to_thread(main, ["catalogue", "withdraw", first, *addr]) == 0
    assert capsys.readouterr().out == "1 withdrawn, 0 already withdrawn\n"
    assert await seconds_until(stack, {first: False, second: True}) <= WITHIN

    # The gateway's refusal is one line naming the field; nothing of the file is applied.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"item_id": f"cli-c-{suffix}", "title": "t" * 600}) + "\n", encoding="utf-8")
    revision = await stack.features.catalogue_revision()
    assert await asyncio.to_thread(main, ["catalogue", "add", str(bad), *addr]) == 2
    error = capsys.readouterr().err
    assert (
        error
        == "recsys catalogue: error: INVALID_ARGUMENT: items[0].title: at most 512 characters, got 600\n"
    )
    assert await stack.features.catalogue_revision() == revision


# -- the look-alike channel -------------------------------------------------------------------
def user_vectors(model: ServingModel) -> np.ndarray:
    """Every user's unit two-tower embedding from the version's own data."""
    inputs = [model.user_inputs(model.query(index)) for index in range(model.core.users.n_users)]
    vectors = model.user_embeddings(inputs)
    return np.asarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


async def look_alike_list(stack: Stack, user_id: str) -> tuple[list[str], dict[str, str]]:
    """The look_alike channel's items for the user (ids, best first) and every channel's status."""
    stub = recall_pb2_grpc.RecallStub(aio.insecure_channel(f"127.0.0.1:{stack.recall.port}"))
    quotas = dict.fromkeys(ALL_CHANNELS, 0)
    quotas["look_alike"] = 20
    response = await stub.Recall(recall_pb2.RecallRequest(user_id=user_id, quotas=quotas), timeout=5)
    view = stack.gateway_app.catalogue.view(stack.model.version)
    assert view is not None
    statuses = {stat.channel: recall_pb2.ChannelStatus.Name(stat.status) for stat in response.channel_stats}
    return [view.item_id(int(index)) for index in response.item_indexes], statuses


async def test_events_on_a_new_item_bring_it_to_users_like_its_first_engagers(stack: Stack) -> None:
    model = stack.model
    vectors = user_vectors(model)
    ids = [str(user) for user in model.core.users.user_ids.tolist()]
    target = model.user_lookup[USER]
    similarity = vectors @ vectors[target]
    order = [index for index in np.argsort(-similarity).tolist() if index != target]
    near, far = [ids[index] for index in order[:2]], [ids[index] for index in order[-3:]]
    # Metadata that no user's history shares: only the events can place these items.
    tag = unique_prefix()[-8:]
    liked_by_near, liked_by_far = f"la-near-{tag}", f"la-far-{tag}"
    await catalogue(stack).UpsertItems(
        catalogue_pb2.UpsertItemsRequest(
            items=[new_book(item, f"genre-{item}") for item in (liked_by_near, liked_by_far)]
        ),
        timeout=5,
    )
    started = time.monotonic()
    while not all(
        stack.gateway_app.catalogue.known_item(item, model.version) for item in (liked_by_near, liked_by_far)
    ):
        assert time.monotonic() - started < 4 * WITHIN, "the gateway's catalogue poll never saw the items"
        await asyncio.sleep(0.05)
    listed, _ = await look_alike_list(stack, USER)
    assert not {liked_by_near, liked_by_far} & set(listed)  # nobody engaged with them yet

    events = [
        gateway_pb2.Event(
            event_id=f"{tag}-{user}", user_id=user, item_id=item, type=gateway_pb2.EVENT_TYPE_CLICK
        )
        for users, item in ((near, liked_by_near), (far[:2], liked_by_far))
        for user in users
    ]
    # An impression is no engagement: its user is not an engager.
    events.append(
        gateway_pb2.Event(
            event_id=f"{tag}-shown",
            user_id=ids[order[2]],
            item_id=liked_by_far,
            type=gateway_pb2.EVENT_TYPE_IMPRESSION,
        )
    )
    started = time.monotonic()
    while True:  # the gateway accepts events on the new items once its catalogue poll saw them
        answer = await stack.stub.ReportEvents(gateway_pb2.ReportEventsRequest(events=events), timeout=5)
        events = [
            event for index, event in enumerate(events) if index in {r.index for r in answer.rejections}
        ]
        if not events:
            break
        assert time.monotonic() - started < 4 * WITHIN, list(answer.rejections)
        await asyncio.sleep(0.05)
    engagers = await stack.features.engagers()
    assert engagers[liked_by_near] == tuple(near)
    assert engagers[liked_by_far] == tuple(far[:2])

    started = time.monotonic()
    while True:  # recall rebuilds the vectors at its next look-alike poll
        listed, statuses = await look_alike_list(stack, USER)
        if {liked_by_near, liked_by_far} <= set(listed):
            break
        assert time.monotonic() - started < 4 * WITHIN, (listed, statuses)
        await asyncio.sleep(0.05)
    assert statuses["look_alike"] == "CHANNEL_STATUS_OK"
    # Nothing changed since: the next poll rebuilds nothing (the request path never does).
    recall_app = stack.recall.app
    assert isinstance(recall_app, RecallApp)
    assert not await recall_app.look_alike.poll()
    # The user most like the near engagers gets their item first; one like the far ones, theirs.
    assert listed.index(liked_by_near) < listed.index(liked_by_far)
    other_far, _ = await look_alike_list(stack, far[2])
    assert other_far.index(liked_by_far) < other_far.index(liked_by_near)
    # An engager's own click consumed the item: it is not recalled for them again.
    mine, _ = await look_alike_list(stack, near[0])
    assert liked_by_near not in mine
