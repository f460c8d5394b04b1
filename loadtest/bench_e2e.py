"""The whole stack (gateway → recall → rank → rerank) under load: 1,000 recalled → 200 ranked →
20 returned.

    python loadtest/bench_e2e.py --store ./store [--seconds 8] [--concurrency 1 8 32 64]

1. Starts `recsys up` (the three services in one process, in-process feature store, as the
   local stack runs) with a scene asking recall for 1,000 candidates and pre-rank for 200.
2. Drives the gateway's Recommend (count 20, dry_run so every request sees the same state)
   with closed loops at each concurrency. Only full answers count towards requests/s and the
   latency percentiles; degraded answers are reported as a share.
3. CPU per request: the service process's user+system CPU (from /proc) over the requests.
4. The floor: the same pipeline in this process without gRPC — the same engines and
   servicers, called directly (protobuf objects built, nothing serialised or sent) — CPU per
   request in a loop.
Prints a table and a final JSON line.
"""

# ruff: noqa: ASYNC109 (the direct stubs keep grpc's `timeout` parameter)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from grpc import aio

from recsys.v1 import gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
COUNT = 20
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def closed_loop(
    stub: gateway_pb2_grpc.RecommenderAsyncStub, users: list[str], concurrency: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    degraded = 0
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal degraded, errors
        index = offset
        while time.perf_counter() < stop_at:
            request = gateway_pb2.RecommendRequest(
                user_id=users[index % len(users)], count=COUNT, dry_run=True
            )
            started = time.perf_counter()
            try:
                response = await stub.Recommend(request, timeout=5)
            except aio.AioRpcError:
                errors += 1
            else:
                if response.degraded_reasons:
                    degraded += 1
                else:
                    latencies.append(time.perf_counter() - started)
            index += concurrency

    began = time.perf_counter()
    await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
    elapsed = time.perf_counter() - began
    values = np.asarray(latencies) * 1000
    total = len(latencies) + degraded + errors
    return {
        "full": len(latencies),
        "degraded_share": degraded / total if total else 0.0,
        "errors": errors,
        "full_rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(values, 50)) if values.size else float("nan"),
        "p99_ms": float(np.percentile(values, 99)) if values.size else float("nan"),
        "answers": total,
    }


async def drive(args: argparse.Namespace, port: int, pid: int, users: list[str]) -> list[dict[str, Any]]:
    rows = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)
        await closed_loop(stub, users, 8, 2.0)  # warm-up
        for concurrency in args.concurrency:
            before = cpu_seconds(pid)
            result = await closed_loop(stub, users, concurrency, args.seconds)
            used = cpu_seconds(pid) - before
            answers = result["answers"]
            rows.append(
                {
                    "mode": f"concurrency {concurrency}",
                    **result,
                    "cpu_ms": used / answers * 1000 if answers else 0.0,
                }
            )
    return rows


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
            self, request: recall_pb2.RecallRequest, timeout: float
        ) -> recall_pb2.RecallResponse:
            return await recall_servicer.Recall(request, Context())  # type: ignore[arg-type]

    class DirectRank:
        async def Rank(self, request: rank_pb2.RankRequest, timeout: float) -> rank_pb2.RankResponse:
            return await rank_servicer.Rank(request, Context())  # type: ignore[arg-type]

    gateway.engine._recall = DirectRecall()  # type: ignore[assignment]
    gateway.engine._rank = DirectRank()  # type: ignore[assignment]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--users", type=int, default=900)
    parser.add_argument("--port", type=int, default=50081)
    parser.add_argument("--floor-requests", type=int, default=500)
    args = parser.parse_args()

    users = [str(user) for user in range(1, args.users + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        scenes = Path(tmp) / "scenes.json"
        scenes.write_text(json.dumps(SCENE))
        stack = subprocess.Popen(
            [
                sys.executable, "-m", "recsys.cli", "up", "--store", args.store,
                "--gateway-port", str(args.port), "--recall-port", "0", "--rank-port", "0",
                "--http-port", "-1", "--metrics-port", "-1", "--scenes", str(scenes),
                "--event-log", str(Path(tmp) / "events.csv"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert stack.stdout is not None
            for line in stack.stdout:
                if line.startswith("version"):
                    version = line.split()[-1]
                if line.startswith("SERVING"):
                    break
            else:
                raise SystemExit("bench_e2e: the stack did not start")
            rows = asyncio.run(drive(args, args.port, stack.pid, users))
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(timeout=60)
        floor_ms = asyncio.run(floor(args.store, scenes, users, args.floor_requests))

    machine = f"{os.cpu_count()} cpu, {platform.machine()}, Python {platform.python_version()}"
    print(f"bench_e2e: {args.store} (version {version}), {machine}")
    columns = ("full", "full/s", "p50 ms", "p99 ms", "degraded", "cpu ms/req")
    print(f"{'mode':<16} " + " ".join(f"{name:>{max(8, len(name))}}" for name in columns))
    for row in rows:
        latency = f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}"
        print(
            f"{row['mode']:<16} {row['full']:>6} {row['full_rps']:>8.1f} {latency}"
            f" {row['degraded_share']:>8.1%} {row['cpu_ms']:>11.2f}"
        )
    print(f"floor (same pipeline in one process, no gRPC): {floor_ms:.2f} CPU ms per request")
    print("floor stages, mean wall ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in PROFILE.items()))
    print(
        json.dumps(
            {
                "benchmark": "bench_e2e",
                "store": args.store,
                "version": version,
                "pipeline": {"recalled": 1000, "ranked": 200, "returned": COUNT},
                "machine": machine,
                "rows": rows,
                "floor_cpu_ms": floor_ms,
                "floor_stage_ms": PROFILE,
            }
        )
    )


if __name__ == "__main__":
    main()
