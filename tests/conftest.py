"""Shared fixtures: real gRPC servers on port 0 hosting the scripted test application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from grpc import aio

from services.common.server import GrpcHost
from services.common.settings import ServerSettings
from tests.support.scripted_service import ScriptedApp


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
