"""The demo page's data and files on the real stack (quick MovieLens-100K store, recall, rank
and the gateway on loopback sharing the in-process feature store): GET
/v1/users/{id}/history reads the history recall serves from, newest first and bounded, and
/ui serves the page's own files; both exist only with `http_ui`. (The page itself is driven in
a browser by test_ui.py; authentication of the endpoint: test_auth.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from recsys.feature_store import InProcessFeatureStore
from recsys.store import ModelStore
from services.gateway.history import SNAPSHOT_KIND, UserHistoryHydrator
from services.gateway.http import UI_DIR, GatewayHttp
from services.gateway.settings import GatewaySettings
from tests.services.gateway.test_gateway import Stack, start_stack, stop_stack

MAX_ENTRIES = 30


@pytest.fixture(scope="module")
async def stack(quick_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    running = await start_stack(
        quick_store,
        tmp_path_factory.mktemp("history"),
        InProcessFeatureStore(),
        http_ui=True,
        http_history_max_entries=MAX_ENTRIES,
    )
    yield running
    await stop_stack(running)


def get(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status), dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return int(error.code), dict(error.headers), error.read()


async def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    status, _, raw = await asyncio.to_thread(get, url, body)
    return status, json.loads(raw)


def base(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.gateway_app.http.port}"


def version_history(stack: Stack, user_id: str) -> list[tuple[str, str]]:
    """(item id, title) of the user's training history in the served version, newest first."""
    core = stack.model.core
    items = np.asarray(core.history.items.row(stack.model.user_lookup[user_id])).tolist()
    return [(str(core.catalogue.item_ids[i]), str(core.catalogue.titles[i])) for i in reversed(items)]


def test_the_page_and_the_history_are_off_unless_enabled() -> None:
    assert GatewaySettings().http_ui is False


async def test_without_http_ui_neither_the_page_nor_the_history_exists(stack: Stack) -> None:
    app = stack.gateway_app
    plain = GatewayHttp(app.engine, app.ingestor, 10, lambda: True)  # as GatewayApp builds it without
    await plain.start("127.0.0.1", 0)
    try:
        for path in ("/ui", "/ui/app.js", "/v1/users/196/history"):
            status, _, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{plain.port}{path}")
            assert status == 404, path
    finally:
        await plain.stop()


async def test_the_history_is_the_versions_snapshot_newest_first_with_titles(stack: Stack) -> None:
    status, body = await call(f"{base(stack)}/v1/users/405/history?limit=7")
    assert status == 200
    assert (body["user_id"], body["model_version"], body["known_user"]) == ("405", stack.model.version, True)
    trained = version_history(stack, "405")
    assert len(trained) > 7
    assert body["more"] is True
    assert body["degraded_reasons"] == []
    entries = body["entries"]
    assert [(e["item_id"], e["title"]) for e in entries] == trained[:7]
    assert {e["kind"] for e in entries} == {SNAPSHOT_KIND}
    assert not any(e["live"] for e in entries)
    times = [e["time"] for e in entries]
    # MovieLens-100K's years, as protobuf's JSON writes a time.
    assert all(re.fullmatch(r"199[78]-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in times), times
    assert times == sorted(times, reverse=True)
    assert all(e["rating"] in (1.0, 2.0, 3.0, 4.0, 5.0) for e in entries)
    # No limit: 20, within the cap.
    status, body = await call(f"{base(stack)}/v1/users/405/history")
    assert (status, len(body["entries"])) == (200, 20)


async def test_reported_events_come_first_and_an_unknown_user_has_only_them(stack: Stack) -> None:
    clicked, rated = version_history(stack, "13")[0][0], "50"  # any items the catalogue has
    catalogue = stack.model.core.catalogue
    titles = dict(zip(catalogue.item_ids.tolist(), catalogue.titles.tolist(), strict=True))
    now = time.time()
    click = {"user_id": "ui-new", "item_id": clicked, "type": "EVENT_TYPE_CLICK", "event_id": f"h1-{now}"}
    rating = {"user_id": "ui-new", "item_id": rated, "type": "EVENT_TYPE_RATING", "value": 4}
    events = [click, {**rating, "event_id": f"h2-{now}"}]
    status, report = await call(f"{base(stack)}/v1/events", {"events": events})
    assert (status, report["accepted"]) == (200, 2)
    status, body = await call(f"{base(stack)}/v1/users/ui-new/history")
    assert status == 200
    assert body["known_user"] is False
    assert body["more"] is False
    got = [(e["kind"], e["item_id"], e["title"], e["rating"], e["live"]) for e in body["entries"]]
    assert got == [
        ("rating", rated, titles[rated], 4.0, True),
        ("click", clicked, titles[clicked], None, True),
    ]
    # A known user: the click first, then the version's history.
    event = {"user_id": "13", "item_id": rated, "type": "EVENT_TYPE_CLICK", "event_id": f"h3-{now}"}
    assert (await call(f"{base(stack)}/v1/events", {"events": [event]}))[1]["accepted"] == 1
    status, body = await call(f"{base(stack)}/v1/users/13/history?limit=3")
    entries = body["entries"]
    assert [(e["kind"], e["item_id"]) for e in entries[:1]] == [("click", rated)]
    assert [(e["item_id"], e["title"]) for e in entries[1:]] == version_history(stack, "13")[:2]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"/v1/users/{'u' * 129}/history", "user_id"),
        ("/v1/users/196/history?limit=0", "limit"),
        (f"/v1/users/196/history?limit={MAX_ENTRIES + 1}", "limit"),
        ("/v1/users/196/history?limit=ten", "limit"),
        ("/v1/users/196/history?since=0", "since"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(stack: Stack, path: str, field: str) -> None:
    status, body = await call(f"{base(stack)}{path}")
    assert status == 400
    assert body["error"]["code"] == "INVALID_ARGUMENT"
    assert body["error"]["message"].startswith(f"{field}:"), body


async def test_a_lost_snapshot_is_replaced_by_the_versions_own_and_flagged(stack: Stack) -> None:
    # A feature store that has none of the version's snapshots (Redis restarted empty).
    hydrator = UserHistoryHydrator(stack.gateway_app.versions, InProcessFeatureStore(), MAX_ENTRIES)
    view = await hydrator.read("405", 5)
    assert view.degraded == ["feature_snapshot_missing"]
    assert [(e.item_id, e.title) for e in view.entries] == version_history(stack, "405")[:5]


async def test_the_page_is_served_as_checked_in_with_nothing_from_elsewhere(stack: Stack) -> None:
    for path, name, content_type in (
        ("/ui", "index.html", "text/html"),
        ("/ui/app.js", "app.js", "text/javascript"),
        ("/ui/style.css", "style.css", "text/css"),
    ):
        status, headers, body = await asyncio.to_thread(get, f"{base(stack)}{path}")
        assert status == 200, path
        assert headers["Content-Type"].startswith(content_type)
        assert body == (UI_DIR / name).read_bytes()
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        # No CDN, no absolute URL: the page loads its own files only.
        assert not re.search(rb"(src|href)=\"(https?:)?//", body), path
    page = (UI_DIR / "index.html").read_text()
    assert 'src="/ui/app.js"' in page
    assert 'href="/ui/style.css"' in page
    script = (UI_DIR / "app.js").read_text()
    assert "innerHTML" not in script  # values go in as text, never as markup
    for endpoint in ("/v1/recommend", "/v1/events", "/v1/users/"):
        assert endpoint in script
