"""The request path's CPU-heavy stages one by one, on a real store and real users: what each
costs per request on one thread, so that the stack's CPU per answer (bench_e2e) can be read
stage by stage.

    python loadtest/bench_hotpaths.py --store ./store [--compare-store ./other-store] [--users 200]

For each of `--users` MovieLens users (their stored history): the scene's channels (the
bench_e2e scene's quotas, over-fetched as recall does), the merge of their lists to 1,000,
the pre-rank cut to 200, the ranker's cross features and the onnxruntime run on those 200 (the
rank service's `OnnxScorer`, user tower excluded), and MMR with the default scene's rules
picking 20; the two-tower search at recall's k both exactly and through the hnswlib graph.
`--compare-store`: the same rows for a second store (e.g. an fp32 ranker beside an int8 one,
`recsys build --no-ranker-int8`), measured alternately. Prints a table (µs per request, the
median of `--rounds` rounds) and a JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recsys.ann import ExactIndex
from recsys.scenes import DEFAULT_SCENE
from recsys.serving_model import ServingModel
from recsys.stages.merge import WeightedMerge
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.query import build_query
from recsys.stages.rerank import selector_for
from services.rank.scorer import OnnxScorer, ScoreJob

QUOTAS = {"itemcf": 400, "swing": 400, "two_tower": 400, "geo": 200, "popular": 200}  # bench_e2e's
OVERFETCH = 1.5  # recall's exposure_overfetch
RECALLED, KEPT, COUNT = 1000, 200, 20


def _version(store: str) -> Path:
    root = Path(store)
    return root / (root / "CURRENT").read_text().strip()


class Prepared:
    """One user's inputs to every stage, computed once outside the timings."""

    def __init__(self, model: ServingModel, user: int) -> None:
        self.query = build_query(model.core, user, recent_limit=model.defaults.recent_items)
        self.user_inputs = model.user_inputs(self.query)
        self.embedding = model.user_embeddings([self.user_inputs])[0]
        self.query = dataclasses.replace(self.query, embedding=self.embedding)
        quotas = {**dict(model.defaults.channel_quotas), **QUOTAS}
        self.fetch = {name: int(quotas.get(name, 0) * OVERFETCH) + 10 for name in model.channels}
        self.lists = {
            name: model.sources[name].candidates(self.query, self.fetch[name])
            for name in model.channels
            if self.fetch[name] > 10
        }
        self.merge = WeightedMerge(tuple(model.channels), dict(model.defaults.channel_weights))
        self.merged = self.merge.merge(self.lists, RECALLED)
        prerank = EmbeddingPreRanker(model.item_embeddings)
        positions = prerank.keep_positions(self.merged.items.astype(np.int64), self.embedding, KEPT)
        self.kept = self.merged.take(positions)


def _timed(call: Callable[[], object], repeat: int) -> float:
    started = time.thread_time()
    for _ in range(repeat):
        call()
    return (time.thread_time() - started) / repeat * 1e6


def stages(model: ServingModel, users: list[Prepared], repeat: int) -> dict[str, float]:
    """µs per request of each stage, averaged over the users."""
    totals: dict[str, float] = {}
    for user in users:
        for name, value in _user_stages(model, user, repeat).items():
            totals[name] = totals.get(name, 0.0) + value / len(users)
    return totals


def _user_stages(model: ServingModel, user: Prepared, repeat: int) -> dict[str, float]:
    scene = DEFAULT_SCENE  # MMR, θ 0.7, window 5, its rules
    selector = selector_for(scene.rerank_method, scene.theta, scene.window, scene.rules)
    exact = ExactIndex(model.item_embeddings)
    k = int(QUOTAS["two_tower"] * OVERFETCH) + 10
    catalogue = model.core.catalogue
    scorer = OnnxScorer()
    items = user.kept.items.astype(np.int64)
    job = ScoreJob(model, user.user_inputs, items, user.embedding, provenance=user.kept.provenance())
    result: dict[str, float] = {}
    channels = [(model.sources[name], fetch) for name, fetch in user.fetch.items() if name in user.lists]
    result["channels (all, one thread)"] = _timed(
        lambda: [source.candidates(user.query, fetch) for source, fetch in channels], repeat
    )
    result["two_tower search, exact scan"] = _timed(lambda: exact.search(user.embedding, k), repeat)
    result["two_tower search, hnswlib"] = _timed(lambda: model.index.search(user.embedding, k), repeat)
    result["merge (to 1,000)"] = _timed(lambda: user.merge.merge(user.lists, RECALLED), repeat)
    prerank = EmbeddingPreRanker(model.item_embeddings)
    merged_items = user.merged.items.astype(np.int64)
    result["pre-rank cut (1,000 → 200)"] = _timed(
        lambda: prerank.keep_positions(merged_items, user.embedding, KEPT), repeat
    )
    history, weights = user.user_inputs["history"], user.user_inputs["history_weight"]
    result["cross features (200)"] = _timed(
        lambda: model.cross_features.inputs(history, weights, items, user.embedding, True), repeat
    )
    scored = [scorer.score(model, [job]) for _ in range(repeat)]
    result["ranker run (200 rows, onnxruntime)"] = (
        statistics.fmean(batch.inference_cpu_seconds for batch in scored) * 1e6
    )
    result["OnnxScorer.score (features + run)"] = _timed(lambda: scorer.score(model, [job]), repeat)
    rewards = scored[0].scores[0]["click"]
    shown = items.astype(np.int32)
    embeddings = np.asarray(model.item_embeddings[items], np.float32)
    categories, authors = np.asarray(catalogue.categories[items]), np.asarray(catalogue.authors[items])
    result["MMR + rules (200 → 20)"] = _timed(
        lambda: selector.select(shown, rewards, embeddings, categories, authors, COUNT), repeat
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument(
        "--compare-store", help="a second store measured alternately (e.g. fp32 vs int8 ranker)"
    )
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each stage per user and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    stores = [args.store] + ([args.compare_store] if args.compare_store else [])
    models = [ServingModel.load(_version(store)) for store in stores]
    prepared = []
    for model in models:
        known = [
            index for index in range(model.core.users.n_users) if len(model.core.history.items.row(index))
        ]
        prepared.append([Prepared(model, user) for user in known[: args.users]])
    rounds: list[list[dict[str, float]]] = [[] for _ in models]
    for _ in range(args.rounds):
        for index, model in enumerate(models):  # alternately: the box's drift hits both
            rounds[index].append(stages(model, prepared[index], args.repeat))
    medians = [
        {name: statistics.median(r[name] for r in per_store) for name in per_store[0]} for per_store in rounds
    ]
    print(f"bench_hotpaths: {platform.node()}, {platform.machine()}, Python {platform.python_version()}")
    header = "| stage | " + " | ".join(f"µs per request ({Path(s).name})" for s in stores)
    header += " | ratio |" if len(stores) == 2 else " |"
    print(header)
    print("| --- |" + " --- |" * (len(stores) + (1 if len(stores) == 2 else 0)))
    for name in medians[0]:
        values = [m[name] for m in medians]
        ratio = f" {values[1] / values[0]:.2f} |" if len(values) == 2 and values[0] else ""
        print(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in values) + " |" + ratio)
    print(json.dumps({"benchmark": "bench_hotpaths", "stores": stores, "stages_us": medians}))


if __name__ == "__main__":
    main()
