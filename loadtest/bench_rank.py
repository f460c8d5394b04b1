"""Benchmark the rank service: 200 candidates per call, p50/p99 and requests/s at several
concurrencies; the service's rows/s against raw onnxruntime in a tight loop on the same
model; its CPU per call beyond inference; and the same ranker run by TensorFlow in-process
(a TF-Serving-style `tf.function`) against onnxruntime at batch 1, 200 and 1,000.

    python loadtest/bench_rank.py --store ./store [--seconds 10] [--workers 1] [--no-tensorflow]

Starts `recsys serve rank` (a separate process, one worker by default) on a free loopback
port and drives it from this process with a grpc.aio client (closed loop per concurrency).
Calls carry recall's user embedding, as the gateway sends them. Server-side figures come
from the server's own metrics (rows, batch sizes, onnxruntime seconds) and its CPU time
(/proc), so they are free of the load generator's share of the CPU; the client shares the
machine's cores with the server, so read requests/s as a floor. Prints a table and a final
JSON line.

Columns: `rows/s` the service's scored rows per second and `vs raw` its ratio to onnxruntime
alone in a tight loop (batch 200, one thread); `batch` calls per onnxruntime run; `cpu µs` the
server's CPU per call; `infer µs` and `feat µs` the inference thread's CPU in onnxruntime and in
assembling inputs per call; `overhead µs` = cpu − infer (everything beyond inference), and
`excl feat` = that minus feature assembly (gRPC, protobuf, checks, hydration, batching).
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
from typing import Any

import numpy as np
from grpc import aio

from recsys.features import Inputs, ranker_inputs
from recsys.onnx_models import OnnxModel
from recsys.serving_model import ServingModel
from recsys.stages.query import liked_mask
from recsys.store import ModelStore
from recsys.v1 import rank_pb2, rank_pb2_grpc

CANDIDATES = 200
TF_BATCHES = (1, 200, 1000)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the server's side ----------------------------------------------------------------------
def scrape(metrics_port: int) -> dict[str, float]:
    """The rank metrics this benchmark reads, summed over versions."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = {
        "recsys_rank_scored_rows_total": "rows",
        "recsys_rank_batch_size_calls_sum": "batched_calls",
        "recsys_rank_batch_size_calls_count": "batches",
        "recsys_rank_inference_seconds_sum": "inference_seconds",
        "recsys_rank_feature_assembly_seconds_sum": "feature_seconds",
        "recsys_rank_queue_wait_seconds_sum": "queue_wait_seconds",
        "recsys_rank_inference_cpu_seconds_total": "inference_cpu_seconds",
        "recsys_rank_feature_assembly_cpu_seconds_total": "feature_cpu_seconds",
    }
    values = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            values[wanted[name]] += float(line.rsplit(" ", 1)[1])
        if name == "grpc_server_handling_seconds_sum" and 'grpc_method="Rank"' in line:
            values["handling_seconds"] = float(line.rsplit(" ", 1)[1])
    return values


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (the workers)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- requests -------------------------------------------------------------------------------
def user_inputs(model: ServingModel, user: int) -> Inputs:
    length = model.spec.history_length
    items = np.asarray(model.core.history.items.row(user))[-length:]
    ratings = np.asarray(model.core.history.ratings.row(user))[-length:]
    return model.user_features.inputs(user, items, liked_mask(model.core.like_threshold, ratings))


def build_requests(model: ServingModel, users: int, seed: int = 0) -> list[rank_pb2.RankRequest]:
    """One request per user: 200 random unconsumed candidates and the user-tower embedding
    recall would have sent."""
    rng = np.random.default_rng(seed)
    n_items = model.core.catalogue.n_items
    chosen = list(range(min(users, model.core.users.n_users)))
    embeddings = model.user_embeddings([user_inputs(model, user) for user in chosen])
    requests = []
    for user, embedding in zip(chosen, embeddings, strict=True):
        items = rng.choice(n_items, size=min(CANDIDATES, n_items), replace=False)
        requests.append(
            rank_pb2.RankRequest(
                user_id=str(model.core.users.user_ids[user]),
                item_indexes=items.tolist(),
                user_embedding=embedding.tolist(),
            )
        )
    return requests


async def wait_ready(stub: rank_pb2_grpc.RankStub, request: rank_pb2.RankRequest) -> None:
    async with asyncio.timeout(120):
        while True:
            try:
                await stub.Rank(request, timeout=2)
                return
            except aio.AioRpcError:
                await asyncio.sleep(0.2)


async def closed_loop(
    stub: rank_pb2_grpc.RankStub, requests: list[rank_pb2.RankRequest], concurrency: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal errors
        index = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await stub.Rank(requests[index % len(requests)], timeout=5)
                latencies.append(time.perf_counter() - started)
            except aio.AioRpcError:
                errors += 1
            index += concurrency

    began = time.perf_counter()
    await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
    elapsed = time.perf_counter() - began
    values = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "elapsed": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": float(np.percentile(values, 50)) if values.size else float("nan"),
        "p99_ms": float(np.percentile(values, 99)) if values.size else float("nan"),
    }


async def drive(
    args: argparse.Namespace, requests: list[rank_pb2.RankRequest], port: int, metrics_port: int, pid: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows: list[dict[str, Any]] = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rank_pb2_grpc.RankStub(channel)
        await wait_ready(stub, requests[0])
        await closed_loop(stub, requests, 8, 2.0)  # warm-up
        # The floor: calls with no candidates go through gRPC, the interceptor, the servicer and
        # the engine's checks, and are answered before hydration and scoring.
        empty = [rank_pb2.RankRequest(user_id=request.user_id) for request in requests]
        cpu_before = process_tree_cpu(pid)
        result = await closed_loop(stub, empty, 8, min(args.seconds, 3.0))
        floor = {
            "rps": result["rps"],
            "server_cpu_us_per_call": (process_tree_cpu(pid) - cpu_before) / max(result["requests"], 1) * 1e6,
        }
        for concurrency in args.concurrency:
            before, cpu_before = scrape(metrics_port), process_tree_cpu(pid)
            result = await closed_loop(stub, requests, concurrency, args.seconds)
            after, cpu_after = scrape(metrics_port), process_tree_cpu(pid)
            delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
            calls = max(delta["batched_calls"], 1.0)
            cpu = cpu_after - cpu_before
            rows.append(
                {
                    "concurrency": concurrency,
                    **result,
                    "service_rows_per_s": delta["rows"] / result["elapsed"],
                    "mean_batch_calls": delta["batched_calls"] / max(delta["batches"], 1.0),
                    "server_cpu_us_per_call": cpu / calls * 1e6,
                    "inference_us_per_call": delta["inference_cpu_seconds"] / calls * 1e6,
                    "features_us_per_call": delta["feature_cpu_seconds"] / calls * 1e6,
                    "overhead_us_per_call": (cpu - delta["inference_cpu_seconds"]) / calls * 1e6,
                    "overhead_excluding_features_us_per_call": (
                        cpu - delta["inference_cpu_seconds"] - delta["feature_cpu_seconds"]
                    )
                    / calls
                    * 1e6,
                    "queue_wait_us_per_call": delta["queue_wait_seconds"] / calls * 1e6,
                    "server_cpu_utilisation": cpu / result["elapsed"],
                }
            )
    return rows, floor


# -- raw onnxruntime and TensorFlow -------------------------------------------------------------
def ranker_batch(model: ServingModel, rows: int, seed: int = 0) -> Inputs:
    """`rows` candidates of one known user, with every ranker input assembled."""
    rng = np.random.default_rng(seed)
    user = user_inputs(model, 0)
    embedding = model.user_embeddings([user])[0]
    items = rng.choice(model.core.catalogue.n_items, size=rows, replace=True).astype(np.int64)
    batch = ranker_inputs(user, model.item_features.inputs(items))
    batch.update(model.cross_features.inputs(batch["history"], batch["history_weight"], items, embedding))
    return batch


def time_loop(run: Any, seconds: float, minimum: int = 20) -> float:
    """Median seconds per call of `run()` over about `seconds`."""
    run()
    timings: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at or len(timings) < minimum:
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings))


def raw_onnxruntime(model: ServingModel, seconds: float) -> dict[str, float]:
    """onnxruntime alone, one thread, a tight loop of 200-row batches: the ceiling the
    service's rows/s is compared with."""
    assert model.ranker is not None
    session = model.ranker.session
    feed = {
        name: value
        for name, value in ranker_batch(model, CANDIDATES).items()
        if name in model.ranker.input_names
    }
    outputs = list(model.ranker.output_names)
    per_batch = time_loop(lambda: session.run(outputs, feed), seconds)
    return {"batch": CANDIDATES, "ms_per_batch": per_batch * 1000, "rows_per_s": CANDIDATES / per_batch}


def tensorflow_vs_onnxruntime(
    model: ServingModel, manifest: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """The ranker's architecture built by Keras (`training.models.ranker.build_ranker` from the
    version's feature spec and training config), exported by `training.export.export_onnx`,
    then the Keras model under a `tf.function` (as TF Serving runs a SavedModel) against
    onnxruntime on the exported bytes, both on one thread, at each batch size."""
    import tensorflow as tf  # noqa: TID251 - the benchmark's TF side, never the services'

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from training.export import export_onnx
    from training.models.ranker import RankerConfig, build_ranker, serving_twin

    stored = dict(manifest.get("training_config", {}).get("ranker", {}))
    stored["expert_units"] = tuple(stored.get("expert_units", RankerConfig.expert_units))
    config = RankerConfig(
        **{key: value for key, value in stored.items() if key in RankerConfig.__dataclass_fields__}
    )
    keras_model = build_ranker(model.spec, config)
    specs = model.spec.ranker_inputs()
    onnx = OnnxModel(export_onnx(serving_twin(keras_model, model.spec, config), specs))  # as built
    signature = [tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name) for spec in specs]
    names = [spec.name for spec in specs]

    @tf.function(input_signature=signature)
    def serve(*tensors: Any) -> Any:
        return keras_model(dict(zip(names, tensors, strict=True)), training=False)

    results: list[dict[str, float]] = []
    worst = 0.0
    outputs = list(onnx.output_names)
    for rows in TF_BATCHES:
        batch = ranker_batch(model, rows, seed=rows)
        tensors = [tf.constant(batch[name]) for name in names]
        feed = {name: batch[name] for name in onnx.input_names}
        expected = {name: np.asarray(value) for name, value in serve(*tensors).items()}
        actual = dict(zip(outputs, onnx.session.run(outputs, feed), strict=True))
        worst = max(worst, *(float(np.abs(expected[name] - actual[name]).max()) for name in outputs))
        tf_seconds = time_loop(lambda tensors=tensors: serve(*tensors), seconds)
        ort_seconds = time_loop(lambda feed=feed: onnx.session.run(outputs, feed), seconds)
        results.append(
            {
                "batch": rows,
                "tensorflow_ms": tf_seconds * 1000,
                "onnxruntime_ms": ort_seconds * 1000,
                "tensorflow_rows_per_s": rows / tf_seconds,
                "onnxruntime_rows_per_s": rows / ort_seconds,
                "speedup": tf_seconds / ort_seconds,
            }
        )
    return {
        "weights": "the architecture of the stored version (its training config), freshly initialised",
        "tensorflow": tf.__version__,
        "max_abs_diff": worst,
        "rows": results,
    }


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batch-window-ms", type=float, default=None)
    parser.add_argument(
        "--raw-seconds", type=float, default=3.0, help="time per raw onnxruntime / TF measurement"
    )
    parser.add_argument("--no-tensorflow", action="store_true", help="skip the TensorFlow comparison")
    args = parser.parse_args()
    store = ModelStore(args.store)
    version = store.current()
    if version is None:
        raise SystemExit(f"--store: {args.store} has no current version")
    model = ServingModel.load(store.version_path(version), version=version)
    if model.ranker is None:
        raise SystemExit(f"--store: version {version} is retrieval-only (no ranker)")
    requests = build_requests(model, args.users)
    raw = raw_onnxruntime(model, args.raw_seconds)  # before the server starts: an idle machine

    port, metrics_port = free_port(), free_port()
    command = [
        *(sys.executable, "-m", "recsys.cli", "serve", "rank", "--store", args.store, "--port", str(port)),
        *("--metrics-port", str(metrics_port), "--workers", str(args.workers), "--log-level", "warning"),
        *("--max-in-flight", "1024"),
    ]
    if args.batch_window_ms is not None:
        command += ["--batch-window-ms", str(args.batch_window_ms)]
    server = subprocess.Popen(command)
    try:
        rows, floor = asyncio.run(drive(args, requests, port, metrics_port, server.pid))
    finally:
        server.terminate()
        server.wait(30)
    manifest = json.loads((store.version_path(version) / "manifest.json").read_text())
    tensorflow = None if args.no_tensorflow else tensorflow_vs_onnxruntime(model, manifest, args.raw_seconds)
    report: dict[str, Any] = {
        "benchmark": "bench_rank",
        "store": str(Path(args.store)),
        "version": version,
        "profile": manifest.get("training_config", {}).get("profile"),
        "items": model.core.catalogue.n_items,
        "candidates_per_call": CANDIDATES,
        "workers": args.workers,
        "machine": f"{os.cpu_count()} cpu, {platform.machine()}, Python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "raw_onnxruntime": raw,
        "empty_call_floor": floor,
        "rows": rows,
        "tensorflow_vs_onnxruntime": tensorflow,
    }
    print_table(report)
    print(json.dumps(report))


def print_table(report: dict[str, Any]) -> None:
    raw = report["raw_onnxruntime"]
    print(
        f"rank benchmark: {report['items']:,} items, {report['candidates_per_call']} candidates/call,"
        f" workers={report['workers']}, {report['machine']}"
    )
    print(
        f"{'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'rows/s':>8} {'vs raw':>6} {'batch':>5}"
        f" {'cpu µs':>7} {'infer µs':>8} {'feat µs':>7} {'overhead µs':>11} {'excl feat':>9}"
    )
    for row in report["rows"]:
        print(
            f"{row['concurrency']:>4} {row['rps']:>8.1f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f}"
            f" {row['service_rows_per_s']:>8.0f} {row['service_rows_per_s'] / raw['rows_per_s']:>6.2f}"
            f" {row['mean_batch_calls']:>5.1f} {row['server_cpu_us_per_call']:>7.0f}"
            f" {row['inference_us_per_call']:>8.0f} {row['features_us_per_call']:>7.0f}"
            f" {row['overhead_us_per_call']:>11.0f} {row['overhead_excluding_features_us_per_call']:>9.0f}"
        )
    floor = report["empty_call_floor"]
    print(
        f"empty call (gRPC + interceptor + checks, no scoring), concurrency 8: {floor['rps']:.0f} req/s,"
        f" {floor['server_cpu_us_per_call']:.0f} µs server CPU per call"
    )
    print(
        f"raw onnxruntime, one thread, batch {raw['batch']}: {raw['ms_per_batch']:.3f} ms,"
        f" {raw['rows_per_s']:.0f} rows/s"
    )
    tensorflow = report["tensorflow_vs_onnxruntime"]
    if tensorflow:
        print(
            f"TensorFlow {tensorflow['tensorflow']} tf.function vs onnxruntime"
            f" (one thread each; max |diff| {tensorflow['max_abs_diff']:.1e}):"
        )
        print(
            f"{'batch':>6} {'TF ms':>8} {'ORT ms':>8} {'TF rows/s':>10} {'ORT rows/s':>10} {'ORT faster':>10}"
        )
        for row in tensorflow["rows"]:
            print(
                f"{row['batch']:>6} {row['tensorflow_ms']:>8.3f} {row['onnxruntime_ms']:>8.3f}"
                f" {row['tensorflow_rows_per_s']:>10.0f} {row['onnxruntime_rows_per_s']:>10.0f}"
                f" {row['speedup']:>9.1f}×"
            )


if __name__ == "__main__":
    main()
