"""A Recall service whose behaviour the test chooses through the request's user id, used to
exercise the service kit with a real server (the real recall service has its own tests).

    user_id "sleep:<seconds>"  answers after sleeping
    user_id "invalid"          raises InvalidArgument naming quotas[geo]
    user_id "version"          raises WrongModelVersion
    user_id "unavailable"      raises DependencyUnavailable
    user_id "crash"            raises RuntimeError with a detail that must not leak
    anything else              answers at once with model_version "pid:<pid>"

Run as a process: python -m tests.support.scripted_service [server flags]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from grpc import aio
from pydantic_settings import SettingsConfigDict

from recsys.errors import DependencyUnavailable, InvalidArgument, WrongModelVersion
from recsys.v1 import recall_pb2, recall_pb2_grpc
from services.common.cli import add_server_arguments, settings_from_args
from services.common.server import Readiness, ServiceSpec
from services.common.settings import ServerSettings
from services.common.workers import serve

SECRET = "database password is hunter2"


class ScriptedSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_SCRIPTED_", frozen=True, extra="ignore")


class ScriptedRecallServicer(recall_pb2_grpc.RecallServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Recall(
        self, request: recall_pb2.RecallRequest, context: aio.ServicerContext[object, object]
    ) -> recall_pb2.RecallResponse:
        self.calls += 1
        user = request.user_id
        if user.startswith("sleep:"):
            await asyncio.sleep(float(user.split(":", 1)[1]))
        elif user == "invalid":
            raise InvalidArgument("quotas[geo]", "must be >= 0, got -1")
        elif user == "version":
            raise WrongModelVersion(request.model_version, ["v2"])
        elif user == "unavailable":
            raise DependencyUnavailable("redis", "connection refused")
        elif user == "crash":
            raise RuntimeError(SECRET)
        return recall_pb2.RecallResponse(model_version=f"pid:{os.getpid()}", item_indexes=[3, 1, 2])


class ScriptedApp:
    name = "scripted"
    service_names = ("recsys.v1.Recall",)

    def __init__(self, ready: asyncio.Event | None = None) -> None:
        self.servicer = ScriptedRecallServicer()
        self._ready = ready
        self._task: asyncio.Task[None] | None = None
        self.stopped = False

    def register(self, server: aio.Server) -> None:
        recall_pb2_grpc.add_RecallServicer_to_server(self.servicer, server)

    async def start(self, readiness: Readiness) -> None:
        async def become_ready() -> None:
            if self._ready is not None:
                await self._ready.wait()
            await readiness.set_serving(True)

        self._task = asyncio.create_task(become_ready())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.stopped = True


def create_app(_settings: ServerSettings) -> ScriptedApp:
    return ScriptedApp()


SPEC = ServiceSpec("scripted", create_app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripted_service")
    add_server_arguments(parser)
    settings = settings_from_args(ScriptedSettings, parser.parse_args(argv))
    return serve(SPEC, settings)


if __name__ == "__main__":
    sys.exit(main())
