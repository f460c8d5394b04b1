"""Shared fixtures: real gRPC servers on port 0 hosting the scripted test application."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from grpc import aio

from services.common.server import GrpcHost
from services.common.settings import ServerSettings
from tests.recsys.feature_store import delete_prefix, unique_prefix
from tests.support.redis_server import PrivateRedis
from tests.support.scripted_service import ScriptedApp
from tests.support.stack import UpProcess

# A server's default shutdown delay (5 s, for load balancers) would add 5 s to every server a
# test stops; tests that exercise the delay set it themselves. Set before any settings object
# is read, and inherited by the server processes tests start.
for _prefix in ("RECSYS_", "RECSYS_RECALL_", "RECSYS_RANK_", "RECSYS_GATEWAY_", "RECSYS_SCRIPTED_"):
    os.environ.setdefault(f"{_prefix}SHUTDOWN_DELAY_SECONDS", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--ui-screenshot",
        metavar="PNG",
        help="tests/services/gateway/test_ui.py: save the demo page after its click as this PNG "
        "(docs/ui.png is made so); normal runs write nothing",
    )


@dataclass
class RunningHost:
    host: GrpcHost
    app: ScriptedApp
    channel: aio.Channel
    ready: asyncio.Event

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.host.port}"


HostFactory = Callable[..., Any]


@pytest.fixture
async def start_host() -> AsyncIterator[HostFactory]:
    """Start a GrpcHost (port 0) with a ScriptedApp; readiness is released by the test
    (`running.ready.set()`) unless `ready=True`. Everything is stopped afterwards."""
    started: list[RunningHost] = []

    async def start(*, ready: bool = True, **settings: Any) -> RunningHost:
        event = asyncio.Event()
        if ready:
            event.set()
        app = ScriptedApp(event)
        host = GrpcHost(app, ServerSettings(port=0, metrics_port=None, **settings))
        await host.start()
        channel = aio.insecure_channel(f"127.0.0.1:{host.port}")
        running = RunningHost(host, app, channel, event)
        started.append(running)
        if ready:
            await wait_serving(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        await running.host.stop(grace=0)


async def wait_serving(running: RunningHost) -> None:
    async with asyncio.timeout(5.0):
        while not running.host.readiness.serving:
            await asyncio.sleep(0.01)


# -- one quick MovieLens-100K build per test run, shared by every test that needs a store --
@pytest.fixture(scope="session")
def quick_candidate() -> Any:
    """A trained, evaluated (unpublished) quick-profile MovieLens-100K version. Built once per
    run: it is the only model build CI does."""
    from training.build import PROFILES, prepare
    from training.data import default_data_dir, load_movielens_100k

    return prepare(load_movielens_100k(default_data_dir()), PROFILES["quick"], quiet=True)


@pytest.fixture(scope="session")
def quick_store(quick_candidate: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The quick candidate published into a store of its own; returns the ModelStore."""
    from recsys.store import ModelStore
    from training.build import publish

    path = tmp_path_factory.mktemp("quick-store")
    publish(quick_candidate, path)
    return ModelStore(path)


# -- one private Redis Cluster per test run (3 masters + 3 replicas on loopback) -------------
@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A real Redis Cluster started once per run and stopped at its end. Without
    redis-server the tests that need it skip locally but fail in CI (CI=true), where a
    silent skip would hide that the cluster was never tested."""
    from tests.support.redis_cluster import PrivateRedisCluster, cluster_tools_missing

    missing = cluster_tools_missing()
    if missing is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Redis Cluster tests cannot run in CI: {missing}")
        pytest.skip(f"Redis Cluster tests need a local redis-server: {missing}")
    cluster = PrivateRedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of the test's own; its keys are deleted afterwards."""
    name = unique_prefix()
    yield name
    await delete_prefix(name)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own on a free loopback port (to stall, restart or empty)."""
    server = PrivateRedis()
    server.start()
    yield server
    server.close()


@pytest.fixture
def stacks() -> Iterator[list[UpProcess]]:
    """`recsys up` processes a test starts (append them); all stopped afterwards."""
    started: list[UpProcess] = []
    yield started
    for up in started:
        up.stop()
