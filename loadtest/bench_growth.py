"""The growth table (issue 14 §5): the core artifacts' wall time and memory by log size, numpy vs Spark.

    python loadtest/bench_growth.py                      # 1M, 5M, 20M interactions; numpy and Spark local[2]
    python loadtest/bench_growth.py --sizes 100000 --timeout 10

For each size, once: a seeded synthetic data set (`training.data.synthetic`) with users and items
scaled with the interactions as in loadtest/bench_cf_build.py (10M interactions ↔ 10⁶ items,
2·10⁵ users: items = interactions / 10, users = interactions / 50), encoded and split as
`recsys build` does; the training part is written as Parquet (`spark_core.write_interactions`),
the catalogue and users beside it.

Then each engine builds the core artifacts (history, popularity, statistics, authors, ItemCF, Swing;
`CoreConfig()`'s caps) in a separate process, a cell:

- numpy: reads the Parquet into arrays, `core_builder.build_core`;
- spark: Spark (`--master`, local[2] by default) reads the Parquet itself
  (`spark_core.read_interactions`: the driver never holds the interaction table), caches it,
  `spark_core.build_core`.

Wall time is the cell's, from process start (Spark: session start and reading included); memory is
the peak of the resident set summed over the cell's whole process tree (Python, the JVM, Spark's
Python workers), sampled from /proc every 0.2 s (pages shared between processes count once per
process, so a forked worker's inherited pages are counted again). A cell past `--timeout` is
stopped and reported as "did not finish in X min"; one past `--max-gib` (or killed by the kernel)
as "killed at Y GiB". Every cell writes its core's files; where both engines finished, the
ItemCF and Swing tables are compared (items whose neighbour lists are identical, largest score
difference) and so is every other file.

Prints markdown tables for BENCHMARKS.md (with the machine and the command), then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SIZES = (1_000_000, 5_000_000, 20_000_000)
ENGINES = ("numpy", "spark")
INTERACTIONS_PER_ITEM = 10  # bench_cf_build's scale: 10M interactions ↔ 10⁶ items
INTERACTIONS_PER_USER = 50  # ... and 2·10⁵ users
SAMPLE_SECONDS = 0.2
GIB = 2**30


def scale(interactions: int) -> dict[str, int]:
    return {
        "interactions": interactions,
        "items": max(10, interactions // INTERACTIONS_PER_ITEM),
        "users": max(10, interactions // INTERACTIONS_PER_USER),
    }


# -- the data, once per size ------------------------------------------------------------------
def generate(size_dir: Path, interactions: int, seed: int) -> dict[str, Any]:
    """Generate, encode, split; write the training part as Parquet, catalogue and users beside it."""
    from training.data.synthetic import SyntheticSpec, generate_synthetic
    from training.encode import encode, holdout_split
    from training.spark_core import write_interactions

    started = time.perf_counter()
    sizes = scale(interactions)
    spec = SyntheticSpec(sizes["users"], sizes["items"], sizes["interactions"], seed=seed)
    encoded = encode(generate_synthetic(spec))
    data = encoded.interactions
    split = holdout_split(data.user, data.time if encoded.has_time else None, seed=seed)
    train = data.take(split.train)
    write_interactions(train, size_dir / "train.parquet")
    with (size_dir / "catalogue_users.pickle").open("wb") as file:
        pickle.dump((encoded.catalogue, encoded.users, encoded.like_threshold), file)
    description = {
        "spec": dataclasses.asdict(spec),
        "interactions": len(data),
        "train_interactions": len(train),
        "users": encoded.n_users,
        "items": encoded.n_items,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (size_dir / "data.json").write_text(json.dumps(description))
    return description


# -- one cell: one engine on one size, in its own process ------------------------------------
def run_cell(engine: str, size_dir: Path, out_dir: Path, master: str, spark_conf: dict[str, str]) -> None:
    from recsys.artifacts import save_core
    from training.core_builder import CoreConfig

    with (size_dir / "catalogue_users.pickle").open("rb") as file:
        catalogue, users, like_threshold = pickle.load(file)
    config = CoreConfig()
    steps: list[tuple[str, float]] = []

    def progress(name: str) -> None:
        steps.append((name, time.perf_counter()))
        print(f"{name}", file=sys.stderr, flush=True)

    progress("start")
    if engine == "numpy":
        core = _numpy_core(size_dir, catalogue, users, config, like_threshold, progress)
    else:
        core = _spark_core(size_dir, catalogue, users, config, like_threshold, progress, master, spark_conf)
    progress("save")
    save_core(core, _DirectorySink(out_dir))  # files under out_dir/core/
    progress("end")
    seconds = {name: round(steps[index + 1][1] - at, 2) for index, (name, at) in enumerate(steps[:-1])}
    (out_dir / "cell.json").write_text(json.dumps({"engine": engine, "steps": seconds}))


def _numpy_core(
    size_dir: Path,
    catalogue: Any,
    users: Any,
    config: Any,
    like_threshold: float | None,
    progress: Callable[[str], None],
) -> Any:
    import pyarrow.parquet

    from training.core_builder import build_core
    from training.encode import Interactions

    progress("read")
    table = pyarrow.parquet.read_table(size_dir / "train.parquet")
    column = {name: table.column(name).to_numpy() for name in ("user", "item", "rating", "time", "liked")}
    del table
    train = Interactions(column["user"], column["item"], column["rating"], column["time"], column["liked"])
    return build_core(train, catalogue, users, config, like_threshold, progress)


def _spark_core(
    size_dir: Path,
    catalogue: Any,
    users: Any,
    config: Any,
    like_threshold: float | None,
    progress: Callable[[str], None],
    master: str,
    spark_conf: dict[str, str],
) -> Any:
    from training import spark_cf, spark_core

    progress("session")
    spark = spark_cf.spark_session(master, app="recsys-growth", **spark_conf)
    progress("read (spark)")
    frame = spark_core.read_interactions(spark, size_dir / "train.parquet").cache()
    frame.count()
    core = spark_core.build_core(frame, catalogue, users, config, like_threshold, progress)
    frame.unpersist()
    spark.stop()
    return core


class _DirectorySink:
    def __init__(self, root: Path) -> None:
        self.root = root

    def save_array(self, relative_path: str, array: Any) -> Path:
        path = self.root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(array))
        return path

    def save_json(self, relative_path: str, data: Any) -> Path:
        path = self.root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return path


# -- measuring a cell from outside ------------------------------------------------------------
def tree_rss_bytes(root: int) -> int:
    """Resident bytes summed over `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    resident: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            statm = Path(entry.path, "statm").read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name (field 2) may hold spaces: the parent pid is the 2nd field after ")".
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        pid = int(entry.name)
        children.setdefault(parent, []).append(pid)
        resident[pid] = int(statm.split()[1]) * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += resident.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def measure(command: list[str], log: Path, timeout_s: float, max_bytes: int) -> dict[str, Any]:
    """Run `command` in its own process group; wall time, peak tree RSS, and how it ended."""
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},  # Spark's Python workers import training/
            start_new_session=True,  # its own group: a timeout stops the JVM and workers too
        )
        peak, stopped = 0, None
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            elapsed = time.perf_counter() - started
            if elapsed > timeout_s:
                stopped = "timeout"
            elif peak > max_bytes:
                stopped = "memory"
            if stopped is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 1),
        "peak_gib": round(peak / GIB, 2),
        "stopped": stopped,
        "exit": process.returncode,
    }


def outcome(cell: dict[str, Any], timeout_minutes: float) -> str:
    if cell["stopped"] == "timeout":
        return f"did not finish in {timeout_minutes:g} min"
    if cell["stopped"] == "memory":
        return f"killed at {cell['peak_gib']:.1f} GiB (over --max-gib)"
    if cell["exit"] == -signal.SIGKILL:  # not by us: the kernel's out-of-memory killer, most likely
        return f"killed at {cell['peak_gib']:.1f} GiB (SIGKILL)"
    if cell["exit"] != 0:
        return f"failed (exit {cell['exit']}, see {cell['log']})"
    return "ok"


# -- agreement between the engines ------------------------------------------------------------
def agreement(numpy_core: Path, spark_core: Path) -> dict[str, Any]:
    tables = {}
    for table in ("itemcf", "swing"):
        neighbors = [
            np.load(root / table / "neighbors.npy", mmap_mode="r") for root in (numpy_core, spark_core)
        ]
        scores = [np.load(root / table / "scores.npy", mmap_mode="r") for root in (numpy_core, spark_core)]
        same = ~(np.asarray(neighbors[0]) != np.asarray(neighbors[1])).any(axis=1)
        tables[table] = {
            "items": int(same.size),
            "items_identical": int(same.sum()),
            "max_score_difference": float(
                np.max(np.abs(np.asarray(scores[0]) - np.asarray(scores[1])), initial=0.0)
            ),
        }
    others = sorted(
        path.relative_to(numpy_core)
        for path in numpy_core.rglob("*")
        if path.is_file() and path.parts[len(numpy_core.parts)] not in ("itemcf", "swing")
    )
    verdicts = {str(path): _compare_file(numpy_core / path, spark_core / path) for path in others}
    return {
        "tables": tables,
        "other_files": len(others),
        "other_files_identical": sum(verdict == "identical" for verdict in verdicts.values()),
        "other_files_differing": [path for path, verdict in verdicts.items() if verdict == "different"],
    }


def _compare_file(expected: Path, actual: Path) -> str:
    """ "identical", "close" (float arrays within 1e-6: the test's standard) or "different"."""
    if not actual.exists():
        return "different"
    if expected.suffix != ".npy":
        return (
            "identical" if json.loads(expected.read_text()) == json.loads(actual.read_text()) else "different"
        )
    left, right = np.load(expected, mmap_mode="r"), np.load(actual, mmap_mode="r")
    if left.dtype != right.dtype or left.shape != right.shape:
        return "different"
    if np.array_equal(left, right, equal_nan=left.dtype.kind == "f"):
        return "identical"
    if left.dtype.kind == "f" and np.allclose(left, right, rtol=0, atol=1e-6, equal_nan=True):
        return "close"
    return "different"


# -- the table --------------------------------------------------------------------------------
def machine() -> str:
    model = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / GIB
    except OSError:
        memory = float("nan")
    system = f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} cpu ({model}), {memory:.0f} GiB RAM, {system}"


def memory_total_bytes() -> int:
    try:
        return int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 16 * GIB


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> None:
    print(f"machine: {machine()}; Spark master {args.master}")
    print(f"command: `{command}`")
    print()
    columns = (
        "interactions (train)",
        "users",
        "items",
        "engine",
        "wall",
        "peak RSS (process tree)",
        "result",
    )
    print("| " + " | ".join(columns) + " | steps (s) |")
    print("| --- " * (len(columns) + 1) + "|")
    for size in results:
        data = size["data"]
        for engine, cell in size["cells"].items():
            cells = [
                f"{data['train_interactions']:,}",
                f"{data['users']:,}",
                f"{data['items']:,}",
                engine if engine == "numpy" else f"spark {args.master}",
                f"{cell['seconds']:,.0f} s",
                f"{cell['peak_gib']:.2f} GiB",
                cell["result"],
                ", ".join(
                    f"{name.removesuffix(' (spark)')} {seconds:.0f}"
                    for name, seconds in cell.get("steps", {}).items()
                    if name not in ("start", "save")
                ),
            ]
            print("| " + " | ".join(cells) + " |")
    agreed = [size for size in results if size.get("agreement")]
    if agreed:
        print()
        headers = ("interactions (train)", "table", "items with identical neighbours", "max score difference")
        print("| " + " | ".join(headers) + " | other core files |")
        print("| --- | --- | --- | --- | --- |")
        for size in agreed:
            result = size["agreement"]
            differing = result["other_files_differing"]
            others = f"{result['other_files_identical']} of {result['other_files']} identical"
            others += (
                f", {len(differing)} differ: {', '.join(differing)}"
                if differing
                else ", the rest within 1e-6"
                if result["other_files_identical"] < result["other_files"]
                else ""
            )
            for table, row in result["tables"].items():
                identical = f"{row['items_identical']:,} of {row['items']:,}"
                print(
                    f"| {size['data']['train_interactions']:,} | {table} | {identical}"
                    f" | {row['max_score_difference']:.2e} | {others} |"
                )
    print(json.dumps({"benchmark": "growth", "machine": machine(), "command": command, "sizes": results}))


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(value)) for value in text.split(",") if value.strip()]
    except ValueError:
        raise SystemExit(f"--sizes: comma-separated interaction counts, got {text!r}") from None
    if not sizes or min(sizes) < 1000:
        raise SystemExit(f"--sizes: at least 1,000 interactions each, got {text!r}")
    return sizes


def parse_engines(text: str) -> list[str]:
    engines = [value.strip() for value in text.split(",") if value.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if not engines or unknown:
        raise SystemExit(f"--engines: a comma-separated subset of {','.join(ENGINES)}, got {text!r}")
    return engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default=",".join(str(size) for size in DEFAULT_SIZES), help="interactions, comma-separated"
    )
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--timeout", type=float, default=60.0, help="minutes per cell")
    parser.add_argument(
        "--max-gib",
        type=float,
        default=round(0.8 * memory_total_bytes() / GIB, 1),
        help="stop a cell whose process tree holds more (default: 80%% of this machine's RAM)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recsys-growth"))
    parser.add_argument("--master", default="local[2]", help="Spark master URL for the spark cells")
    parser.add_argument(
        "--driver-memory", default="6g", help="spark.driver.memory (in local mode, all of Spark)"
    )
    parser.add_argument("--shuffle-partitions", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    # A cell: what the parent runs in a child process.
    parser.add_argument("--cell", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spark_conf = {
        "spark.driver.memory": args.driver_memory,
        "spark.sql.shuffle.partitions": str(args.shuffle_partitions),
    }

    if args.generate is not None:
        generate(args.data, args.generate, args.seed)
        return 0
    if args.cell is not None:
        run_cell(args.cell, args.data, args.out, args.master, spark_conf)
        return 0

    sizes, engines = parse_sizes(args.sizes), parse_engines(args.engines)
    if args.timeout <= 0:
        raise SystemExit(f"--timeout: minutes, more than 0, got {args.timeout}")
    command = "python loadtest/bench_growth.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    me = [sys.executable, str(Path(__file__).resolve())]
    passed = [
        "--master",
        args.master,
        "--driver-memory",
        args.driver_memory,
        "--shuffle-partitions",
        str(args.shuffle_partitions),
        "--seed",
        str(args.seed),
    ]
    results = []
    for size in sizes:
        size_dir = args.workdir / f"{size}-seed{args.seed}"
        size_dir.mkdir(parents=True, exist_ok=True)
        if not (size_dir / "data.json").exists():  # generated once, reused by later runs
            print(f"{size:,}: generating", file=sys.stderr, flush=True)
            made = subprocess.run(
                [*me, "--generate", str(size), "--data", str(size_dir), *passed], cwd=ROOT, check=False
            )
            if made.returncode != 0:
                raise SystemExit(f"{size:,}: generating the data failed (exit {made.returncode})")
        data = json.loads((size_dir / "data.json").read_text())
        cells: dict[str, dict[str, Any]] = {}
        for engine in engines:
            out_dir = size_dir / engine
            shutil.rmtree(out_dir, ignore_errors=True)  # no stale core from an earlier run
            out_dir.mkdir()
            print(f"{size:,}: {engine}", file=sys.stderr, flush=True)
            log = out_dir / "cell.log"
            cell = measure(
                [*me, "--cell", engine, "--data", str(size_dir), "--out", str(out_dir), *passed],
                log,
                args.timeout * 60,
                int(args.max_gib * GIB),
            )
            cell["log"] = str(log)
            cell["result"] = outcome(cell, args.timeout)
            if cell["result"] == "ok":
                cell["steps"] = json.loads((out_dir / "cell.json").read_text())["steps"]
            cells[engine] = cell
            print(
                f"{size:,}: {engine}: {cell['result']}, {cell['seconds']} s, {cell['peak_gib']} GiB",
                file=sys.stderr,
                flush=True,
            )
        finished = [engine for engine in ("numpy", "spark") if cells.get(engine, {}).get("result") == "ok"]
        agreed = (
            agreement(size_dir / "numpy" / "core", size_dir / "spark" / "core")
            if len(finished) == 2
            else None
        )
        results.append({"size": size, "data": data, "cells": cells, "agreement": agreed})
    print_tables(results, args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
