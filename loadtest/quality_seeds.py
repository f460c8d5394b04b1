"""Ranking quality over several seeds: `recsys build`'s evaluation, repeated with seeds
0 … N−1 (each seed sets the split and every model's initialisation and sampling), as
mean ± standard deviation. Seed 0 is what a plain `recsys build` publishes.

    python loadtest/quality_seeds.py --dataset ml-100k --seeds 3
    python loadtest/quality_seeds.py --dataset book-crossing --seeds 3 --ranker attention=din
    python loadtest/quality_seeds.py --dataset csv --interactions r.csv --user-col u --item-col i

Nothing is published. `--ranker KEY=VALUE` overrides a RankerConfig field (a variant to
compare); the variant's choice should be read off `validation ranker` (the held-out slice of
the validation users), never off the held-out test figures. Prints a markdown table for
BENCHMARKS.md and, with --json FILE, every seed's metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.commands.build import CSV_FLAGS, DATASETS, _raw


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    channels = metrics["channels"]
    best_name, best = max(channels.items(), key=lambda item: item[1]["ndcg@10"])
    ease = metrics["baselines"].get("ease", {})
    row = {
        "pipeline ndcg@10": metrics["pipeline"]["ndcg@10"],
        "best channel top-10 ndcg@10": best["ndcg@10"],
        "EASE ndcg@10": ease.get("ndcg@10", float("nan")),
        "merged recall@200": metrics["merged"]["recall@200"],
        "EASE recall@200": ease.get("recall@200", float("nan")),
        "served ndcg@10 (reranked)": metrics["served"]["reranked_top10"]["ndcg@10"],
        "served ndcg@10 (ranker, no rerank)": metrics["served"]["ranker_top10"]["ndcg@10"],
        "served intra-list similarity (reranked)": metrics["served"]["reranked_top10"].get(
            "intra_list_similarity", float("nan")
        ),
        "served intra-list similarity (ranker)": metrics["served"]["ranker_top10"].get(
            "intra_list_similarity", float("nan")
        ),
        "ranker AUC, sampled negatives": metrics["ranker"]["auc"]["click"],
        "ranker AUC on recall candidates": metrics["ranker"]["auc_candidates"]["click"],
        "validation ranker (held-out users)": metrics["validation"]["ranker"]["best"],
    }
    row["pipeline / max(EASE, best channel)"] = row["pipeline ndcg@10"] / max(
        row["EASE ndcg@10"] if row["EASE ndcg@10"] == row["EASE ndcg@10"] else 0.0,
        row["best channel top-10 ndcg@10"],
    )
    row["_best_channel"] = best_name  # type: ignore[assignment]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--profile", choices=("quick", "full"), default="full")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ranker", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="write every seed's metrics here")
    for name, (flag, kind) in CSV_FLAGS.items():
        parser.add_argument(flag, dest=f"csv_{name}", type=kind)
    args = parser.parse_args()
    args.seed = 0
    if args.seeds < 1:
        parser.error("--seeds: must be at least 1")
    from training.build import PROFILES, prepare
    from training.models.ranker import RankerConfig

    profile = PROFILES[args.profile]
    overrides: dict[str, Any] = {}
    for item in args.ranker:
        key, _, value = item.partition("=")
        if key not in RankerConfig.__dataclass_fields__:
            parser.error(f"--ranker: unknown RankerConfig field {key!r}")
        current = getattr(profile.ranker, key)
        overrides[key] = type(current)(value) if not isinstance(current, tuple) else tuple(json.loads(value))
    profile = dataclasses.replace(profile, ranker=dataclasses.replace(profile.ranker, **overrides))
    raw = _raw(args)
    rows, every = [], []
    for seed in range(args.seeds):
        started = time.perf_counter()
        candidate = prepare(raw, profile, seed=seed, quiet=True)
        rows.append(_headline(candidate.metrics))
        every.append(candidate.metrics)
        print(
            f"seed {seed}: {time.perf_counter() - started:.0f} s, pipeline ndcg@10 "
            f"{rows[-1]['pipeline ndcg@10']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    label = args.dataset if args.dataset != "csv" else f"csv {args.csv_interactions}"
    print(
        f"\n{label}, profile {args.profile}, ranker overrides {overrides or 'none'}; "
        f"{platform.node()} ({platform.processor() or platform.machine()}), "
        f"`python loadtest/quality_seeds.py {' '.join(sys.argv[1:])}`\n"
    )
    print(f"| metric | mean ± std over {args.seeds} seeds | seed 0 (the default build) | per seed |")
    print("| --- | --- | --- | --- |")
    for key in rows[0]:
        if key.startswith("_"):
            continue
        values = [float(row[key]) for row in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = " / ".join(f"{value:.4f}" for value in values)
        print(f"| {key} | {statistics.fmean(values):.4f} ± {std:.4f} | {values[0]:.4f} | {per_seed} |")
    print(f"| best single channel | {', '.join(str(row['_best_channel']) for row in rows)} | | |")
    if args.json:
        args.json.write_text(json.dumps(every, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
