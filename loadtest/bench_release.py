"""Operations under load, measured on real processes and a real Redis:

    python loadtest/bench_release.py --store ./store [--redis redis://127.0.0.1:6379/0]
        [--restarts 3] [--rate 150] [--seconds 16] [--baseline]

1. **Recovery after a rank restart.** `recsys up --redis` under a steady 50 Recommend/s;
   rank is killed (SIGKILL), `up` starts it again; the time from rank's health turning
   SERVING to the gateway's first full (not degraded) answer, per restart. `--baseline`
   repeats it with gRPC's default reconnect backoff (1 s growing to 120 s) for comparison.
2. **SIGTERM under load.** recall, two ranks and two gateways as `recsys serve` processes
   (the gateways call `ipv4:rank-a,rank-b`, the client calls both gateways with round_robin
   and health checking, as a balancer would); an open loop at `--rate` Recommend/s; rank-a
   gets SIGTERM after 3 s and gateway-a after 8 s (each with its default 5 s shutdown delay).
   Counts failed calls by code and degraded answers by reason.
Keys go under a prefix of the run's own, deleted at the end. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from recsys.feature_store.push import push_features  # noqa: E402
from recsys.feature_store.redis_store import RedisFeatureStore  # noqa: E402
from recsys.store import ModelStore  # noqa: E402
from recsys.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.common.channels import create_channel  # noqa: E402
from tests.support.stack import free_ports, serving, start_up  # noqa: E402

USERS = [str(user) for user in range(1, 944)]
DEFAULT_BACKOFF = json.dumps(
    {"reconnect_initial_backoff_seconds": 1.0, "reconnect_max_backoff_seconds": 120.0}
)


async def recovery(args: argparse.Namespace, prefix: str, *, baseline: bool) -> list[float]:
    env = {"RECSYS_GATEWAY_CLIENT": DEFAULT_BACKOFF} if baseline else {}
    up = start_up(Path(args.store), args.redis, prefix, env=env)
    figures: list[float] = []
    try:
        await asyncio.to_thread(up.wait_serving)
        async with aio.insecure_channel(f"127.0.0.1:{up.ports['gateway']}") as channel:
            stub = gateway_pb2_grpc.RecommenderStub(channel)
            full_at: list[float] = []
            stop = asyncio.Event()

            async def load() -> None:
                index = 0
                while not stop.is_set():
                    request = gateway_pb2.RecommendRequest(
                        user_id=USERS[index % len(USERS)], count=10, dry_run=True
                    )
                    index += 1
                    try:
                        answer = await stub.Recommend(request, timeout=2)
                    except aio.AioRpcError:
                        pass
                    else:
                        if not answer.degraded_reasons:
                            full_at.append(time.monotonic())
                    await asyncio.sleep(0.02)

            running = asyncio.ensure_future(load())
            for _ in range(args.restarts):
                await asyncio.sleep(2.0)
                restarts = sum("SERVING again" in line for line in up.stderr)
                os.kill(up.pids()["rank"] if not restarts else _restarted_pid(up), signal.SIGKILL)
                # Polling on purpose: the states are another process's, and 10 ms is the resolution.
                while not (  # noqa: ASYNC110
                    sum("SERVING again" in line for line in up.stderr) > restarts
                    and await serving(up.ports["rank"])
                ):
                    await asyncio.sleep(0.01)
                serving_at = time.monotonic()
                while not full_at or full_at[-1] < serving_at:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                figures.append(full_at[-1] - serving_at)
            stop.set()
            await running
    finally:
        up.stop()
    return figures


def _restarted_pid(up: Any) -> int:
    line = [line for line in up.stderr if "rank SERVING again" in line][-1]
    return int(line.rsplit("pid ", 1)[1].rstrip(")"))


def _serve(service: str, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", service, *flags, "--log-level", "warning"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


async def sigterm_under_load(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    recall, rank_a, rank_b, gateway_a, gateway_b = free_ports(5)
    features = RedisFeatureStore(args.redis, prefix)
    try:
        version = ModelStore(args.store).current()
        assert version is not None
        if not await features.snapshot_ready(version):
            await push_features(args.store, version, args.redis, prefix)
    finally:
        await features.close()
    common = ["--store", args.store, "--redis", args.redis, "--metrics-port", "0"]
    env_prefix = {f"RECSYS_{name}_REDIS_PREFIX": prefix for name in ("RECALL", "RANK", "GATEWAY")}
    os.environ.update(env_prefix)
    ranks = f"ipv4:127.0.0.1:{rank_a},127.0.0.1:{rank_b}"
    processes = {
        "recall": _serve("recall", *common, "--port", str(recall)),
        "rank-a": _serve("rank", *common, "--port", str(rank_a)),
        "rank-b": _serve("rank", *common, "--port", str(rank_b)),
    }
    ports = {
        "recall": recall,
        "rank-a": rank_a,
        "rank-b": rank_b,
        "gateway-a": gateway_a,
        "gateway-b": gateway_b,
    }
    for name, port in (("gateway-a", gateway_a), ("gateway-b", gateway_b)):
        processes[name] = _serve(
            "gateway",
            *common,
            "--port",
            str(port),
            "--http-port",
            "0",
            "--recall-addr",
            f"127.0.0.1:{recall}",
            "--rank-addr",
            ranks,
        )
    codes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    degraded: Counter[str] = Counter()  # degraded answers before / after the first SIGTERM
    try:
        for name, port in ports.items():
            while not await serving(port):
                if processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {processes[name].returncode}")
                await asyncio.sleep(0.2)
        channel = create_channel(f"ipv4:127.0.0.1:{gateway_a},127.0.0.1:{gateway_b}")
        stub = gateway_pb2_grpc.RecommenderStub(channel)
        await asyncio.sleep(2.0)  # every connection up, health watched

        async def one(index: int) -> None:
            request = gateway_pb2.RecommendRequest(user_id=USERS[index % len(USERS)], count=10, dry_run=True)
            try:
                answer = await stub.Recommend(request, timeout=2)
            except aio.AioRpcError as error:
                codes[error.code().name] += 1
            else:
                codes["OK"] += 1
                reasons.update(answer.degraded_reasons)
                if answer.degraded_reasons:
                    phase = "before" if index < 3.0 * args.rate else "after"
                    degraded[phase] += 1

        loop = asyncio.get_running_loop()
        started = loop.time()
        calls: list[asyncio.Task[None]] = []
        signals = {3.0: "rank-a", 8.0: "gateway-a"}
        sent = 0
        while loop.time() - started < args.seconds:
            elapsed = loop.time() - started
            for at, name in list(signals.items()):
                if elapsed >= at:
                    processes[name].send_signal(signal.SIGTERM)
                    del signals[at]
            calls.append(asyncio.ensure_future(one(sent)))
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / args.rate - loop.time()))
        await asyncio.gather(*calls)
        await channel.close()
        exits = {name: processes[name].wait(30) for name in ("rank-a", "gateway-a")}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    failed = sum(count for code, count in codes.items() if code != "OK")
    return {
        "rate": args.rate,
        "calls": sent,
        "failed": failed,
        "codes": dict(codes),
        "degraded_answers_before_sigterm": degraded["before"],
        "degraded_answers_after_sigterm": degraded["after"],
        "degraded_reasons": dict(reasons),
        "exit_status": exits,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--seconds", type=float, default=16.0)
    parser.add_argument("--baseline", action="store_true", help="also measure with gRPC's default backoff")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--skip-sigterm", action="store_true")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {}
    try:
        if not args.skip_recovery:
            result["recovery_seconds"] = await recovery(args, prefix, baseline=False)
            print(f"recovery after a rank restart: {result['recovery_seconds']}", flush=True)
            if args.baseline:
                result["recovery_seconds_default_backoff"] = await recovery(args, prefix, baseline=True)
                print(
                    f"  with gRPC's default backoff: {result['recovery_seconds_default_backoff']}", flush=True
                )
        if not args.skip_sigterm:
            result["sigterm"] = await sigterm_under_load(args, prefix)
            print(f"SIGTERM under load: {result['sigterm']}", flush=True)
    finally:
        client = Redis.from_url(args.redis)
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.unlink(*keys[start : start + 500])
        await client.aclose()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
