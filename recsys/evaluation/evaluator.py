"""Offline evaluation of a model version with the serving stages.

Protocol: relevant items = all of a user's held-out items; every method ranks the full
catalogue minus the user's training items; recall@K = hits / min(K, |held-out|). Channels
are evaluated alone, merged (the merged list truncated to the same K), as the whole
pipeline (merged recall → ranker → top 10), and as served (a scene's recall → pre-rank →
ranker → rerank → top 10, with diversity), side by side with popularity and EASE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import CoreArtifacts, FloatArray, IntArray
from recsys.evaluation.diversity import distinct_categories, intra_list_diversity
from recsys.evaluation.ease import CatalogueEase
from recsys.evaluation.metrics import auc, mean_metrics, ndcg_at_k, recall_at_k
from recsys.scenes import DEFAULT_SCENE, Scene
from recsys.serving_model import ServingModel
from recsys.stages.merge import MergedCandidates, WeightedMerge
from recsys.stages.prerank import EmbeddingPreRanker
from recsys.stages.query import UserQuery, liked_mask
from recsys.stages.sources import Candidates, NeighborSource

KS = (10, 50, 100, 200)
WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class HeldOut:
    users: IntArray  # user indexes, one per evaluated user
    relevant: list[IntArray]  # each user's held-out item indexes

    @classmethod
    def from_pairs(cls, user: npt.NDArray[Any], item: npt.NDArray[Any]) -> HeldOut:
        order = np.lexsort((item, user))
        user, item = user[order], item[order]
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        ends = np.r_[starts[1:], user.shape[0]]
        return cls(
            users=user[starts].astype(np.int32),
            relevant=[item[s:e].astype(np.int32) for s, e in zip(starts, ends, strict=True)],
        )

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def sample(self, size: int, seed: int = 0) -> HeldOut:
        """A seeded subset of `size` users (all of them when there are fewer)."""
        if len(self) <= size:
            return self
        return self.take(sample_positions(len(self), size, seed))

    def take(self, positions: npt.NDArray[np.intp]) -> HeldOut:
        return HeldOut(self.users[positions], [self.relevant[i] for i in positions])


def sample_positions(count: int, size: int, seed: int) -> npt.NDArray[np.intp]:
    """`size` of `range(count)`, seeded, in increasing order."""
    chosen = np.random.default_rng(seed).choice(count, size=size, replace=False)
    ordered: npt.NDArray[np.intp] = np.sort(chosen)
    return ordered


@dataclass(frozen=True)
class ChannelRun:
    queries: list[UserQuery]
    lists: dict[str, list[Candidates]]  # channel → one list per held-out user
    depth: int = max(KS)  # each list's most items


def run_channels(
    model: ServingModel,
    heldout: HeldOut,
    depth: int = max(KS),
    recent_limit: int | None = None,
    channels: Sequence[str] | None = None,
) -> ChannelRun:
    """Each channel's top-`depth` list for each held-out user, from the stored histories."""
    limit = recent_limit or model.defaults.recent_items
    queries = [model.query(int(user)) for user in heldout.users]
    if limit != model.defaults.recent_items:
        tails = [_tail(model, int(user), limit) for user in heldout.users]
        queries = [
            dataclasses.replace(query, recent_items=items, recent_liked=liked)
            for query, (items, liked) in zip(queries, tails, strict=True)
        ]
    names = model.channels if channels is None else tuple(channels)
    if "two_tower" in names:
        embeddings = model.user_embeddings(
            [model.user_inputs(query, *full_history(model, query)) for query in queries]
        )
        queries = [
            dataclasses.replace(query, embedding=vector)
            for query, vector in zip(queries, embeddings, strict=True)
        ]
    lists = {name: [model.sources[name].candidates(query, depth) for query in queries] for name in names}
    return ChannelRun(queries, lists, depth)


def full_history(model: ServingModel, query: UserQuery) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """The user's whole stored history (the towers and the ranker read their own window)."""
    if query.user_index < 0:
        return query.recent_items, query.recent_liked
    return _tail(model, query.user_index, model.spec.history_length)


def _tail(model: ServingModel, user: int, limit: int) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    items = np.asarray(model.core.history.items.row(user), dtype=np.int32)[-limit:]
    ratings = np.asarray(model.core.history.ratings.row(user))[-limit:]
    return items, liked_mask(model.core.like_threshold, ratings)


def merged_candidates(
    run: ChannelRun, weights: Mapping[str, float], quotas: Mapping[str, int], budget: int
) -> list[MergedCandidates]:
    """Each user's merged recall (with provenance), as the recall service merges it."""
    names = tuple(run.lists)
    merge = WeightedMerge(names, weights)
    result = []
    for position in range(len(run.queries)):
        per_channel = {name: _cut(run.lists[name][position], quotas.get(name, budget)) for name in names}
        result.append(merge.merge(per_channel, budget))
    return result


def merged_lists(
    run: ChannelRun, weights: Mapping[str, float], quotas: Mapping[str, int], budget: int
) -> list[IntArray]:
    return [merged.items for merged in merged_candidates(run, weights, quotas, budget)]


def _cut(candidates: Candidates, quota: int) -> Candidates:
    return Candidates(candidates.items[:quota], candidates.scores[:quota])


def tune_merge(
    run: ChannelRun,
    heldout: HeldOut,
    budget: int,
    grid: Sequence[float] = WEIGHT_GRID,
    rounds: int = 2,
    max_users: int = 3000,
) -> tuple[dict[str, float], dict[str, int], float]:
    """Coordinate ascent on per-channel weights maximising merged recall@budget, then the
    quotas each channel needs: the 90th percentile (over users) of how deep into its list
    the merged top-`budget` reaches, so the services fetch no more than the merge uses.

    At most `max_users` users (a seeded sample) take part: each step re-merges every user's
    lists, and a few thousand users pin the weights down as well as fifty thousand."""
    if len(heldout) > max_users:
        keep = sample_positions(len(heldout), max_users, seed=0)
        run = ChannelRun(
            [run.queries[i] for i in keep],
            {name: [lists[i] for i in keep] for name, lists in run.lists.items()},
            run.depth,
        )
        heldout = heldout.take(keep)
    names = tuple(run.lists)
    weights = dict.fromkeys(names, 1.0)

    def objective(candidate: Mapping[str, float]) -> float:
        lists = merged_lists(run, candidate, {}, budget)
        return float(
            np.mean(
                [recall_at_k(items, rel, budget) for items, rel in zip(lists, heldout.relevant, strict=True)]
            )
        )

    best = objective(weights)
    for _ in range(rounds):
        improved = False
        for name in names:
            for value in grid:
                if value == weights[name]:
                    continue
                trial = {**weights, name: value}
                if not any(trial.values()):
                    continue
                score = objective(trial)
                if score > best + 1e-9:
                    best, weights, improved = score, trial, True
        if not improved:
            break
    merged = merged_lists(run, weights, {}, budget)
    quotas: dict[str, int] = {}
    for name in names:
        depths = []
        for position, items in enumerate(merged):
            channel_items = run.lists[name][position].items
            used = np.flatnonzero(np.isin(channel_items, items))
            depths.append(int(used.max()) + 1 if used.shape[0] else 0)
        quotas[name] = (
            int(min(budget, max(10, np.ceil(np.percentile(depths, 90))))) if weights[name] > 0 else 0
        )
    return weights, quotas, best


def ranked_candidates(
    model: ServingModel, run: ChannelRun, candidates: list[MergedCandidates]
) -> list[tuple[MergedCandidates, dict[str, FloatArray]]]:
    """Each user's candidates with the ranker's task scores, as the rank service scores them."""
    result = []
    for query, merged in zip(run.queries, candidates, strict=True):
        if len(merged) == 0:
            result.append((merged, {head: np.zeros(0, np.float32) for head in model.spec.heads}))
            continue
        inputs = model.user_inputs(query, *full_history(model, query))
        result.append((merged, model.score(inputs, merged.items, query.embedding, merged.provenance())))
    return result


def pipeline_lists(
    model: ServingModel,
    ranked: list[tuple[MergedCandidates, dict[str, FloatArray]]],
    top: int = 10,
) -> list[IntArray]:
    """Merged recall → ranker (fused with the default fusion) → the top `top` items."""
    fusion = model.default_fusion()
    result = []
    for merged, task_scores in ranked:
        if len(merged) == 0:
            result.append(merged.items)
            continue
        order = np.argsort(-fusion.fuse(task_scores), kind="stable")[:top]
        result.append(merged.items[order])
    return result


def _pipeline(
    model: ServingModel, run: ChannelRun
) -> tuple[list[tuple[MergedCandidates, dict[str, FloatArray]]], list[IntArray]]:
    """The served path over a channel run: merged candidates ranked, then the top 10."""
    candidates = merged_candidates(
        run, model.defaults.channel_weights, model.defaults.channel_quotas, model.defaults.candidate_budget
    )
    ranked = ranked_candidates(model, run, candidates)
    return ranked, pipeline_lists(model, ranked)


def pipeline_ndcg(model: ServingModel, run: ChannelRun, relevant: list[IntArray]) -> float:
    """The pipeline's NDCG@10 over `run`'s users (what the build's quality gate compares)."""
    _, final = _pipeline(model, run)
    return float(np.mean([ndcg_at_k(items, rel, 10) for items, rel in zip(final, relevant, strict=True)]))


def candidate_auc(
    ranked: list[tuple[MergedCandidates, dict[str, FloatArray]]], relevant: list[IntArray]
) -> dict[str, float]:
    """The ranker on the served task: its click AUC over recall's candidates (held-out items
    among them positive), pooled over users and averaged per user (users with a positive
    and a negative among their candidates)."""
    scores, labels, per_user = [], [], []
    for (merged, task_scores), items in zip(ranked, relevant, strict=True):
        if len(merged) == 0:
            continue
        label = np.isin(merged.items, items)
        scores.append(task_scores["click"])
        labels.append(label)
        if 0 < label.sum() < label.shape[0]:
            per_user.append(auc(task_scores["click"], label))
    if not scores:
        return {"click": float("nan"), "click_per_user": float("nan")}
    pooled = auc(np.concatenate(scores), np.concatenate(labels))
    return {"click": pooled, "click_per_user": float(np.mean(per_user)) if per_user else float("nan")}


def served_lists(
    model: ServingModel, run: ChannelRun, scene: Scene, top: int = 10
) -> tuple[list[IntArray], list[IntArray]]:
    """The served path of `scene`, as the services run it: merged recall of
    `scene.recall_candidates` → pre-rank to `scene.prerank_keep` (by the user embedding) →
    ranker with the scene's fusion → the scene's rerank with its rules → the top `top`.
    Returns (the ranker's top `top`, no rerank; the reranked `top`)."""
    quotas, weights = served_quotas_and_weights(model, scene)
    merged_all = merged_candidates(run, weights, quotas, scene.recall_candidates)
    prerank = EmbeddingPreRanker(model.item_embeddings)
    selector = scene.selector()
    catalogue = model.core.catalogue
    ranked_top, served = [], []
    for query, merged in zip(run.queries, merged_all, strict=True):
        if scene.prerank_keep and query.embedding is not None and len(merged) > scene.prerank_keep:
            kept = prerank.select(merged.items.astype(np.int64), query.embedding, scene.prerank_keep)
            merged = merged.take(np.sort(kept.positions))
        if len(merged) == 0:
            ranked_top.append(merged.items)
            served.append(merged.items)
            continue
        inputs = model.user_inputs(query, *full_history(model, query))
        scores = scene.fusion.fuse(model.score(inputs, merged.items, query.embedding, merged.provenance()))
        order = np.argsort(-scores, kind="stable")
        items, scores = merged.items[order], scores[order]
        ranked_top.append(items[:top])
        positions = selector.select(
            items,
            scores,
            np.asarray(model.item_embeddings[items], dtype=np.float32),
            np.asarray(catalogue.categories[items]),
            np.asarray(catalogue.authors[items]),
            top,
        )
        served.append(items[np.asarray(positions, dtype=np.intp)])
    return ranked_top, served


def served_quotas_and_weights(model: ServingModel, scene: Scene) -> tuple[dict[str, int], dict[str, float]]:
    """What the recall service fetches and merges for `scene`: the scene's quotas over the
    version's, and the version's weights, a channel the tuning switched off counting 0.25
    when a quota asks for it (services/recall/engine.py `_quotas`, `_weights`)."""
    quotas = {**model.defaults.channel_quotas, **scene.quotas}
    weights = {name: model.defaults.channel_weights.get(name) or 0.25 for name in quotas}
    return quotas, weights


def list_diversity(model: ServingModel, lists: list[IntArray]) -> dict[str, float]:
    """Mean over users of the list's intra-list similarity (mean pairwise cosine of the item
    embeddings), distinct categories and distinct authors."""
    catalogue = model.core.catalogue
    non_empty = [items for items in lists if items.shape[0] > 0]
    if not non_empty:
        return {}
    embeddings = np.asarray(model.item_embeddings)
    return {
        "intra_list_similarity": float(
            np.mean([1.0 - intra_list_diversity(embeddings[items]) for items in non_empty])
        ),
        "distinct_categories": float(
            np.mean([distinct_categories(np.asarray(catalogue.categories)[items]) for items in non_empty])
        ),
        "distinct_authors": float(
            np.mean([np.unique(np.asarray(catalogue.authors)[items]).shape[0] for items in non_empty])
        ),
    }


def ranker_auc(
    model: ServingModel, user: IntArray, item: IntArray, labels: Mapping[str, npt.NDArray[np.bool_]]
) -> dict[str, float]:
    """AUC per head over (user, item, label) rows: held-out positives and negatives drawn
    the same way as in training."""
    scores = {head: np.zeros(user.shape[0], np.float32) for head in labels}
    order = np.argsort(user, kind="stable")
    starts = np.flatnonzero(np.r_[True, user[order][1:] != user[order][:-1]])
    ends = np.r_[starts[1:], order.shape[0]]
    for start, end in zip(starts, ends, strict=True):
        rows = order[start:end]
        query = model.query(int(user[rows[0]]))
        inputs = model.user_inputs(query, *full_history(model, query))
        for head, values in model.score(inputs, item[rows]).items():
            if head in scores:
                scores[head][rows] = values
    return {head: auc(scores[head], np.asarray(labels[head], bool)) for head in labels}


def served_metrics(model: ServingModel, heldout: HeldOut, run: ChannelRun, scene: Scene) -> dict[str, Any]:
    """The served path (`served_lists`) beside the ranker's own top 10, with diversity, so
    the rerank's price in accuracy is visible. A scene that fetches deeper than `run` holds
    runs the channels again at its depth."""
    quotas, _ = served_quotas_and_weights(model, scene)
    depth = max(quotas.values(), default=0)
    if depth > run.depth:
        run = run_channels(model, heldout, depth=depth)
    ranked_top, served = served_lists(model, run, scene)
    relevant = heldout.relevant
    result: dict[str, Any] = {
        "scene": {
            "name": scene.name,
            "recall_candidates": scene.recall_candidates,
            "prerank_keep": scene.prerank_keep,
            "rerank": scene.rerank_method,
            "theta": scene.theta,
        }
    }
    for name, lists in (("ranker_top10", ranked_top), ("reranked_top10", served)):
        metrics = {
            "ndcg@10": float(np.mean([ndcg_at_k(i, r, 10) for i, r in zip(lists, relevant, strict=True)])),
            "recall@10": float(
                np.mean([recall_at_k(i, r, 10) for i, r in zip(lists, relevant, strict=True)])
            ),
            **list_diversity(model, lists),
        }
        result[name] = _rounded(metrics)
    return result


def evaluate(
    model: ServingModel,
    heldout: HeldOut,
    *,
    scene: Scene | None = None,
    ease_lists: list[IntArray] | None = None,
    ranker_rows: tuple[IntArray, IntArray, Mapping[str, npt.NDArray[np.bool_]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    def step(name: str) -> None:
        if progress is not None:
            progress(name)

    step("channels")
    run = run_channels(model, heldout)
    relevant = heldout.relevant
    channels = {
        name: _rounded(mean_metrics([c.items for c in lists], relevant, KS))
        for name, lists in run.lists.items()
    }
    step("merged")
    merged: dict[str, float] = {}
    for k in KS:
        lists = merged_lists(run, model.defaults.channel_weights, model.defaults.channel_quotas, k)
        metrics = mean_metrics(lists, relevant, (k,))
        merged[f"recall@{k}"] = metrics[f"recall@{k}"]
        merged[f"hit_rate@{k}"] = metrics[f"hit_rate@{k}"]
    pipeline: dict[str, float] | None = None
    if model.ranker is not None:
        step("pipeline")
        budget = model.defaults.candidate_budget
        ranked, final = _pipeline(model, run)
        pipeline = {
            "ndcg@10": float(
                np.mean([ndcg_at_k(items, rel, 10) for items, rel in zip(final, relevant, strict=True)])
            ),
            "recall@10": float(
                np.mean([recall_at_k(items, rel, 10) for items, rel in zip(final, relevant, strict=True)])
            ),
            "candidate_budget": budget,
        }
    baselines: dict[str, dict[str, float]] = {"popular": channels["popular"]}
    if ease_lists is not None:
        baselines["ease"] = _rounded(mean_metrics(ease_lists, relevant, KS))
    result: dict[str, Any] = {
        "headline": ["pipeline.ndcg@10", "merged.recall@200", "ranker.auc.click"],
        "users": len(heldout),
        "channels": channels,
        "merged": _rounded(merged),
        "baselines": baselines,
        "single_channel_top10": {name: metrics["ndcg@10"] for name, metrics in channels.items()},
    }
    if pipeline is not None:
        result["pipeline"] = _rounded(pipeline)
        step("served")
        result["served"] = served_metrics(model, heldout, run, scene or DEFAULT_SCENE)
    else:
        result["headline"] = ["merged.recall@200"]  # a retrieval-only version has no ranker
    if ranker_rows is not None:
        step("ranker")
        result["ranker"] = {"auc": _rounded(ranker_auc(model, *ranker_rows))}
    if pipeline is not None:
        # Beside it, the task the ranker is served for: ordering recall's candidates.
        result.setdefault("ranker", {})["auc_candidates"] = _rounded(candidate_auc(ranked, relevant))
    step("ablation")
    # Classic ItemCF: every item of the whole history, equally weighted, against the served
    # configuration (the last `recent_items`, weighted by recency and rating).
    classic = NeighborSource("itemcf", model.core.itemcf, decay=1.0, liked_boost=1.0)
    whole = run_channels(model, heldout, recent_limit=10_000, channels=())
    classic_recall = np.mean(
        [
            recall_at_k(classic.candidates(query, 200).items, relevant_items, 200)
            for query, relevant_items in zip(whole.queries, relevant, strict=True)
        ]
    )
    result["ablations"] = {
        "itemcf_recent_items": model.defaults.recent_items,
        "itemcf_recent": channels["itemcf"].get("recall@200", 0.0),
        "itemcf_whole_history": round(float(classic_recall), 5),
    }
    return result


def fit_ease(core: CoreArtifacts, l2: float) -> CatalogueEase:
    """EASE fitted on the version's training histories (restricted to the `MAX_DENSE`
    most-consumed items for larger catalogues)."""
    return CatalogueEase.fit(core.history.items, core.catalogue.n_items, l2)


def ease_lists(
    core: CoreArtifacts, heldout: HeldOut, l2: float, k: int, *, fitted: CatalogueEase | None = None
) -> list[IntArray]:
    """The full EASE baseline's top-k for each held-out user (every training item of the user
    scored, none returned), from `fitted` when given, else fitted now with `l2`."""
    model = fitted if fitted is not None else fit_ease(core, l2)
    history = core.history.items
    return model.top_k([np.asarray(history.row(int(user))) for user in heldout.users], k)


def _rounded(values: Mapping[str, float]) -> dict[str, Any]:
    """Five decimals; NaN (e.g. an AUC without negatives) becomes None, which JSON can carry."""
    return {
        key: (None if value != value else round(float(value), 5)) if isinstance(value, float) else value
        for key, value in values.items()
    }
