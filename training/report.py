"""The evaluation report written into each version: Markdown with tables, and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

KS = (10, 50, 100, 200)


def _plot_recall(metrics: dict[str, Any], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, values in metrics["channels"].items():
        axis.plot(KS, [values[f"recall@{k}"] for k in KS], marker="o", label=name)
    axis.plot(
        KS,
        [metrics["merged"][f"recall@{k}"] for k in KS],
        marker="s",
        linewidth=2.5,
        color="black",
        label="merged",
    )
    if "ease" in metrics["baselines"]:
        ease = metrics["baselines"]["ease"]
        axis.plot(KS, [ease[f"recall@{k}"] for k in KS], linestyle="--", label="EASE (full baseline)")
    axis.set_xlabel("K (candidates)")
    axis.set_ylabel("recall@K")
    axis.set_title("Recall by channel and merged (same budget K)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_ndcg(metrics: dict[str, Any], path: Path) -> None:
    bars = {name: values["ndcg@10"] for name, values in metrics["baselines"].items()}
    bars.update({name: values["ndcg@10"] for name, values in metrics["channels"].items()})
    highlight = "pipeline" in metrics  # a retrieval-only version has no final list
    if highlight:
        bars = {"pipeline": metrics["pipeline"]["ndcg@10"], **bars}
    names = list(bars)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colours = ["#4477aa"] * (len(names) - 1) + ["#cc3311" if highlight else "#4477aa"]
    axis.barh(names[::-1], list(bars.values())[::-1], color=colours)
    axis.set_xlabel("NDCG@10")
    axis.set_title("Final top 10: pipeline vs baselines vs single channels")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


COLD_START_LABELS = {
    "random": "random",
    "popular_by_author": "popular by author",
    "content_tower": "content tower",
    "look_alike": "look-alike",
    "merge": "merge",
}


def _plot_cold_start(cold: dict[str, Any], path: Path) -> None:
    methods = list(COLD_START_LABELS)
    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    for axis, metric in zip(axes, ("recall@50", "ndcg@10"), strict=True):
        values = [cold["methods"][name][metric] for name in methods]
        spreads = [cold["methods"][name].get(f"{metric}_std", 0.0) for name in methods]
        colours = ["#999999", "#999999", "#4477aa", "#228833", "#cc3311"]
        axis.bar(
            [COLD_START_LABELS[name] for name in methods], values, yerr=spreads, color=colours, capsize=3
        )
        axis.set_title(f"{metric} over the new items")
        axis.tick_params(axis="x", rotation=30)
        axis.grid(axis="y", alpha=0.3)
    seeds = len(cold.get("seeds", [0]))
    figure.suptitle(f"Item cold start: {cold['new_items']:,} new items, mean ± std over {seeds} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cold_start_lines(cold: dict[str, Any]) -> list[str]:
    """The report's item cold-start section (`recsys.evaluation.cold_start`'s figures)."""
    first = cold["runs"][0] if "runs" in cold else cold
    users = cold["users"] if isinstance(cold["users"], int) else min(cold["users"])
    lines = [
        "",
        "## Item cold start (new items by their metadata only)",
        "",
        f"{cold['new_items']:,} new items no part of the build saw, {cold['events']:,} ratings of them;"
        f" each method ranks the new items alone for each of {users:,} test users"
        f" (seeds {', '.join(str(seed) for seed in cold.get('seeds', [first['seed']]))}: mean ± std)."
        f" Look-alike replays a seeded {first['replay_fraction']:.0%} of the events"
        f" ({first['replayed_events']:,}; {first['items_with_look_alike_vector']:,} items get a vector),"
        " excluded from scoring. The merge's weights were chosen on"
        f" {first['validation_users']:,} validation users: {first['merge']['weights']}.",
        "",
        "| method | recall@50 | NDCG@10 | hit rate@50 |",
        "|---|---|---|---|",
    ]
    for name, label in COLD_START_LABELS.items():
        values = cold["methods"][name]
        cells = [
            f"{values[metric]:.4f} ± {values.get(f'{metric}_std', 0.0):.4f}"
            for metric in ("recall@50", "ndcg@10", "hit_rate@50")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "![item cold start](cold_start.png)"]
    return lines


def write_report(path: Path, metrics: dict[str, Any], dataset: str, notes: list[str]) -> None:
    directory = path.parent
    _plot_recall(metrics, directory / "recall.png")
    _plot_ndcg(metrics, directory / "ndcg.png")
    cold = metrics.get("item_cold_start")
    if cold:
        _plot_cold_start(cold, directory / "cold_start.png")
    lines = [f"# Evaluation: {dataset}", "", f"{metrics['users']:,} held-out users.", ""]
    lines += ["## Recall channels alone (full catalogue minus training items)", ""]
    lines += ["| channel | " + " | ".join(f"recall@{k}" for k in KS) + " | hit_rate@200 | ndcg@10 |"]
    lines += ["|---|" + "---|" * (len(KS) + 2)]
    rows = dict(metrics["channels"])
    rows["**merged**"] = {**metrics["merged"], "ndcg@10": float("nan")}
    for baseline, values in metrics["baselines"].items():
        rows[f"baseline: {baseline}"] = values
    for name, values in rows.items():
        cells = [f"{values.get(f'recall@{k}', float('nan')):.4f}" for k in KS]
        cells.append(f"{values.get('hit_rate@200', float('nan')):.4f}")
        cells.append(f"{values.get('ndcg@10', float('nan')):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Final list (merged recall → ranker → top 10)", ""]
    if "pipeline" in metrics:
        pipeline = metrics["pipeline"]
        lines += [f"- pipeline: NDCG@10 {pipeline['ndcg@10']:.4f}, recall@10 {pipeline['recall@10']:.4f}"]
    else:
        lines += ["- none: a retrieval-only version has no ranker"]
    lines += [f"- popularity: NDCG@10 {metrics['baselines']['popular']['ndcg@10']:.4f}"]
    if "ease" in metrics["baselines"]:
        lines += [f"- EASE (full scoring): NDCG@10 {metrics['baselines']['ease']['ndcg@10']:.4f}"]
    ease_channel = metrics.get("validation", {}).get("ease_channel")
    if ease_channel:
        weighting = ease_channel["weighting"]
        items = "recent items" if weighting["items"] == 0 else f"last {weighting['items']} items"
        lines += [
            f"- the `ease` channel (tuned on validation): λ={ease_channel['l2']:g},"
            f" k={ease_channel['neighbors']} neighbours per item"
            f" ({'signed' if ease_channel.get('signed') else 'positive'} weights), {items},"
            f" decay {weighting['decay']:g}, liked ×{weighting['liked_boost']:g}"
        ]
    served = metrics.get("served")
    if served:
        scene = served["scene"]
        lines += [
            "",
            f"## As served (scene `{scene['name']}`: {scene['recall_candidates']} recalled → "
            f"pre-rank {scene['prerank_keep']} → ranker → {scene['rerank']} θ={scene['theta']} → top 10)",
            "",
            "| list | NDCG@10 | recall@10 | intra-list similarity | distinct categories | distinct authors |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("ranker_top10", "reranked_top10"):
            values = served[name]
            cells = [
                f"{values.get(key, float('nan')):.4f}"
                for key in (
                    "ndcg@10",
                    "recall@10",
                    "intra_list_similarity",
                    "distinct_categories",
                    "distinct_authors",
                )
            ]
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if "ranker" in metrics:
        lines += ["", "## Ranker", ""] + [
            f"- AUC {head} (held-out positives vs popularity-sampled negatives): {value:.4f}"
            for head, value in metrics["ranker"].get("auc", {}).items()
        ]
        for name, value in metrics["ranker"].get("auc_candidates", {}).items():
            if value is not None:
                lines.append(f"- AUC {name} on recall's candidates (the served task): {value:.4f}")
    if "ann" in metrics:  # measured while building; `recsys evaluate` does not repeat it
        lines += [
            "",
            "## ANN",
            "",
            f"- hnswlib recall@100 vs exact: {metrics['ann']['recall@100_vs_exact']:.4f}",
        ]
    ablation = metrics.get("ablations", {})
    if ablation:
        lines += ["", "## Recency", ""]
        recent, whole = ablation["itemcf_recent"], ablation["itemcf_whole_history"]
        lines += [
            f"- ItemCF recall@200 from the last {ablation['itemcf_recent_items']} items: {recent:.4f};"
            f" from the whole history: {whole:.4f}"
        ]
    if cold:
        lines += cold_start_lines(cold)
    lines += ["", "## Data", ""] + [f"- {note}" for note in notes]
    lines += ["", "![recall](recall.png)", "", "![ndcg](ndcg.png)", ""]
    path.write_text("\n".join(lines))
