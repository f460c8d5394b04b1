"""Benchmark the recall service: p50/p99 latency and requests/s at several concurrencies,
and p99 at a fixed arrival rate, for ~1,000 candidates per call across all channels.

    python loadtest/bench_recall.py --store ./store [--seconds 10] [--workers 1] [--rate 200]

Starts `recsys serve recall` (a separate process, one worker by default) on a free loopback
port, drives it from this process with a grpc.aio client (closed loop at each concurrency,
then an open loop at `--rate` requests/s), prints a table and a final JSON line. The client
shares the machine's cores with the server: on 2 cores that costs the server throughput, so
read the figures as a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from grpc import aio

from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from recsys.v1 import recall_pb2, recall_pb2_grpc

QUOTAS = {"itemcf": 300, "swing": 300, "two_tower": 300, "geo": 100, "author": 100, "popular": 100}


def server_time(metrics_port: int) -> tuple[float, float]:
    """(total seconds, calls) of Recall handling from the server's own histogram: the
    server-side time per call, free of the load generator's share of the CPU."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = calls = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_handling_seconds_sum") and 'grpc_method="Recall"' in line:
            total = float(line.rsplit(" ", 1)[1])
        if line.startswith("grpc_server_handling_seconds_count") and 'grpc_method="Recall"' in line:
            calls = float(line.rsplit(" ", 1)[1])
    return total, calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(stub: recall_pb2_grpc.RecallStub, user: str) -> None:
    async with asyncio.timeout(120):
        while True:
            try:
                await stub.Recall(recall_pb2.RecallRequest(user_id=user), timeout=2)
                return
            except aio.AioRpcError:
                await asyncio.sleep(0.2)


def request_for(user: str, quotas: dict[str, int]) -> recall_pb2.RecallRequest:
    return recall_pb2.RecallRequest(user_id=user, quotas=quotas, max_candidates=1000)


async def closed_loop(
    stub: recall_pb2_grpc.RecallStub,
    users: list[str],
    quotas: dict[str, int],
    concurrency: int,
    seconds: float,
) -> dict[str, float]:
    latencies: list[float] = []
    candidates: list[int] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal errors
        index = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                response = await stub.Recall(request_for(users[index % len(users)], quotas), timeout=2)
                latencies.append(time.perf_counter() - started)
                candidates.append(len(response.item_indexes))
            except aio.AioRpcError:
                errors += 1
            index += concurrency

    began = time.perf_counter()
    await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
    elapsed = time.perf_counter() - began
    return summary(latencies, elapsed, errors, candidates)


async def open_loop(
    stub: recall_pb2_grpc.RecallStub, users: list[str], quotas: dict[str, int], rate: float, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    candidates: list[int] = []
    errors = 0

    async def one(user: str) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            response = await stub.Recall(request_for(user, quotas), timeout=2)
            latencies.append(time.perf_counter() - started)
            candidates.append(len(response.item_indexes))
        except aio.AioRpcError:
            errors += 1

    tasks = []
    began = time.perf_counter()
    for index in range(int(rate * seconds)):
        target = began + index / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(users[index % len(users)])))
    await asyncio.gather(*tasks)
    return summary(latencies, time.perf_counter() - began, errors, candidates)


def summary(latencies: list[float], elapsed: float, errors: int, candidates: list[int]) -> dict[str, float]:
    values = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": float(np.percentile(values, 50)) if values.size else float("nan"),
        "p99_ms": float(np.percentile(values, 99)) if values.size else float("nan"),
        "mean_candidates": float(np.mean(candidates)) if candidates else 0.0,
    }


async def run(
    args: argparse.Namespace, model: ServingModel, port: int, metrics_port: int
) -> dict[str, object]:
    users = [str(user) for user in model.core.users.user_ids[: args.users].tolist()]
    quotas = {name: value for name, value in QUOTAS.items() if name in model.channels}
    rows: list[dict[str, object]] = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = recall_pb2_grpc.RecallStub(channel)
        await wait_ready(stub, users[0])
        await closed_loop(stub, users, quotas, 8, 2.0)  # warm-up
        for concurrency in [*args.concurrency, None]:
            before = server_time(metrics_port)
            if concurrency is None:
                result = await open_loop(stub, users, quotas, args.rate, args.seconds)
                mode = f"open loop {args.rate:g}/s"
            else:
                result = await closed_loop(stub, users, quotas, concurrency, args.seconds)
                mode = f"concurrency {concurrency}"
            after = server_time(metrics_port)
            calls = after[1] - before[1]
            server_ms = (after[0] - before[0]) / calls * 1000 if calls else float("nan")
            rows.append({"mode": mode, **result, "server_mean_ms": server_ms})
    return {
        "benchmark": "bench_recall",
        "store": str(Path(args.store)),
        "version": model.version,
        "items": model.core.catalogue.n_items,
        "workers": args.workers,
        "quotas": quotas,
        "machine": f"{os.cpu_count()} cpu, {platform.machine()}, Python {platform.python_version()}",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    args = parser.parse_args()
    store = ModelStore(args.store)
    version = store.current()
    if version is None:
        raise SystemExit(f"--store: {args.store} has no current version")
    model = ServingModel.load(store.version_path(version), version=version)
    port, metrics_port = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "recsys.cli", "serve", "recall", "--store", args.store, "--port", str(port)),
        *("--metrics-port", str(metrics_port), "--workers", str(args.workers), "--log-level", "warning"),
        *("--max-in-flight", "1024"),
    ]
    # Channel deadlines are relaxed so the benchmark measures work, not cut-offs.
    server = subprocess.Popen(command, env={**os.environ, "RECSYS_RECALL_CHANNEL_TIMEOUT_MS": "200"})
    try:
        report = asyncio.run(run(args, model, port, metrics_port))
    finally:
        server.terminate()
        server.wait(30)
    print(f"recall benchmark: {report['items']:,} items, workers={report['workers']}, {report['machine']}")
    columns = ("requests", "errors", "req/s", "p50 ms", "p99 ms")
    header = f"{'mode':<20} " + " ".join(f"{name:>9}" for name in columns)
    print(header + f" {'cands':>6} {'server mean ms':>15}")
    for row in report["rows"]:  # type: ignore[attr-defined]
        print(
            f"{row['mode']:<20} {row['requests']:>9} {row['errors']:>9} {row['rps']:>9.1f}"
            f" {row['p50_ms']:>9.2f} {row['p99_ms']:>9.2f} {row['mean_candidates']:>6.0f}"
            f" {row['server_mean_ms']:>15.2f}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
