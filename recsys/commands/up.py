"""`recsys up`: run the whole stack locally (recall, rank, gateway) until Ctrl-C or SIGTERM.

Without `--redis` the three services run in this one process and share one in-process
feature store (still calling each other over gRPC on loopback), so exposures, clicks and the
cache channel work with no Redis at all. With `--redis` each service is its own process
(`recsys serve …`), as in production; the current version's features are pushed first if
Redis does not have them yet; every service option `up` takes is forwarded to the services
that understand it, and `--workers N` (or `--rank-workers N`, …) runs N processes per service
behind its one port. There a supervisor keeps the stack serving: a service that dies is
started again while the others keep serving, and one that fails while starting (a bad
setting) is reported in one line and not retried. Every port is checked before anything
starts: one in use (another stack) is one line naming its flag. Either way the command waits until every
service reports SERVING, prints the addresses, and on a signal stops everything (gateway
first) and leaves no process behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from recsys.errors import UsageError

STARTUP_SECONDS = 180.0
# On stop the gateway goes first and each service is gone before the next is told, so recall
# and rank have no caller left and need no shutdown delay; the gateway keeps a short one for
# its own callers (a local load test, a client that watches health).
LOCAL_SHUTDOWN_DELAY_SECONDS = 1.0


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
    parser.add_argument(
        "--ui",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the gateway's demo page at /ui and GET /v1/users/{id}/history on the HTTP port (default: on; "
        "a deployment keeps it off)",
    )
    parser.add_argument("--recall-port", type=int, default=50052)
    parser.add_argument("--rank-port", type=int, default=50053)
    parser.add_argument("--metrics-port", type=int, default=9101, help="Prometheus port (-1: none)")
    parser.add_argument(
        "--event-log", type=Path, default=Path("events.csv"), help="event log file without Redis"
    )
    parser.add_argument("--scenes", type=Path, help="scenes JSON for the gateway")
    parser.add_argument("--experiments", type=Path, help="experiments JSON for the gateway")
    parser.add_argument("--blocklist", type=Path, help="item ids never to show, one per line")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes per service behind its one port (with --redis)"
    )
    for name in ("recall", "rank", "gateway"):
        parser.add_argument(f"--{name}-workers", type=int, help=f"processes for {name} (default: --workers)")
    parser.add_argument(
        "--redis-prefix", default="recsys", help="key prefix in Redis (with --redis; default recsys)"
    )
    parser.add_argument(
        "--shutdown-delay",
        type=float,
        default=LOCAL_SHUTDOWN_DELAY_SECONDS,
        help="seconds the gateway reports NOT_SERVING before refusing calls on stop (default 1)",
    )
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="OpenTelemetry tracing in every service, exported as the OTEL_* variables say "
        "(default: OTLP/gRPC to localhost:4317); off by default",
    )
    tls = parser.add_argument_group(
        "TLS (off by default; with --tls-client-ca every hop is mTLS, the HTTP port included)"
    )
    tls.add_argument("--tls-cert", type=Path, help="every service's server certificate (PEM)")
    tls.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    tls.add_argument("--tls-client-ca", type=Path, help="CA for client certificates: require them (mTLS)")
    tls.add_argument("--tls-ca", type=Path, help="CA verifying the services (the gateway's calls, readiness)")
    tls.add_argument(
        "--tls-client-cert", type=Path, help="certificate the gateway and readiness check present"
    )
    tls.add_argument("--tls-client-key", type=Path, help="its private key")
    tls.add_argument(
        "--tls-server-name", help="name checked in the services' certificates (default: the address)"
    )
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
    _check_tls(args)
    if not args.shutdown_delay >= 0:
        raise UsageError(f"--shutdown-delay: expected seconds >= 0, got {args.shutdown_delay}")
    for flag in ("workers", "recall_workers", "rank_workers", "gateway_workers"):
        workers = getattr(args, flag)
        if workers is not None and not 1 <= workers <= 64:
            raise UsageError(f"--{flag.replace('_', '-')}: expected 1–64, got {workers}")
        if workers not in (None, 1) and not args.redis:
            raise UsageError(f"--{flag.replace('_', '-')}: needs --redis (one process runs all three)")


def _check_ports(args: argparse.Namespace) -> None:
    """Next to another stack: one line naming the flag of the first port in use, before
    anything starts (every port `up` binds is on loopback)."""
    from recsys.commands.ports import check_free

    ports = [
        (f"--gateway-port {args.gateway_port}", args.gateway_port),
        (f"--http-port {args.http_port}", args.http_port),
        (f"--recall-port {args.recall_port}", args.recall_port),
        (f"--rank-port {args.rank_port}", args.rank_port),
        (f"--metrics-port {args.metrics_port}", args.metrics_port),
    ]
    if args.redis and args.metrics_port > 0:  # a process per service: recall's and rank's follow
        ports.append((f"--metrics-port {args.metrics_port} (+1: recall's)", args.metrics_port + 1))
        ports.append((f"--metrics-port {args.metrics_port} (+2: rank's)", args.metrics_port + 2))
    check_free((label, "127.0.0.1", port) for label, port in ports)


def _check_tls(args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key: give both or neither")
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        raise UsageError("--tls-client-cert and --tls-client-key: give both or neither")
    if args.tls_cert is None:
        if args.tls_client_ca is not None:
            raise UsageError("--tls-client-ca: needs --tls-cert and --tls-key (mTLS is TLS first)")
        return
    if args.tls_ca is None:
        raise UsageError("--tls-ca: needed with --tls-cert, to verify the services' certificates")
    if args.tls_client_ca is not None and args.tls_client_cert is None:
        raise UsageError("--tls-client-cert: needed with --tls-client-ca (the gateway's calls need one)")
    for flag in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca", "tls_client_cert", "tls_client_key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UsageError(f"--{flag.replace('_', '-')}: {path} is not a readable file")


def _server_tls(args: argparse.Namespace) -> dict[str, Any]:
    """Every service's TLS settings from the flags (nothing without --tls-cert)."""
    if args.tls_cert is None:
        return {}
    return {
        "tls_cert_file": args.tls_cert,
        "tls_key_file": args.tls_key,
        "tls_client_ca_file": args.tls_client_ca,
    }


def _client_tls(args: argparse.Namespace) -> dict[str, Any]:
    """The gateway's channels to recall and rank (ClientSettings fields)."""
    if args.tls_cert is None:
        return {}
    return {
        "tls": True,
        "tls_ca_file": args.tls_ca,
        "tls_cert_file": args.tls_client_cert,
        "tls_key_file": args.tls_client_key,
        "tls_server_name": args.tls_server_name,
    }


def run(args: argparse.Namespace) -> int:
    _check(args)
    _check_ports(args)
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
    from services.common.settings import ClientSettings
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
        recall_settings = RecallSettings(
            store=args.store,
            port=args.recall_port,
            metrics_port=None,
            shutdown_delay_seconds=0.0,
            blocklist_file=args.blocklist,
            tracing=args.tracing,
            **_server_tls(args),
        )
        recall = GrpcHost(RecallApp(recall_settings, features=features), recall_settings)
        hosts.append(recall)
        await recall.start()
        rank_settings = RankSettings(
            store=args.store,
            port=args.rank_port,
            metrics_port=None,
            scenes_file=args.scenes,
            shutdown_delay_seconds=0.0,
            tracing=args.tracing,
            **_server_tls(args),
        )
        rank = GrpcHost(RankApp(rank_settings, features=features), rank_settings)
        hosts.append(rank)
        await rank.start()
        gateway_settings = GatewaySettings(
            store=args.store,
            port=args.gateway_port,
            http_port=None if args.http_port < 0 else args.http_port,
            http_ui=args.ui,
            metrics_port=None,
            recall_addr=f"127.0.0.1:{recall.port}",
            rank_addr=f"127.0.0.1:{rank.port}",
            event_log=args.event_log,
            scenes_file=args.scenes,
            experiments_file=args.experiments,
            blocklist_file=args.blocklist,
            shutdown_delay_seconds=args.shutdown_delay,
            client=ClientSettings(**_client_tls(args)),
            tracing=args.tracing,
            **_server_tls(args),
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
        http = f"{_scheme(args)}://127.0.0.1:{gateway_app.http.port}" if gateway_app.http.port else None
        lines = {
            "gateway": f"127.0.0.1:{gateway.port}",
            "http": http or "off",
            "ui": f"{http}/ui" if http and args.ui else "off",
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


def _scheme(args: argparse.Namespace) -> str:
    return "https" if args.tls_cert is not None else "http"


def _announce(lines: dict[str, str]) -> None:
    width = max(len(name) for name in lines)
    for name, value in lines.items():
        print(f"{name:<{width}}  {value}", flush=True)
    print("SERVING (Ctrl-C to stop)", flush=True)


# -- one process per service ----------------------------------------------------------------
SERVICE_ORDER = ("recall", "rank", "gateway")  # start order; stopped in reverse (gateway first)
POLL_SECONDS = 0.2
RESTART_DELAY_SECONDS = 0.5
STOP_SECONDS = 30.0


def _workers(args: argparse.Namespace, name: str) -> int:
    own = getattr(args, f"{name}_workers")
    return int(own if own is not None else args.workers)


def service_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The `recsys serve …` command of each service: every option `up` accepts that the
    service understands is forwarded (a flag `up` takes but drops would be a silent lie)."""
    base = [sys.executable, "-m", "recsys.cli", "serve"]
    common = ["--store", str(args.store), "--redis", args.redis, "--log-level", args.log_level]
    if args.tracing:
        common.append("--tracing")
    scenes = ["--scenes", str(args.scenes)] if args.scenes else []
    metrics = (
        {"recall": args.metrics_port + 1, "rank": args.metrics_port + 2, "gateway": args.metrics_port}
        if args.metrics_port >= 0
        else {}
    )
    commands = {
        "recall": [
            *base,
            "recall",
            *common,
            "--port",
            str(args.recall_port),
            *(["--blocklist", str(args.blocklist)] if args.blocklist else []),
        ],
        # rank reads each scene's score fusion from the same file as the gateway
        "rank": [*base, "rank", *common, "--port", str(args.rank_port), *scenes],
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
            "--http-port",
            str(args.http_port),  # -1: none (leaving it out would mean the default, 8080)
            *(["--http-ui"] if args.ui else []),
            *scenes,
            *(["--experiments", str(args.experiments)] if args.experiments else []),
            *(["--blocklist", str(args.blocklist)] if args.blocklist else []),
        ],
    }
    tls = [
        argument
        for flag, value in (
            ("--tls-cert", args.tls_cert),
            ("--tls-key", args.tls_key),
            ("--tls-client-ca", args.tls_client_ca),
        )
        if value is not None
        for argument in (flag, str(value))
    ]
    hops = [
        argument
        for flag, value in (
            ("--downstream-tls-ca", args.tls_ca),
            ("--downstream-tls-cert", args.tls_client_cert),
            ("--downstream-tls-key", args.tls_client_key),
            ("--downstream-tls-server-name", args.tls_server_name),
        )
        if value is not None and args.tls_cert is not None
        for argument in (flag, str(value))
    ]
    commands["gateway"] += hops
    for name in SERVICE_ORDER:
        commands[name] += tls
        commands[name] += ["--workers", str(_workers(args, name))]
        # -1: none (leaving the flag out would mean each service's default port)
        commands[name] += ["--metrics-port", str(metrics.get(name, -1))]
    return commands


class ServiceChild:
    """One service's process under `recsys up --redis`. Its stderr is forwarded line by line
    (prefixed with the service's name) and its last line kept, so that a failure can be
    reported in one line saying why."""

    def __init__(
        self,
        name: str,
        command: list[str],
        addr: str,
        env: dict[str, str],
        readiness: argparse.Namespace | None = None,
    ) -> None:
        self.name = name
        self.readiness = readiness  # the TLS flags its health checks use (None: plaintext)
        self.command = command
        self.addr = addr
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.serving = False  # reached SERVING since its last start
        self.given_up = False  # failed while starting after a restart: left down
        self.restarts = 0
        self.last_line = ""
        self._forwarder: threading.Thread | None = None

    def start(self) -> None:
        self.serving = False
        self.last_line = ""
        # A session of its own: Ctrl-C in the terminal reaches only `up`, which stops the
        # services in order; and the group can be killed whole when a service with
        # --workers dies and leaves its workers behind.
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self._forwarder = threading.Thread(target=self._forward, args=(self.process,), daemon=True)
        self._forwarder.start()

    def _forward(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if line.strip():
                self.last_line = line.strip()
            sys.stderr.write(f"[{self.name}] {line}")
            sys.stderr.flush()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def reason(self) -> str:
        """Its last log line, once the forwarder has read everything the process wrote."""
        if self._forwarder is not None:
            self._forwarder.join(2.0)
        return self.last_line or "no output"

    def kill_leftovers(self) -> None:
        """A service that died may leave its workers (its process group) behind, still
        holding the port: they go before it is started again."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, seconds: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.kill_leftovers()


class StackSupervisor:
    """Starts the services in order, waits until each is SERVING, then keeps them serving:
    a service that dies is started again (the others keep serving meanwhile, the gateway
    degrading around a missing dependency), while a service that fails during start-up (a
    port in use, a store it cannot load) is reported in one line and not retried — starting
    it again would fail the same way."""

    def __init__(self, children: dict[str, ServiceChild]) -> None:
        self.children = children
        self.stopping = threading.Event()

    def start_all(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        for name in SERVICE_ORDER:
            self.children[name].start()
        waiting = set(SERVICE_ORDER)
        while waiting and not self.stopping.is_set():
            for name in sorted(waiting):
                child = self.children[name]
                status = child.exit_status()
                if status is not None:
                    raise UsageError(
                        f"{name} failed during start-up (exit status {status}), not retried: {child.reason()}"
                    )
                if _serving(child.addr, child.readiness):
                    child.serving = True
                    waiting.discard(name)
            if time.monotonic() > deadline:
                raise UsageError(
                    f"--store: {', '.join(sorted(waiting))} not SERVING after {STARTUP_SECONDS:.0f} s"
                )
            self.stopping.wait(POLL_SECONDS)

    def watch(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            for child in self.children.values():
                self._check(child)

    def _check(self, child: ServiceChild) -> None:
        if child.given_up:
            return
        status = child.exit_status()
        if status is None:
            if not child.serving and _serving(child.addr, child.readiness):
                child.serving = True
                print(
                    f"{child.name} SERVING again (restart {child.restarts}, pid {child.pid})",
                    file=sys.stderr,
                    flush=True,
                )
            return
        child.kill_leftovers()
        if not child.serving:
            child.given_up = True
            print(
                f"recsys up: error: {child.name} failed during start-up (exit status {status}), "
                f"not retried: {child.reason()}",
                file=sys.stderr,
                flush=True,
            )
            return
        child.restarts += 1
        print(
            f"{child.name} exited with status {status}; restarting (restart {child.restarts})",
            file=sys.stderr,
            flush=True,
        )
        if not self.stopping.wait(RESTART_DELAY_SECONDS):
            child.start()

    def stop_all(self) -> None:
        # Gateway first, and each one gone before the next is told: nothing is left calling
        # a dependency that already stopped.
        for name in reversed(SERVICE_ORDER):
            child = self.children[name]
            child.terminate()
            child.wait_stopped(STOP_SECONDS)


def _run_processes(args: argparse.Namespace) -> int:
    _push_if_needed(args)
    env = {**os.environ}
    for service in SERVICE_ORDER:
        env[f"RECSYS_{service.upper()}_REDIS_PREFIX"] = args.redis_prefix
        delay = args.shutdown_delay if service == "gateway" else 0.0
        env[f"RECSYS_{service.upper()}_SHUTDOWN_DELAY_SECONDS"] = str(delay)
    ports = {"recall": args.recall_port, "rank": args.rank_port, "gateway": args.gateway_port}
    children = {
        name: ServiceChild(name, command, f"127.0.0.1:{ports[name]}", env, readiness=args)
        for name, command in service_commands(args).items()
    }
    supervisor = StackSupervisor(children)

    def request_stop(signum: int, frame: object) -> None:
        supervisor.stopping.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start_all()
        if supervisor.stopping.is_set():
            return 0
        _announce(
            {
                "gateway": f"127.0.0.1:{args.gateway_port}",
                "http": f"{_scheme(args)}://127.0.0.1:{args.http_port}" if args.http_port >= 0 else "off",
                "ui": f"{_scheme(args)}://127.0.0.1:{args.http_port}/ui"
                if args.http_port >= 0 and args.ui
                else "off",
                "recall": f"127.0.0.1:{args.recall_port}",
                "rank": f"127.0.0.1:{args.rank_port}",
                "redis": args.redis,
                "pids": " ".join(f"{name}={children[name].pid}" for name in SERVICE_ORDER),
            }
        )
        supervisor.watch()
        print("stopping …", file=sys.stderr, flush=True)
        return 0
    finally:
        supervisor.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serving(addr: str, tls: argparse.Namespace | None = None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recsys.commands.client import open_channel

    # Health stays open to unauthenticated callers, but over mTLS it still needs a certificate.
    flags = argparse.Namespace()
    if tls is not None and tls.tls_cert is not None:
        flags = argparse.Namespace(
            tls_ca=tls.tls_ca,
            tls_cert=tls.tls_client_cert,
            tls_key=tls.tls_client_key,
            tls_server_name=tls.tls_server_name,
        )
    with open_channel(addr, flags) as channel:
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
        redis = RedisFeatureStore(args.redis, args.redis_prefix)
        try:
            ready = await redis.snapshot_ready(version)
        finally:
            await redis.close()
        if not ready:
            print(f"pushing version {version}'s features to {args.redis} …", file=sys.stderr, flush=True)
            await push_features(args.store, version, args.redis, args.redis_prefix)

    run_async(push, use_uvloop=False)
