"""The whole stack as it is deployed, under load: Redis mode, one process per service (and with
`--workers N` per service), the load generator on the same machine.

    python loadtest/bench_e2e.py --store ./store [--seconds 10] [--workers 1]
        [--concurrency 1 8 32 64 128] [--open-rates 0.5 1.0 2.0] [--burst-seconds 30]
        [--tracing off|on|compare [--tracing-rounds 2]]

1. Pushes the store's CURRENT features to Redis (a DB and key prefix of its own, deleted at
   the end), starts `recsys serve recall|rank|gateway` as separate processes with a scene of
   1,000 recalled → 200 ranked → 20 returned, and waits until the gateway is SERVING.
2. Closed loop at each concurrency (each caller sends its next call when the last returns).
3. Open loop with Poisson arrivals at rates given as multiples of the best closed-loop full
   answers/s (the measured capacity), then the burst check: a fresh open loop at 70% of
   capacity, 2× capacity for `--burst-seconds`, 5 s of quiet, 70% again.
4. Every call carries a `--deadline` (1 s). Only full answers (no degraded reason) count as
   goodput and in the latency percentiles; degraded answers are a share; RESOURCE_EXHAUSTED
   refusals are counted as shed with their own p99 latency; every other code is an error.
5. CPU per full answer: user+system CPU of each service process (its workers included) over
   the phase, divided by the full answers.
6. The floor: the same pipeline in this process without gRPC or Redis (the engines called
   directly), CPU per request.
7. `--tracing on`: the services run with `--tracing`, every call sampled (or the share
   `--tracing-ratio` says: parentbased_traceidratio), exporting over
   OTLP/gRPC (the batch span processor) to a receiver in this process that counts the spans
   (a collector's stand-in: its CPU is this process's, not the services'). `--tracing compare`
   runs the phases on a stack with tracing off, then on a fresh one with it on, alternating
   `--tracing-rounds` times on the same store and Redis, and prints on/off ratios per phase.
Prints a table and a final JSON line.
"""

# ruff: noqa: ASYNC109 (the direct stubs keep grpc's `timeout` parameter)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.client import NO_RETRIES, Recommender, RecommenderError

ROOT = Path(__file__).resolve().parents[1]
COUNT = 20
SERVICES = ("recall", "rank", "gateway")
PROFILE: dict[str, float] = {}  # the floor run's mean wall ms per gateway stage
SCENE = {
    "scenes": {
        "default": {
            "quotas": {"itemcf": 400, "swing": 400, "two_tower": 400, "geo": 200, "popular": 200},
            "recall_candidates": 1000,
            "prerank_keep": 200,
            "rerank": {"method": "mmr", "theta": 0.7, "window": 5},
        }
    }
}


def _process_tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in task.read_text().split()]
                pids.extend(children)
                frontier.extend(children)
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (Linux /proc)."""
    total = 0.0
    for member in _process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:13])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    """The outcome of one phase's calls."""

    full: list[float] = field(default_factory=list)  # latencies of full answers, seconds
    degraded: int = 0
    shed: list[float] = field(default_factory=list)  # latencies of RESOURCE_EXHAUSTED refusals
    errors: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    shed_by: dict[str, int] = field(default_factory=dict)  # gateway | downstream

    async def call(self, client: Recommender, user: str) -> None:
        """One Recommend, one attempt (the client has NO_RETRIES): a shed call is counted as shed."""
        started = time.perf_counter()
        try:
            response = await client.recommend(user, count=COUNT, dry_run=True)
        except RecommenderError as error:
            if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.shed.append(time.perf_counter() - started)
                # The gateway's own admission, or a dependency's passed on ("recall is overloaded")
                where = "gateway" if error.details.startswith("server overloaded") else "downstream"
                self.shed_by[where] = self.shed_by.get(where, 0) + 1
            else:
                name = error.code.name
                self.errors[name] = self.errors.get(name, 0) + 1
            return
        if response.degraded_reasons:
            self.degraded += 1
            for reason in response.degraded_reasons:
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
        else:
            self.full.append(time.perf_counter() - started)

    def row(self, mode: str, elapsed: float, cpu: dict[str, float]) -> dict[str, Any]:
        full = np.asarray(self.full) * 1000
        shed = np.asarray(self.shed) * 1000
        answers = len(self.full) + self.degraded
        calls = answers + len(self.shed) + sum(self.errors.values())
        return {
            "mode": mode,
            "calls": calls,
            "full": len(self.full),
            "full_rps": len(self.full) / elapsed,
            "p50_ms": float(np.percentile(full, 50)) if full.size else float("nan"),
            "p99_ms": float(np.percentile(full, 99)) if full.size else float("nan"),
            "degraded_share": self.degraded / answers if answers else 0.0,
            "shed": len(self.shed),
            "shed_p99_ms": float(np.percentile(shed, 99)) if shed.size else float("nan"),
            "shed_p50_ms": float(np.percentile(shed, 50)) if shed.size else float("nan"),
            "shed_by": dict(self.shed_by),
            "errors": dict(self.errors),
            "degraded_reasons": dict(self.reasons),
            "cpu_ms_per_full": {
                name: seconds / len(self.full) * 1000 if self.full else float("nan")
                for name, seconds in cpu.items()
            },
        }


class Bench:
    def __init__(self, client: Recommender, users: list[str], pids: dict[str, int], label: str = "") -> None:
        self.client, self.users, self.pids = client, users, pids
        self.label = label  # e.g. "tracing on", prefixed to each row's mode
        self.rows: list[dict[str, Any]] = []

    def _cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def _record(self, mode: str, tally: Tally, elapsed: float, before: dict[str, float]) -> dict[str, Any]:
        after = self._cpu()
        used = {name: after[name] - before[name] for name in after}
        used["total"] = sum(used.values())
        row = tally.row(f"{self.label} {mode}" if self.label else mode, elapsed, used)
        row["phase"], row["variant"] = mode, self.label
        self.rows.append(row)
        print(_format(row), flush=True)
        return row

    async def closed(self, concurrency: int, seconds: float, *, record: bool = True) -> dict[str, Any]:
        tally = Tally()
        stop_at = time.perf_counter() + seconds

        async def caller(offset: int) -> None:
            index = offset
            while time.perf_counter() < stop_at:
                await tally.call(self.client, self.users[index % len(self.users)])
                index += concurrency

        before = self._cpu()
        began = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - began
        if not record:
            return {}
        return self._record(f"closed {concurrency}", tally, elapsed, before)

    async def open(self, rate: float, seconds: float, label: str = "") -> dict[str, Any]:
        """Poisson arrivals at `rate` calls/s for `seconds`, each call in its own task."""
        tally = Tally()
        rng = random.Random(int(rate * 1000))
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        before = self._cpu()
        began = loop.time()
        next_at = began
        index = 0
        while next_at < began + seconds:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(tally.call(self.client, self.users[index % len(self.users)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
            next_at += rng.expovariate(rate)
        if tasks:
            await asyncio.gather(*tasks)
        elapsed = loop.time() - began
        return self._record(label or f"open {rate:.0f}/s", tally, elapsed, before)


def _format(row: dict[str, Any]) -> str:
    cpu = row["cpu_ms_per_full"]
    errors = ",".join(f"{k}:{v}" for k, v in row["errors"].items()) or "0"
    return (
        f"{row['mode']:<22} {row['full_rps']:>7.1f} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f}"
        f" {row['degraded_share']:>8.1%} {row['shed']:>6} {row['shed_p99_ms']:>8.1f} {errors:>8}"
        f" {cpu['total']:>6.2f} = {cpu['gateway']:.2f}+{cpu['recall']:.2f}+{cpu['rank']:.2f}"
        + (f"  shed by: {_top(row['shed_by'])}" if row["shed_by"] else "")
        + (f"  degraded by: {_top(row['degraded_reasons'])}" if row["degraded_reasons"] else "")
    )


def _top(reasons: dict[str, int], count: int = 3) -> str:
    ranked = sorted(reasons.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{reason} {n}" for reason, n in ranked)


HEADER = (
    f"{'load':<22} {'full/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'degraded':>8} {'shed':>6} {'shed p99':>8}"
    f" {'errors':>8} {'CPU ms/full answer (gateway+recall+rank)'}"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _push(store: str, redis_url: str, prefix: str) -> str:
    from recsys.feature_store.push import push_features

    report = await push_features(store, None, redis_url, prefix)
    return report.version


async def _cleanup(redis_url: str, prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


async def _wait_serving(port: int, seconds: float = 180.0) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"bench_e2e: nothing SERVING on port {port} after {seconds:.0f} s")


def start_stack(
    args: argparse.Namespace, tmp: Path, redis_url: str, prefix: str, otlp_endpoint: str | None = None
) -> dict[str, subprocess.Popen[bytes]]:
    """The three services; `otlp_endpoint`: with tracing on, exporting there."""
    scenes = tmp / "scenes.json"
    scenes.write_text(json.dumps(SCENE))
    ports = {name: _free_port() for name in SERVICES}
    env = {**os.environ, **{f"RECSYS_{name.upper()}_REDIS_PREFIX": prefix for name in SERVICES}}
    for name in SERVICES:
        env[f"RECSYS_{name.upper()}_TRACING"] = "true" if otlp_endpoint else "false"
    if otlp_endpoint:
        env.update(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                # The gateway starts each trace (the bench sends no traceparent): every call
                # (ratio 1, the worst case) or a share of them, as production would sample.
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(args.tracing_ratio),
            }
        )
    common = ["--store", args.store, "--redis", redis_url, "--log-level", "warning", "--workers",
              str(args.workers), "--metrics-port", "0", "--shutdown-delay-seconds", "0"]  # fmt: skip
    gateway = [
        *("--recall-addr", f"127.0.0.1:{ports['recall']}", "--rank-addr", f"127.0.0.1:{ports['rank']}"),
        *("--http-port", "0", "--scenes", str(scenes), "--event-log", str(tmp / "events.csv")),
    ]
    extra: dict[str, list[str]] = {"recall": [], "rank": [], "gateway": gateway}
    processes = {}
    for name in SERVICES:
        command = [sys.executable, "-m", "recsys.cli", "serve", name, *common, "--port", str(ports[name]),
                   *extra[name], *args.service_flag]  # fmt: skip
        with (tmp / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
            processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stderr=log)
    args.gateway_port = ports["gateway"]
    for name in SERVICES:
        asyncio.run(_wait_serving(ports[name]))
    return processes


async def drive(
    args: argparse.Namespace, pids: dict[str, int], users: list[str], label: str = ""
) -> list[dict[str, Any]]:
    # Retries off: a shed call must stay visible as shed, and every call is one measured attempt.
    target = f"127.0.0.1:{args.gateway_port}"
    async with Recommender(target, timeout=args.deadline, retry=NO_RETRIES) as client:
        bench = Bench(client, users, pids, label)
        await bench.closed(8, 3.0, record=False)  # warm-up
        print(HEADER, flush=True)
        for concurrency in args.concurrency:
            await bench.closed(concurrency, args.seconds)
        capacity = max(row["full_rps"] for row in bench.rows)
        for multiple in args.open_rates:
            await bench.open(
                capacity * multiple, args.seconds, f"open {multiple:.1f}× ({capacity * multiple:.0f}/s)"
            )
        if args.burst_seconds > 0:
            await bench.open(capacity * 0.7, args.seconds, "fresh 0.7×")
            await bench.open(capacity * 2.0, args.burst_seconds, f"burst 2.0× for {args.burst_seconds:.0f} s")
            await asyncio.sleep(5.0)
            await bench.open(capacity * 0.7, args.seconds, "5 s after burst 0.7×")
        for rate in args.rates:
            await bench.open(rate, args.seconds)
        return bench.rows


async def floor(store: str, scenes: Path, users: list[str], requests: int) -> float:
    """CPU ms per request of the same pipeline in this process, without gRPC."""
    from recsys.feature_store import InProcessFeatureStore
    from recsys.v1 import rank_pb2, recall_pb2
    from services.gateway.app import GatewayApp
    from services.gateway.engine import RecommendQuery
    from services.gateway.settings import GatewaySettings
    from services.rank.app import RankApp
    from services.rank.servicer import RankServicer
    from services.rank.settings import RankSettings
    from services.recall.app import RecallApp
    from services.recall.servicer import RecallServicer
    from services.recall.settings import RecallSettings

    class Context:
        def time_remaining(self) -> float:
            return 5.0

    features = InProcessFeatureStore()
    recall = RecallApp(RecallSettings(store=store, port=0, metrics_port=None), features=features)
    rank = RankApp(RankSettings(store=store, port=0, metrics_port=None), features=features)
    gateway = GatewayApp(
        GatewaySettings(store=store, port=0, http_port=None, metrics_port=None, scenes_file=scenes),
        features=features,
    )
    recall_servicer = RecallServicer(recall.engine)
    rank_servicer = RankServicer(rank.engine)

    # The stubs' signatures (`timeout` is what grpc names the deadline).
    class DirectRecall:
        async def Recall(
            self, request: recall_pb2.RecallRequest, timeout: float, metadata: Any = ()
        ) -> recall_pb2.RecallResponse:
            return await recall_servicer.Recall(request, Context())  # type: ignore[arg-type]

    class DirectRank:
        async def Rank(
            self, request: rank_pb2.RankRequest, timeout: float, metadata: Any = ()
        ) -> rank_pb2.RankResponse:
            return await rank_servicer.Rank(request, Context())  # type: ignore[arg-type]

    gateway.engine.recall_client._stub = DirectRecall()  # type: ignore[assignment]
    gateway.engine.rank_client._stub = DirectRank()  # type: ignore[assignment]
    for app in (recall, rank, gateway):
        await app.start(_Ready())  # type: ignore[arg-type]
    async with asyncio.timeout(120):
        while True:
            try:
                for app in (recall, rank, gateway):
                    app.versions.get()
                break
            except Exception:
                await asyncio.sleep(0.1)
    for index in range(50):
        await gateway.engine.recommend(
            RecommendQuery(user_id=users[index % len(users)], count=COUNT, dry_run=True)
        )
    started = time.process_time()
    stages: dict[str, float] = {}
    for index in range(requests):
        result = await gateway.engine.recommend(
            RecommendQuery(user_id=users[index % len(users)], count=COUNT, dry_run=True, debug=True)
        )
        assert not result.degraded, result.degraded
        for stage in result.trace:
            stages[stage.stage] = stages.get(stage.stage, 0.0) + stage.milliseconds / requests
    used = time.process_time() - started
    PROFILE.update(stages)
    for app in (gateway, rank, recall):
        await app.stop()
    return used / requests * 1000


class _Ready:
    """Readiness without a health service (nothing serves gRPC in the floor run)."""

    serving = False

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def set_versions(self, versions: list[str]) -> None:
        """Nothing asks this process which versions it serves (no health service here)."""


def run_variant(
    args: argparse.Namespace,
    tmp: Path,
    prefix: str,
    users: list[str],
    traced: bool,
    label: str,
    spans: dict[str, int],
) -> list[dict[str, Any]]:
    """Start the stack (tracing on: exporting to a receiver here), drive it, stop it."""
    receiver = None
    if traced:
        sys.path.insert(0, str(ROOT))  # the receiver lives with the tests (as fuzz.py's inputs do)
        from tests.support.otlp_receiver import OtlpReceiver

        receiver = OtlpReceiver(keep=False)
        receiver.start()
    try:
        processes = start_stack(args, tmp, args.redis, prefix, receiver.endpoint if receiver else None)
        try:
            rows = asyncio.run(drive(args, {name: p.pid for name, p in processes.items()}, users, label))
        finally:
            for process in processes.values():
                process.terminate()
            for process in processes.values():
                process.wait(timeout=60)
    finally:
        if receiver is not None:
            spans[label] = spans.get(label, 0) + receiver.received  # after the services' last flush
            receiver.stop()
    return rows


def compare_tracing(rows: list[dict[str, Any]]) -> list[str]:
    """Per phase: full answers/s, p99 and CPU per full answer with tracing off and on (the
    medians over rounds), and on/off."""
    lines = [
        f"{'tracing on / off':<22} {'full/s off':>10} {'on':>7} {'ratio':>6} {'p99 off':>8} {'on':>7}"
        f" {'ratio':>6} {'CPU ms off':>10} {'on':>6} {'ratio':>6}"
    ]
    for phase in dict.fromkeys(row["phase"] for row in rows):
        off = [row for row in rows if row["phase"] == phase and row["variant"].startswith("tracing off")]
        on = [row for row in rows if row["phase"] == phase and row["variant"].startswith("tracing on")]
        if not off or not on:
            continue
        figures = []
        for key in ("full_rps", "p99_ms", "cpu"):
            values = [
                [row["cpu_ms_per_full"]["total"] if key == "cpu" else row[key] for row in side]
                for side in (off, on)
            ]
            low, high = (float(np.median(side)) for side in values)
            figures += [low, high, high / low if low else float("nan")]
        rps, p99, cpu = figures[0:3], figures[3:6], figures[6:9]
        lines.append(
            f"{phase:<22} {rps[0]:>10.1f} {rps[1]:>7.1f} {rps[2]:>6.3f} {p99[0]:>8.1f} {p99[1]:>7.1f}"
            f" {p99[2]:>6.3f} {cpu[0]:>10.2f} {cpu[1]:>6.2f} {cpu[2]:>6.3f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--open-rates", type=float, nargs="*", default=[0.5, 1.0, 2.0],
                        help="open-loop rates as multiples of the measured capacity")  # fmt: skip
    parser.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop rates in calls/s")
    parser.add_argument("--burst-seconds", type=float, default=30.0, help="0: no burst check")
    parser.add_argument("--deadline", type=float, default=1.0, help="each call's gRPC deadline, seconds")
    parser.add_argument("--workers", type=int, default=1, help="processes per service")
    parser.add_argument("--users", type=int, default=900)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--floor-requests", type=int, default=500)
    parser.add_argument("--service-flag", action="append", default=[],
                        help="an extra flag for every `recsys serve` (repeat)")  # fmt: skip
    parser.add_argument("--tracing", choices=("off", "on", "compare"), default="off",
                        help="OpenTelemetry tracing in the services: off, on (every call, OTLP to a "
                        "receiver in this process) or compare (off then on, alternating)")  # fmt: skip
    parser.add_argument("--tracing-rounds", type=int, default=1, help="off/on pairs with --tracing compare")
    parser.add_argument("--tracing-ratio", type=float, default=1.0,
                        help="share of calls sampled with tracing on (default 1: every call)")  # fmt: skip
    args = parser.parse_args()

    users = [str(user) for user in range(1, args.users + 1)]
    prefix = f"bench-e2e-{os.getpid()}"
    variants = {"off": [False], "on": [True], "compare": [False, True] * args.tracing_rounds}[args.tracing]
    spans: dict[str, int] = {}
    version = asyncio.run(_push(args.store, args.redis, prefix))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows: list[dict[str, Any]] = []
            for index, traced in enumerate(variants):
                label = ("tracing on" if traced else "tracing off") if args.tracing != "off" else ""
                if args.tracing == "compare":
                    label += f" #{index // 2 + 1}"
                rows += run_variant(args, Path(tmp), prefix, users, traced, label, spans)
            scenes = Path(tmp) / "scenes.json"
            floor_ms = asyncio.run(floor(args.store, scenes, users, args.floor_requests))
    finally:
        asyncio.run(_cleanup(args.redis, prefix))

    machine = f"{os.cpu_count()} cpu, {platform.machine()}, Python {platform.python_version()}"
    print(f"bench_e2e: {args.store} (version {version}), {machine}, workers {args.workers}, Redis mode")
    print(HEADER)
    for row in rows:
        print(_format(row))
    comparison = compare_tracing(rows) if args.tracing == "compare" else []
    for line in comparison:
        print(line)
    for label, count in spans.items():
        full = sum(row["full"] for row in rows if row["variant"] == label) or 1
        print(f"{label}: {count} spans received ({count / full:.1f} per full answer, warm-up included)")
    print(f"floor (same pipeline in one process, no gRPC, no Redis): {floor_ms:.2f} CPU ms per request")
    print("floor stages, mean wall ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in PROFILE.items()))
    print(
        json.dumps(
            {
                "benchmark": "bench_e2e",
                "store": args.store,
                "version": version,
                "workers": args.workers,
                "pipeline": {"recalled": 1000, "ranked": 200, "returned": COUNT},
                "machine": machine,
                "rows": rows,
                "floor_cpu_ms": floor_ms,
                "tracing": args.tracing,
                "spans_received": spans,
                "floor_stage_ms": PROFILE,
            }
        )
    )


if __name__ == "__main__":
    main()
