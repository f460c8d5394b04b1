"""The long fuzz: the whole stack (recall, rank, gateway with HTTP in one server process, as
`recsys up` runs them) on a store's CURRENT version, then hypothesis-generated gRPC calls
(every request message of the protos, mutated encodings, random bytes) and HTTP requests
(fuzzed messages as JSON, JSON of any shape, deep nesting, garbage, query strings, request-id
headers) from this process. Reports the codes seen, cases per second and the server process's
RSS along the run; exits 1 on any INTERNAL, UNKNOWN, HTTP 500, dropped connection, or a
server that is no longer serving or answering.

    .venv/bin/python loadtest/fuzz.py --store ./store [--grpc-cases 10000] [--http-cases 2000]
        [--redis redis://127.0.0.1:6379/0]     # the feature store in Redis (own key prefix, deleted after)

The servers run in a child process so that their memory is measured apart from hypothesis's.
The strategies are the test suite's (tests/support/fuzzing.py): the committed fuzz test runs
the same generators with a budget of seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from recsys.feature_store import FeatureStore, InProcessFeatureStore
from recsys.store import ModelStore
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.services.gateway.test_gateway import start_stack, stop_stack
from tests.support.fuzzing import (
    FAILURES,
    GATEWAY_METHODS,
    GRPC_METHODS,
    HttpCase,
    Tally,
    grpc_caller,
    grpc_case,
    http_caller,
    http_case,
)


# -- the server process -------------------------------------------------------------------------
async def serve(store_path: str, redis_url: str | None) -> None:
    """Start the stack, print its ports as one JSON line, run until stdin closes."""
    logging.basicConfig(level=logging.ERROR)  # refusals are INFO: the run would drown in them
    store = ModelStore(store_path)
    features: FeatureStore
    prefix = ""
    if redis_url:
        from recsys.artifacts import load_core
        from recsys.feature_store.push import push_core
        from recsys.feature_store.redis_store import RedisFeatureStore
        from tests.recsys.feature_store import unique_prefix

        prefix = unique_prefix()
        redis_store = RedisFeatureStore(redis_url, prefix)
        version = store.current()
        assert version is not None
        await push_core(redis_store, version, load_core(store.version_path(version)))
        features = redis_store
    else:
        features = InProcessFeatureStore()
    with tempfile.TemporaryDirectory() as tmp:
        stack = await start_stack(store, Path(tmp), features)
        try:
            ports = {
                "gateway": stack.gateway.port,
                "recall": stack.recall.port,
                "rank": stack.rank.port,
                "http": stack.gateway_app.http.port,
            }
            print(json.dumps(ports), flush=True)
            await asyncio.to_thread(sys.stdin.read)  # the parent closes it when done
        finally:
            await stop_stack(stack)
            await features.close()
            if prefix:
                from tests.recsys.feature_store import delete_prefix

                await delete_prefix(prefix, redis_url or "")


# -- the fuzzing process ------------------------------------------------------------------------
def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fuzz_grpc(addresses: dict[str, str], tally: Tally, cases: int, seed: int) -> None:
    call = grpc_caller(addresses, tally)

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(grpc_case())
    def check(case: tuple[str, bytes]) -> None:
        call(*case)  # tallied and judged at the end: one bad case must not stop the run

    check._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    check()


def fuzz_http(port: int, tally: Tally, cases: int, seed: int) -> None:
    call = http_caller(port, tally)

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(http_case())
    def check(case: HttpCase) -> None:
        call(case)

    check._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    check()


def still_serving(ports: dict[str, int]) -> tuple[bool, int]:
    """Every server's health SERVING, and the item count of a normal Recommend."""
    serving = True
    for name in ("gateway", "recall", "rank"):
        with grpc.insecure_channel(f"127.0.0.1:{ports[name]}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            serving &= answer.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{ports['gateway']}") as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)
        response = stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="196", count=5, dry_run=True), timeout=10
        )
    return serving, len(response.items)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="./store")
    parser.add_argument("--grpc-cases", type=int, default=10_000)
    parser.add_argument("--http-cases", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis", help="redis://… for the feature store (default: in-process)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.store, args.redis))
        return 0
    command = [sys.executable, __file__, "--serve", "--store", args.store]
    if args.redis:
        command += ["--redis", args.redis]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        ports: dict[str, Any] = json.loads(child.stdout.readline())
        addresses = dict.fromkeys(GATEWAY_METHODS, f"127.0.0.1:{ports['gateway']}")
        addresses["/recsys.v1.Recall/Recall"] = f"127.0.0.1:{ports['recall']}"
        for method in GRPC_METHODS:
            if method.startswith("/recsys.v1.Rank/"):
                addresses[method] = f"127.0.0.1:{ports['rank']}"
        still_serving(ports)  # warm: the first calls allocate what every later call reuses
        tally = Tally()
        rss = [("start", rss_of(child.pid))]
        half = args.grpc_cases // 2
        started = time.perf_counter()
        fuzz_grpc(addresses, tally, half, args.seed)
        rss.append((f"after {half:,} gRPC", rss_of(child.pid)))
        fuzz_grpc(addresses, tally, args.grpc_cases - half, args.seed + 1)
        grpc_seconds = time.perf_counter() - started
        rss.append((f"after {args.grpc_cases:,} gRPC", rss_of(child.pid)))
        started = time.perf_counter()
        fuzz_http(ports["http"], tally, args.http_cases, args.seed)
        http_seconds = time.perf_counter() - started
        rss.append((f"after {args.http_cases:,} HTTP", rss_of(child.pid)))
        serving, items = still_serving(ports)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    grpc_total, http_total = sum(tally.grpc.values()), sum(tally.http.values())
    bad = sum(tally.grpc[code] for code in FAILURES) + tally.http["500"] + tally.http["dropped"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"feature store: {'Redis' if args.redis else 'in-process'}")
    print()
    print("| transport | cases | cases/s | answers |")
    print("| --- | ---: | ---: | --- |")
    for name, counts, total, seconds in (
        ("gRPC", tally.grpc, grpc_total, grpc_seconds),
        ("HTTP", tally.http, http_total, http_seconds),
    ):
        answers = ", ".join(f"{code} {count:,}" for code, count in counts.most_common())
        print(f"| {name} | {total:,} | {total / seconds:,.0f} | {answers} |")
    print()
    print("server RSS: " + ", ".join(f"{label} {value / 2**20:.0f} MB" for label, value in rss))
    print(f"growth over the run: {(rss[-1][1] - rss[0][1]) / 2**20:+.1f} MB")
    print(f"still serving: {serving}; a normal Recommend after the run: {items} items")
    print(f"INTERNAL/UNKNOWN/HTTP 500/dropped: {bad}")
    for failure in tally.failures:
        print(f"  {failure}")
    return 0 if bad == 0 and serving and items == 5 and child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
