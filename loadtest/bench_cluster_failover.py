"""A Redis Cluster master failing under load, measured on real processes:

    python loadtest/bench_cluster_failover.py --store ./store [--callers 4] [--seconds 12]

A private cluster (three masters, three replicas on loopback, `cluster-node-timeout` 1 s,
tests/support/redis_cluster.py) gets the store's CURRENT features; `recsys up --redis
redis+cluster://…` serves on it. A closed loop of `--callers` callers, each Recommend (not a
dry run: exposures and the cache are written too) and then ReportEvents (a click on the first
item), runs for `--seconds`; after a third of them one master fails:

1. **failover**: `CLUSTER FAILOVER` on its replica (a planned switch: the master hands over);
2. **kill**: SIGKILL of the master (a crash: the replica is promoted once the others mark
   the master failed, after the node timeout).

For each: the switch's own duration, failed calls by method and code, degraded answers by
reason, how long after the switch began clients still saw a failed or degraded call, and
Recommend latency before and around it. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from grpc import aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.feature_store.push import push_features  # noqa: E402
from recsys.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from tests.support.redis_cluster import PrivateRedisCluster  # noqa: E402
from tests.support.stack import start_up  # noqa: E402

USERS = [str(user) for user in range(1, 944)]


class Calls:
    def __init__(self) -> None:
        self.records: list[tuple[float, float, str, str]] = []  # start, seconds, method, outcome
        self.details: list[str] = []  # what each failed ReportEvents said
        self.began = time.monotonic()

    def add(self, started: float, method: str, outcome: str) -> None:
        self.records.append((started, time.monotonic() - started, method, outcome))


async def caller(stub: Any, until: float, calls: Calls, seed: int) -> None:
    chooser = random.Random(seed)
    while time.monotonic() < until:
        user = chooser.choice(USERS)
        started = time.monotonic()
        try:
            answer = await stub.Recommend(gateway_pb2.RecommendRequest(user_id=user, count=10), timeout=2)
        except aio.AioRpcError as error:
            calls.add(started, "Recommend", f"failed:{error.code().name}")
            continue
        reasons = ",".join(answer.degraded_reasons)
        calls.add(started, "Recommend", f"degraded:{reasons}" if reasons else "ok")
        if not answer.items:
            continue
        event = gateway_pb2.Event(
            event_id=f"bench-{user}-{time.time_ns()}",
            user_id=user,
            item_id=answer.items[0].item_id,
            type=gateway_pb2.EVENT_TYPE_CLICK,
        )
        started = time.monotonic()
        try:
            await stub.ReportEvents(gateway_pb2.ReportEventsRequest(events=[event]), timeout=2)
        except aio.AioRpcError as error:
            calls.add(started, "ReportEvents", f"failed:{error.code().name}")
            calls.details.append(f"{started - calls.began:.3f} s: {error.details()}")
        else:
            calls.add(started, "ReportEvents", "ok")


def switch(cluster: PrivateRedisCluster, mode: str) -> float:
    """Fail one master over; seconds until its replica is master and the cluster is ok."""
    master = cluster.master_nodes()[0]
    started = time.monotonic()
    if mode == "failover":
        cluster.manual_failover(master)
    else:
        replica = cluster.replica_of(master)
        cluster.kill(master)
        while cluster.roles().get(replica.port) != "master":
            time.sleep(0.01)
        cluster.wait_ok()
    seconds = time.monotonic() - started
    if mode == "kill":
        cluster.restart(master)  # back as a replica, for the next mode
    return seconds


def summary(calls: Calls, switched_at: float, switch_seconds: float, mode: str) -> dict[str, Any]:
    """Figures around the switch. The window is the switch plus one second; a call is hit by
    the switch when it failed or read no features (`feature_store_unavailable`): slow cache
    channels on this busy machine degrade a few answers at any time and are counted apart."""
    records = calls.records
    window_end = switched_at + switch_seconds + 1.0

    def hit(outcome: str) -> bool:
        return outcome.startswith("failed") or "feature_store_unavailable" in outcome

    def latency(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        array = np.asarray(values) * 1000
        return {
            "p50_ms": round(float(np.percentile(array, 50)), 1),
            "p99_ms": round(float(np.percentile(array, 99)), 1),
            "max_ms": round(float(array.max()), 1),
        }

    in_window = [record for record in records if switched_at <= record[0] <= window_end]
    hits = [start for start, _, _, outcome in in_window if hit(outcome)]
    return {
        "mode": mode,
        "calls": Counter(method for _, _, method, _ in records),
        "switch_seconds": round(switch_seconds, 3),
        "failed": Counter(
            f"{method} {outcome}" for _, _, method, outcome in records if outcome.startswith("failed")
        ),
        "degraded": Counter(outcome for _, _, _, outcome in records if outcome.startswith("degraded")),
        "hit_in_window": Counter(outcome for _, _, _, outcome in in_window if hit(outcome)),
        "hit_outside_window": sum(
            hit(outcome) for start, _, _, outcome in records if not switched_at <= start <= window_end
        ),
        "failed_details": calls.details[:5],
        "switched_after_seconds": round(switched_at - calls.began, 3),
        "seen_by_clients_seconds": round(max((start - switched_at for start in hits), default=0.0), 3),
        "recommend_before": latency(
            [s for start, s, method, _ in records if method == "Recommend" and start < switched_at]
        ),
        "recommend_around_switch": latency([s for start, s, method, _ in in_window if method == "Recommend"]),
    }


async def measure(
    args: argparse.Namespace, cluster: PrivateRedisCluster, port: int, mode: str
) -> dict[str, Any]:
    calls = Calls()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)
        until = time.monotonic() + args.seconds
        running = [asyncio.ensure_future(caller(stub, until, calls, seed)) for seed in range(args.callers)]
        await asyncio.sleep(args.seconds / 3)
        switched_at = time.monotonic()
        seconds = await asyncio.to_thread(switch, cluster, mode)
        await asyncio.gather(*running)
    return summary(calls, switched_at, seconds, mode)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--modes", default="failover,kill")
    parser.add_argument("--log", type=Path, help="write the services' logs here")
    args = parser.parse_args()
    cluster = PrivateRedisCluster()
    cluster.start()
    prefix = "bench-cluster"
    try:
        report = await push_features(args.store, None, cluster.url, prefix)
        print(f"pushed {report.written} snapshots in {report.seconds:.1f} s", file=sys.stderr)
        up = start_up(Path(args.store), cluster.url, prefix)
        try:
            await asyncio.to_thread(up.wait_serving)
            for mode in args.modes.split(","):
                print(json.dumps(await measure(args, cluster, up.ports["gateway"], mode)), flush=True)
        finally:
            up.stop()
            if args.log is not None:
                args.log.write_text("\n".join(up.stderr) + "\n")
    finally:
        cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
