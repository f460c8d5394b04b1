"""What only the Redis implementation promises: its key schema and packed values, one round
trip per read, bounded waits on a dead or silent Redis, and the push-features command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from recsys.artifacts import save_core
from recsys.feature_store import FeatureStoreUnavailable, LiveDataPolicy, LiveEvent, Snapshot
from recsys.feature_store.bloom import ExposureFilterConfig
from recsys.feature_store.push import push_core, push_features
from recsys.feature_store.redis_store import CACHE_ENTRY, RedisFeatureStore, parse_redis_url, redact_url
from recsys.store import VersionWriter
from tests.recsys.feature_store import REDIS_URL, tiny_core, unique_prefix
from tests.support.redis_server import PrivateRedis

NOW = 1_750_000_000.0
POLICY = LiveDataPolicy(exposures=ExposureFilterConfig(capacity=100, error_rate=0.01))
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisFeatureStore]:
    redis = RedisFeatureStore(REDIS_URL, prefix, policy=POLICY, read_timeout=1.0, write_timeout=1.0)
    yield redis
    await redis.close()


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    redis = Redis.from_url(REDIS_URL)
    yield redis
    await redis.aclose()


async def get_bytes(client: Redis, key: str) -> bytes:
    value = await client.get(key)
    assert isinstance(value, bytes), key
    return value


async def keys_under(client: Redis, prefix: str) -> set[str]:
    return {key.decode() async for key in client.scan_iter(match=f"{prefix}:*", count=1_000)}


# --- key schema and values --------------------------------------------------------------------
async def test_key_schema(store: RedisFeatureStore, client: Redis, prefix: str) -> None:
    await push_core(store, "v1", tiny_core())
    await store.append_events("alice", [LiveEvent("item-1", "click", 1.0, NOW, "e1")])
    await store.record_exposures("alice", ["item-2"], NOW)
    await store.put_cache("alice", [("item-3", 0.5)], NOW)
    await store.mark_events_seen(["e1"], ttl_seconds=600)
    await store.log_append([{"event_id": "e1"}], max_length=100)
    day = int(NOW // 86_400)
    # One marker per append_events and log_append call (a token of their own, so that a
    # retried attempt applies nothing twice), expiring a minute after the call.
    (applied,) = [key async for key in client.scan_iter(match=f"{prefix}:u:{{alice}}:applied:*")]
    (logged,) = [key async for key in client.scan_iter(match=f"{prefix}:events:applied:*")]
    expected = {
        f"{prefix}:v:v1:ready": b"string",
        f"{prefix}:v:v1:u:{{alice}}:snap": b"string",
        f"{prefix}:v:v1:u:{{bob}}:snap": b"string",
        f"{prefix}:v:v1:u:{{carol}}:snap": b"string",  # no history but a region
        # no key for dave: no history, no region
        f"{prefix}:u:{{alice}}:live": b"list",
        f"{prefix}:u:{{alice}}:seen:{day}": b"string",
        f"{prefix}:u:{{alice}}:cache": b"hash",
        f"{prefix}:evt:e1": b"string",
        applied.decode(): b"string",
        f"{prefix}:events": b"stream",
        logged.decode(): b"string",
    }
    assert await keys_under(client, prefix) == set(expected)
    for key, kind in expected.items():
        assert await client.type(key) == kind, key
    # One user's keys share a Redis Cluster slot (hash tag {alice}), whatever the version.
    alice = [key for key in expected if "{alice}" in key]
    assert len(alice) == 5
    assert len({key_slot(key.encode()) for key in alice}) == 1
    # The log's marker is in the stream's slot (its hash tag is the stream's whole name).
    assert key_slot(logged) == key_slot(f"{prefix}:events".encode())
    assert 0 < await client.ttl(applied) <= 60


async def test_values_are_packed_bytes(store: RedisFeatureStore, client: Redis, prefix: str) -> None:
    core = tiny_core()
    await push_core(store, "v1", core)
    snapshot = await get_bytes(client, f"{prefix}:v:v1:u:{{alice}}:snap")
    assert len(snapshot) == 16 + 16 * 3 == Snapshot.packed_size(3)
    assert snapshot[:4] == b"RSS1"
    unpacked = Snapshot.unpack(snapshot)
    assert unpacked.items.tolist() == [0, 3, 5]
    assert unpacked.times.tolist() == core.history.times.row(0).tolist()
    assert unpacked.region == 1
    assert len(await get_bytes(client, f"{prefix}:v:v1:u:{{carol}}:snap")) == 16

    event = LiveEvent("item-1", "rating", 4.5, NOW, "e1")
    await store.append_events("alice", [event])
    (packed,) = await client.lrange(f"{prefix}:u:{{alice}}:live", 0, -1)
    assert isinstance(packed, bytes)
    assert len(packed) == 21 + len("item-1") + len("e1")
    assert LiveEvent.unpack(packed) == event

    await store.put_cache("alice", [("item-3", 0.5)], NOW)
    cache = await client.hgetall(f"{prefix}:u:{{alice}}:cache")
    assert list(cache) == [b"item-3"]
    (value,) = cache.values()
    assert isinstance(value, bytes)
    assert len(value) == CACHE_ENTRY.size == 20
    assert CACHE_ENTRY.unpack(value) == (0.5, NOW, 0)  # score, time added, uses

    summary = json.loads(await get_bytes(client, f"{prefix}:v:v1:ready"))
    assert summary["users"] == 4
    assert summary["snapshots"] == 3
    assert summary["bytes"] == 16 * 3 + 16 * 4
    assert await store.ready_summary("v1") == summary
    assert await store.ready_summary("v2") is None


async def test_live_data_expires(store: RedisFeatureStore, client: Redis, prefix: str) -> None:
    await store.append_events("alice", [LiveEvent("item-1", "click", 1.0, NOW, "e1")])
    await store.put_cache("alice", [("item-3", 0.5)], NOW)
    await store.mark_events_seen(["e1"], ttl_seconds=600)
    assert 0 < await client.ttl(f"{prefix}:u:{{alice}}:live") <= POLICY.live_ttl_seconds  # type: ignore[operator]
    assert 0 < await client.ttl(f"{prefix}:u:{{alice}}:cache") <= POLICY.cache_max_age_seconds
    assert 0 < await client.ttl(f"{prefix}:evt:e1") <= 600
    assert await client.ttl(f"{prefix}:v:v1:ready") == -2  # not pushed: no key


async def test_user_ids_with_braces_keep_one_slot(
    store: RedisFeatureStore, client: Redis, prefix: str
) -> None:
    user = "we{ird}%"
    await push_core(store, "v1", tiny_core({user: [(1, 1_700_000_000, 3.0)]}, {}))
    await store.append_events(user, [LiveEvent("item-1", "click", 1.0, NOW, "e1")])
    await store.record_exposures(user, ["item-2"], NOW)
    keys = await keys_under(client, prefix) - {f"{prefix}:v:v1:ready"}
    assert len(keys) == 4  # snapshot, live list, exposures, the append's marker
    assert all("{we%7Bird%7D%25}" in key for key in keys)
    assert len({key_slot(key.encode()) for key in keys}) == 1
    state = await store.user_state("v1", user, now=NOW)
    assert state.snapshot.items.tolist() == [1]
    assert [event.item_id for event in state.live_events] == ["item-1"]
    assert state.exposure_filter is not None
    assert state.exposure_filter.contains(["item-2"]).tolist() == [True]


async def test_delete_version_unlinks_exactly_its_keys(
    store: RedisFeatureStore, client: Redis, prefix: str
) -> None:
    await push_core(store, "v1", tiny_core())
    await push_core(store, "v10", tiny_core())  # a prefix of v1's name must not match
    await store.append_events("alice", [LiveEvent("item-1", "click", 1.0, NOW, "e1")])
    assert await store.delete_version("v1") == 3 + 1  # alice, bob, carol + the ready marker
    remaining = await keys_under(client, prefix)
    assert not any(key.startswith(f"{prefix}:v:v1:") for key in remaining)
    assert sum(key.startswith(f"{prefix}:v:v10:") for key in remaining) == 4
    assert f"{prefix}:u:{{alice}}:live" in remaining


async def test_push_batches_and_is_idempotent(store: RedisFeatureStore, client: Redis, prefix: str) -> None:
    progress: list[tuple[int, int]] = []
    report = await push_core(
        store, "v1", tiny_core(), batch=3, progress=lambda p: progress.append((p.done, p.total))
    )
    assert progress == [(3, 4), (4, 4)]
    assert (report.users, report.written, report.batches, report.bytes) == (4, 3, 2, 16 * 3 + 16 * 4)
    before = {key: await client.get(key) for key in await keys_under(client, prefix)}
    await push_core(store, "v1", tiny_core(), batch=2)
    after = {key: await client.get(key) for key in await keys_under(client, prefix)}
    assert after.keys() == before.keys()
    ready = f"{prefix}:v:v1:ready"
    assert {key: value for key, value in after.items() if key != ready} == {
        key: value for key, value in before.items() if key != ready
    }


# --- one round trip ---------------------------------------------------------------------------
@pytest.fixture
def sent_packets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a connection sends (one send per round trip; pipelines send once)."""
    sends: list[int] = []
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sends


async def test_user_state_is_one_round_trip(store: RedisFeatureStore, sent_packets: list[int]) -> None:
    await push_core(store, "v1", tiny_core())
    await store.append_events("alice", [LiveEvent("item-1", "click", 1.0, NOW, "e1")])
    await store.record_exposures("alice", ["item-2"], NOW)
    await store.put_cache("alice", [("item-3", 0.5)], NOW)
    await store.user_state("v1", "alice", now=NOW)  # connects (the handshake is not counted below)
    sent_packets.clear()
    state = await store.user_state("v1", "alice", now=NOW)
    assert len(sent_packets) == 1
    assert state.snapshot.items.tolist() == [0, 3, 5]
    assert len(state.live_events) == 1
    assert state.cache_items == (("item-3", 0.5),)
    sent_packets.clear()
    await store.users_states("v1", ["alice", "bob", "zed"], now=NOW)
    assert len(sent_packets) == 1


# --- failures -----------------------------------------------------------------------------------
async def test_a_closed_port_raises_unavailable_quickly() -> None:
    store = RedisFeatureStore(CLOSED_PORT_URL, unique_prefix())
    try:
        for call in (
            store.user_state("v1", "alice", now=NOW),
            store.snapshot_ready("v1"),
            store.append_events("alice", [LiveEvent("item-1", "click", 1.0, NOW, "e1")]),
            store.take_cache("alice", 5, NOW),
        ):
            started = time.monotonic()
            with pytest.raises(FeatureStoreUnavailable, match=r"127\.0\.0\.1:1"):
                await call
            assert time.monotonic() - started < 1.0
    finally:
        await store.close()


async def test_a_silent_redis_times_out_within_the_read_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisFeatureStore(f"redis://127.0.0.1:{port}/0", unique_prefix(), read_timeout=0.05)
    try:
        started = time.monotonic()
        with pytest.raises(FeatureStoreUnavailable):
            await store.user_state("v1", "alice", now=NOW)
        assert time.monotonic() - started < 0.5
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


def test_urls() -> None:
    assert parse_redis_url("redis://h:6379/2") == ("redis://h:6379/2", False)
    assert parse_redis_url("redis+cluster://h:7000") == ("redis://h:7000", True)
    assert parse_redis_url("rediss://h:7000/0?cluster=1&ssl_cert_reqs=none") == (
        "rediss://h:7000/0?ssl_cert_reqs=none",
        True,
    )
    with pytest.raises(ValueError, match="scheme"):
        parse_redis_url("http://h")
    assert redact_url("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    with pytest.raises(ValueError, match="prefix"):
        RedisFeatureStore(REDIS_URL, "a{b}")


# --- push-features ------------------------------------------------------------------------------
@pytest.fixture
def tiny_store(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "store"
    with VersionWriter(path, now=datetime(2024, 5, 1, tzinfo=UTC)) as version:
        save_core(tiny_core(), version)
        version.publish()
    return path, version.version


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RECSYS_")}
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_push_features_command(
    tiny_store: tuple[Path, str], client: Redis, prefix: str, store: RedisFeatureStore
) -> None:
    path, version = tiny_store
    command = ("store", "push-features", "--store", str(path), "--redis", REDIS_URL, "--prefix", prefix)
    result = await asyncio.to_thread(run_cli, *command, "--batch", "3")
    assert result.returncode == 0, result.stderr
    progress = result.stderr.strip().splitlines()
    assert len(progress) == 2
    assert "3/4 users" in progress[0]
    assert "4/4 users" in progress[1]
    assert f"pushed {version}" in result.stdout
    assert "ready" in result.stdout
    assert await store.snapshot_ready(version)  # the CURRENT version by default
    state = await store.user_state(version, "alice", now=NOW)
    assert state.snapshot.items.tolist() == [0, 3, 5]

    keys = await keys_under(client, prefix)
    assert len(keys) == 4
    again = await asyncio.to_thread(run_cli, *command, "--version", version)
    assert again.returncode == 0, again.stderr
    assert await keys_under(client, prefix) == keys


async def test_push_features_from_a_version_directory(
    tiny_store: tuple[Path, str], prefix: str, store: RedisFeatureStore
) -> None:
    path, version = tiny_store
    report = await push_features(path / version, None, REDIS_URL, prefix, batch=10)
    assert (report.version, report.users, report.batches) == (version, 4, 1)
    assert await store.snapshot_ready(version)


def test_push_features_to_an_unreachable_redis_names_the_flag(tiny_store: tuple[Path, str]) -> None:
    path, _ = tiny_store
    started = time.monotonic()
    result = run_cli("store", "push-features", "--store", str(path), "--redis", CLOSED_PORT_URL)
    line = one_line_error(result)
    assert "--redis" in line
    assert "127.0.0.1:1" in line
    assert time.monotonic() - started < 30


def test_push_features_of_a_missing_version_names_the_flag(tiny_store: tuple[Path, str]) -> None:
    path, _ = tiny_store
    result = run_cli(
        "store", "push-features", "--store", str(path), "--redis", REDIS_URL, "--version", "nope"
    )
    assert "--version" in one_line_error(result)


# --- a slow Redis (the private_redis fixture: tests/conftest.py) --------------------------------


async def test_a_slow_redis_fails_calls_within_their_budget_without_a_reconnect_storm(
    private_redis: PrivateRedis,
) -> None:
    """While Redis is stalled (DEBUG SLEEP), every call fails within its budget, as a caller's
    own deadline would cut it too, yet the store opens no connection beyond its bounded pool:
    the commands left behind finish when Redis answers and their connections are reused."""
    store = RedisFeatureStore(private_redis.url, unique_prefix(), read_timeout=0.03, max_connections=4)
    admin = Redis.from_url(private_redis.url)
    staller = Redis.from_url(private_redis.url)
    try:
        await store.user_state("v1", "alice", now=NOW)
        await staller.ping()
        before = (await admin.info("stats"))["total_connections_received"]
        stall = asyncio.ensure_future(staller.execute_command("DEBUG", "SLEEP", "1"))
        await asyncio.sleep(0.05)
        outcomes = []
        for _ in range(8):  # 8 waves of 8 concurrent calls, each wave bounded by the budget
            calls = [store.user_state("v1", f"user-{index}", now=NOW) for index in range(7)]
            # a caller with a nearer deadline of its own abandons a call early
            calls.append(asyncio.wait_for(store.user_state("v1", "impatient", now=NOW), 0.005))
            outcomes += await asyncio.gather(*calls, return_exceptions=True)
        await stall
        failed = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        assert len(failed) == len(outcomes)
        assert {type(error) for error in failed} <= {FeatureStoreUnavailable, TimeoutError}
        after_recovery = await store.user_state("v1", "alice", now=NOW)  # answers again
        assert after_recovery.snapshot.items.shape == (0,)
        after = (await admin.info("stats"))["total_connections_received"]
        assert after - before <= 4, f"{after - before} new connections for {len(outcomes)} calls"
        assert store.abandoned_calls > 0
    finally:
        await store.close()
        await admin.aclose()
        await staller.aclose()
