"""`recsys up`: run the whole stack locally (recall, rank, gateway) until Ctrl-C or SIGTERM.

Without `--redis` the three services run in this one process and share one in-process
feature store (still calling each other over gRPC on loopback), so exposures, clicks and the
cache channel work with no Redis at all. With `--redis` each service is its own process
(`recsys serve …`), as in production; the current version's features are pushed first if
Redis does not have them yet. Either way the command waits until every service reports
SERVING, prints the addresses, and on a signal stops everything (gateway first) and leaves
no process behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from recsys.errors import UsageError

STARTUP_SECONDS = 180.0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "up",
        help="run recall, rank and gateway locally",
        description="Start recall, rank and the gateway, wait until all are SERVING, print the "
        "addresses and run until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "./store"), help="model store PATH")
    parser.add_argument(
        "--redis", help="redis://HOST:PORT/DB (default: one process, in-process feature store)"
    )
    parser.add_argument("--gateway-port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=8080, help="gateway HTTP/JSON port (-1: none)")
    parser.add_argument("--recall-port", type=int, default=50052)
    parser.add_argument("--rank-port", type=int, default=50053)
    parser.add_argument("--metrics-port", type=int, default=9101, help="Prometheus port (-1: none)")
    parser.add_argument(
        "--event-log", type=Path, default=Path("events.csv"), help="event log file without Redis"
    )
    parser.add_argument("--scenes", type=Path, help="scenes JSON for the gateway")
    parser.add_argument("--experiments", type=Path, help="experiments JSON for the gateway")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    from recsys.store import ModelStore

    store = ModelStore(args.store)  # names the directory when it is missing
    if store.current() is None:
        raise UsageError(f"--store: {args.store} has no current version (run `recsys build` first)")
    for flag in ("gateway_port", "recall_port", "rank_port"):
        port = getattr(args, flag)
        if not 0 <= port <= 65535:
            raise UsageError(f"--{flag.replace('_', '-')}: expected 0–65535, got {port}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.redis:
        return _run_processes(args)
    from services.common.logs import configure_logging
    from services.common.server import run_async

    configure_logging("up", "text", args.log_level)
    run_async(lambda: _run_embedded(args))
    return 0


# -- one process ----------------------------------------------------------------------------
async def _run_embedded(args: argparse.Namespace) -> None:
    from recsys.feature_store import InProcessFeatureStore
    from services.common import metrics
    from services.common.server import GrpcHost
    from services.gateway.app import GatewayApp
    from services.gateway.settings import GatewaySettings
    from services.rank.app import RankApp
    from services.rank.settings import RankSettings
    from services.recall.app import RecallApp
    from services.recall.settings import RecallSettings

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics_server = None
    if args.metrics_port >= 0:
        metrics_server = metrics.start_metrics_server("127.0.0.1", args.metrics_port)
    features = InProcessFeatureStore()
    hosts: list[Any] = []
    try:
        recall_settings = RecallSettings(store=args.store, port=args.recall_port, metrics_port=None)
        recall = GrpcHost(RecallApp(recall_settings, features=features), recall_settings)
        hosts.append(recall)
        await recall.start()
        rank_settings = RankSettings(store=args.store, port=args.rank_port, metrics_port=None)
        rank = GrpcHost(RankApp(rank_settings, features=features), rank_settings)
        hosts.append(rank)
        await rank.start()
        gateway_settings = GatewaySettings(
            store=args.store,
            port=args.gateway_port,
            http_port=None if args.http_port < 0 else args.http_port,
            metrics_port=None,
            recall_addr=f"127.0.0.1:{recall.port}",
            rank_addr=f"127.0.0.1:{rank.port}",
            event_log=args.event_log,
            scenes_file=args.scenes,
            experiments_file=args.experiments,
        )
        gateway_app = GatewayApp(gateway_settings, features=features)
        gateway = GrpcHost(gateway_app, gateway_settings)
        hosts.append(gateway)
        await gateway.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not all(host.readiness.serving for host in hosts):
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise UsageError(
                    f"--store: the services did not load {args.store} within {STARTUP_SECONDS:.0f} s"
                )
            await asyncio.sleep(0.05)
        lines = {
            "gateway": f"127.0.0.1:{gateway.port}",
            "http": f"http://127.0.0.1:{gateway_app.http.port}" if gateway_app.http.port else "off",
            "recall": f"127.0.0.1:{recall.port}",
            "rank": f"127.0.0.1:{rank.port}",
            "metrics": f"http://127.0.0.1:{metrics_server.port}/metrics" if metrics_server else "off",
            "version": gateway_app.versions.get().version,
        }
        _announce(lines)
        await stop.wait()
        print("stopping …", file=sys.stderr, flush=True)
    finally:
        for host in reversed(hosts):  # gateway first: nothing calls a stopped dependency
            with contextlib.suppress(Exception):
                await host.stop(grace=2.0)
        await features.close()
        if metrics_server is not None:
            metrics_server.close()


def _announce(lines: dict[str, str]) -> None:
    width = max(len(name) for name in lines)
    for name, value in lines.items():
        print(f"{name:<{width}}  {value}", flush=True)
    print("SERVING (Ctrl-C to stop)", flush=True)


# -- one process per service ----------------------------------------------------------------
def _run_processes(args: argparse.Namespace) -> int:
    _push_if_needed(args)
    base = [sys.executable, "-m", "recsys.cli", "serve"]
    common = ["--store", args.store, "--redis", args.redis, "--log-level", args.log_level]
    metrics = (
        {"recall": args.metrics_port + 1, "rank": args.metrics_port + 2, "gateway": args.metrics_port}
        if args.metrics_port >= 0
        else {}
    )
    commands = {
        "recall": [*base, "recall", *common, "--port", str(args.recall_port)],
        "rank": [*base, "rank", *common, "--port", str(args.rank_port)],
        "gateway": [
            *base,
            "gateway",
            *common,
            "--port",
            str(args.gateway_port),
            "--recall-addr",
            f"127.0.0.1:{args.recall_port}",
            "--rank-addr",
            f"127.0.0.1:{args.rank_port}",
            *(["--http-port", str(args.http_port)] if args.http_port >= 0 else []),
            *(["--experiments", str(args.experiments)] if args.experiments else []),
        ],
    }
    for name, port in metrics.items():
        commands[name] += ["--metrics-port", str(port)]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in ("recall", "rank", "gateway"):
            processes[name] = subprocess.Popen(commands[name])
        ports = {"recall": args.recall_port, "rank": args.rank_port, "gateway": args.gateway_port}
        deadline = time.monotonic() + STARTUP_SECONDS
        waiting = set(processes)
        while waiting and not stopping:
            for name in list(waiting):
                if processes[name].poll() is not None:
                    raise UsageError(f"{name} exited with status {processes[name].returncode} while starting")
                if _serving(f"127.0.0.1:{ports[name]}"):
                    waiting.discard(name)
            if time.monotonic() > deadline:
                raise UsageError(
                    f"--store: {', '.join(sorted(waiting))} not SERVING after {STARTUP_SECONDS:.0f} s"
                )
            time.sleep(0.2)
        if not stopping:
            _announce(
                {
                    "gateway": f"127.0.0.1:{args.gateway_port}",
                    "http": f"http://127.0.0.1:{args.http_port}" if args.http_port >= 0 else "off",
                    "recall": f"127.0.0.1:{args.recall_port}",
                    "rank": f"127.0.0.1:{args.rank_port}",
                    "redis": args.redis,
                }
            )
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    raise UsageError(f"{name} exited with status {process.returncode}")
            time.sleep(0.2)
        print("stopping …", file=sys.stderr, flush=True)
        return 0
    finally:
        for name in ("gateway", "rank", "recall"):
            running = processes.get(name)
            if running is not None and running.poll() is None:
                running.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serving(addr: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _push_if_needed(args: argparse.Namespace) -> None:
    """Redis-backed services switch to a version only once its features are pushed: push the
    current version's unless Redis has them already."""
    from recsys.feature_store.push import push_features
    from recsys.feature_store.redis_store import RedisFeatureStore
    from recsys.store import ModelStore
    from services.common.server import run_async

    version = ModelStore(args.store).current()
    assert version is not None  # _check

    async def push() -> None:
        redis = RedisFeatureStore(args.redis, "recsys")
        try:
            ready = await redis.snapshot_ready(version)
        finally:
            await redis.close()
        if not ready:
            print(f"pushing version {version}'s features to {args.redis} …", file=sys.stderr, flush=True)
            await push_features(args.store, version, args.redis)

    run_async(push, use_uvloop=False)
