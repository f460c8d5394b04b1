"""Time and measure the ItemCF and Swing builds (training/cf.py) with their default caps.

    python loadtest/bench_cf_build.py --items 1000000 --interactions 10000000 --users 200000
    python loadtest/bench_cf_build.py --dataset ml-100k

The synthetic data set is generated here, seeded: item popularity is Zipf-like (the item of popularity
rank r is drawn with probability ∝ (r + 10)^-1, ranks shuffled over item ids) and user activity is
Pareto-tailed (shape 1.5, so a few users have hundreds of times the median history), with each
(user, item) pair at most once. Like weights are 1 + liked (liked with probability 0.45) and the
recency order is a random timestamp.

Each build runs in a forked child process, so its peak RSS (resource.getrusage, which includes the
interaction arrays it inherits) is its own. Prints a table, then one JSON line with the same rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import cf

ITEM_EXPONENT = 1.0
ITEM_OFFSET = 10.0
USER_SHAPE = 1.5
LIKED_SHARE = 0.45


@dataclass(frozen=True)
class Interactions:
    name: str
    user_index: np.ndarray
    item_index: np.ndarray
    like_weight: np.ndarray
    order: np.ndarray
    n_users: int
    n_items: int


def synthetic(n_users: int, n_items: int, n_interactions: int, seed: int) -> Interactions:
    if n_interactions > n_users * n_items // 4:
        raise SystemExit("--interactions: too many for --users × --items (at most a quarter of the pairs)")
    random = np.random.default_rng(seed)
    popularity = np.cumsum((np.arange(1, n_items + 1) + ITEM_OFFSET) ** -ITEM_EXPONENT)
    popularity /= popularity[-1]
    item_of_rank = random.permutation(n_items).astype(np.int64)

    activity = random.pareto(USER_SHAPE, n_users) + 1.0
    activity = np.clip(np.round(activity * n_interactions / activity.sum()), 1, n_items // 4).astype(np.int64)

    def draw_items(count: int) -> np.ndarray:
        return item_of_rank[np.searchsorted(popularity, random.random(count))]

    users = np.repeat(np.arange(n_users, dtype=np.int64), activity)
    pairs = np.unique(users * n_items + draw_items(users.size))
    user_share = activity / activity.sum()
    while pairs.size < n_interactions:  # repeated draws of popular items fall out above; top up
        extra = int((n_interactions - pairs.size) * 1.2) + 16
        more_users = random.choice(n_users, size=extra, p=user_share).astype(np.int64)
        pairs = np.union1d(pairs, more_users * n_items + draw_items(extra))
    if pairs.size > n_interactions:
        pairs = np.sort(random.choice(pairs, size=n_interactions, replace=False))
    return Interactions(
        name="synthetic",
        user_index=(pairs // n_items).astype(np.int32),
        item_index=(pairs % n_items).astype(np.int32),
        like_weight=1.0 + (random.random(pairs.size) < LIKED_SHARE),
        order=random.integers(0, 10**9, size=pairs.size),
        n_users=n_users,
        n_items=n_items,
    )


def movielens_100k() -> Interactions:
    data_dir = Path(
        os.environ.get("RECSYS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    ratings = np.loadtxt(data_dir / "ml-100k" / "u.data", dtype=np.int64)
    return Interactions(
        name="ml-100k",
        user_index=(ratings[:, 0] - 1).astype(np.int32),
        item_index=(ratings[:, 1] - 1).astype(np.int32),
        like_weight=1.0 + (ratings[:, 2] >= 4),
        order=ratings[:, 3],
        n_users=int(ratings[:, 0].max()),
        n_items=int(ratings[:, 1].max()),
    )


def current_rss_mib() -> float:
    """This process's resident memory now (Linux), or NaN where /proc is missing."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def progress_printer(index: str) -> Callable[[int, int], None]:
    started = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= 30 or done == total:
            last[0] = now
            print(f"  {index}: {done:,}/{total:,} items, {now - started:,.0f} s", file=sys.stderr, flush=True)

    return report


def build(index: str, data: Interactions, top_k: int, verbose: bool) -> dict[str, Any]:
    progress = progress_printer(index) if verbose else None
    started = time.perf_counter()
    if index == "itemcf":
        table = cf.build_itemcf(
            data.user_index,
            data.item_index,
            data.like_weight,
            data.n_users,
            data.n_items,
            top_k=top_k,
            order=data.order,
            progress=progress,
        )
        caps = f"max_items_per_user={cf.ITEMCF_MAX_ITEMS_PER_USER}"
    else:
        table = cf.build_swing(
            data.user_index,
            data.item_index,
            data.n_users,
            data.n_items,
            top_k=top_k,
            order=data.order,
            progress=progress,
        )
        caps = (
            f"max_items_per_user={cf.SWING_MAX_ITEMS_PER_USER}, "
            f"max_users_per_item={cf.SWING_MAX_USERS_PER_ITEM}"
        )
    seconds = time.perf_counter() - started
    table.validate()
    filled = table.neighbors != -1
    return {
        "index": index,
        "dataset": data.name,
        "items": data.n_items,
        "users": data.n_users,
        "interactions": int(data.user_index.size),
        "top_k": top_k,
        "caps": caps,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "items_with_neighbors": int(filled[:, 0].sum()),
        "mean_neighbors": round(float(filled.sum(axis=1).mean()), 2),
    }


def build_in_child(index: str, data: Interactions, top_k: int, verbose: bool) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        sender.send(build(index, data, top_k, verbose))

    process = context.Process(target=child)
    process.start()
    result: dict[str, Any] = receiver.recv()
    process.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=["synthetic", "ml-100k"], default="synthetic")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--which", choices=["itemcf", "swing", "both"], default="both")
    parser.add_argument("--top-k", type=int, default=cf.DEFAULT_TOP_K)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.dataset == "ml-100k":
        data = movielens_100k()
    else:
        data = synthetic(args.users, args.items, args.interactions, args.seed)
    heaviest_user = int(np.bincount(data.user_index).max())
    most_popular = int(np.bincount(data.item_index).max())
    print(
        f"{data.name}: {data.n_users:,} users, {data.n_items:,} items, {data.user_index.size:,} interactions "
        f"(heaviest user {heaviest_user:,}, most popular item {most_popular:,}); "
        f"prepared in {time.perf_counter() - started:.1f} s on {os.cpu_count()} CPUs, {platform.machine()}; "
        f"RSS before the builds {current_rss_mib():,.0f} MiB (each build's peak includes it)",
        flush=True,
    )

    indices = ["itemcf", "swing"] if args.which == "both" else [args.which]
    rows = [build_in_child(index, data, args.top_k, not args.quiet) for index in indices]

    header = ("index", "items", "interactions", "caps", "seconds", "peak RSS MiB")
    cells = [
        (
            r["index"],
            f"{r['items']:,}",
            f"{r['interactions']:,}",
            r["caps"],
            f"{r['seconds']:.1f}",
            f"{r['peak_rss_mib']:,.0f}",
        )
        for r in rows
    ]
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]
    for line in [header, tuple("-" * width for width in widths), *cells]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    print(json.dumps({"benchmark": "cf_build", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
