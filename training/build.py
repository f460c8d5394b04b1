"""`recsys build`: raw data → a verified, versioned model store entry.

1. encode and split (held-out test part; a validation part carved from training);
2. core artifacts (CF tables, popularity, histories…) on the *fit* part (training minus
   validation) to tune the merge and EASE on validation;
3. two-tower and ranker trained on the fit part, exported to ONNX, parity-checked;
4. core artifacts rebuilt on the whole training part: what is served;
5. evaluation on the held-out part with the serving stages (`recsys.evaluation`);
6. publish: write, verify (checksums, every ONNX file loads in onnxruntime, the ANN index
   loads), then point CURRENT at it. Any failure leaves CURRENT as it was.

The towers and the ranker are trained once, on the fit part, and served with histories
from the whole training part: like a production model trained yesterday and served with
today's features. Everything stays leakage-free: nothing here sees the held-out part
except the evaluation step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.ann import ExactIndex, HnswIndex, recall_at_k
from recsys.artifacts import CoreArtifacts, Defaults, HistoryWeighting, save_core
from recsys.content import N_YEAR_BUCKETS, ContentTokens
from recsys.evaluation.cold_start import (
    COLD_START_SET,
    ColdStartSet,
    cold_start_set_to_json,
    evaluate_item_cold_start_seeds,
)
from recsys.evaluation.ease import CatalogueEase, EaseGram
from recsys.evaluation.evaluator import (
    KS,
    ChannelRun,
    HeldOut,
    ease_lists,
    evaluate,
    full_history,
    merged_candidates,
    pipeline_ndcg,
    run_channels,
    tune_merge,
)
from recsys.evaluation.metrics import mean_metrics
from recsys.features import FeatureSpec, Inputs, ItemFeatures
from recsys.onnx_models import OnnxModel
from recsys.probe import probe
from recsys.serving_model import (
    ANN_INDEX,
    DEFAULTS,
    FEATURE_SPEC,
    ITEM_EMBEDDINGS,
    ITEM_TOWER,
    RANKER,
    USER_TOWER,
    ServingModel,
    defaults_json,
)
from recsys.stages.query import build_query
from recsys.stages.sources import NeighborSource
from recsys.store.reader import ModelStore
from recsys.store.writer import VersionWriter
from training.core_builder import CoreConfig, build_core
from training.data.raw import RawData
from training.distributed import Distribution, scope
from training.encode import Encoded, Interactions, Split, encode, holdout_split
from training.examples import (
    NegativeSampler,
    SequenceRows,
    candidate_rows,
    gathered,
    select,
    sequence_rows,
    user_rows,
)
from training.export import Parity, check_parity, export_onnx
from training.models.ranker import RankerConfig, RankerTraining, build_ranker, serving_twin, train_ranker
from training.models.two_tower import (
    TwoTowerConfig,
    build_two_tower,
    detached,
    embed,
    log_sampling_probability,
    train_two_tower,
)
from training.quantise import GateDecision, quality_gate, quantise_int8
from training.report import write_report

log = logging.getLogger("recsys.build")

EASE_GRID = (50.0, 200.0, 500.0, 1000.0, 3000.0, 10000.0)
EASE_MAX_ITEMS = 20_000
# The `ease` channel serves B truncated to each item's top k positive weights (or, signed, its k
# strongest weights, negative ones included), aggregated over the user's history like ItemCF.
# k, the table and the history weighting are chosen on validation; the table and weighting
# leave positive-only with ItemCF's weighting only when another is clearly better, by more than
# EASE_WEIGHTING_MARGIN (relative) on the channel's validation recall.
EASE_NEIGHBORS_GRID = (50, 100, 200, 400)
EASE_WEIGHTINGS = (
    HistoryWeighting(),  # the version's recent items, recency-decayed, likes boosted
    HistoryWeighting(decay=1.0, liked_boost=1.0),  # the recent items, equally weighted
    HistoryWeighting(items=500, decay=1.0, liked_boost=1.0),  # (nearly) all of it, as EASE scores
)
EASE_WEIGHTING_MARGIN = 0.01


@dataclass(frozen=True)
class BuildProfile:
    name: str
    two_tower: TwoTowerConfig
    ranker: RankerConfig
    core: CoreConfig = field(default_factory=CoreConfig)
    history_length: int = 30
    candidate_budget: int = 200
    ease: bool = True
    ease_grid: tuple[float, ...] = EASE_GRID  # λ values tried
    ease_neighbors_grid: tuple[int, ...] = EASE_NEIGHBORS_GRID  # the channel's k values tried
    parity_rows: int = 2000
    # Retrieval only (the 1M-item benchmark catalogue): no ranker, no pipeline metrics, and the
    # evaluation on a seeded sample of held-out users, since scoring a million-item catalogue
    # for every user would take longer than the whole build.
    retrieval_only: bool = False
    max_eval_users: int | None = None
    # Publish an int8 (dynamically quantised) ranker if it passes the quality gate on
    # validation (`training.quantise`; else the fp32 one, and the metrics say why). On in the
    # full profile: onnxruntime runs it in 659 µs per 200 rows against 948 µs for fp32 (one
    # thread, MovieLens-100K, BENCHMARKS.md) with no loss on validation; the quick profile
    # (tests, the demo) skips the gate's extra evaluation.
    ranker_int8: bool = False


RECENT_ITEMS = 20  # history items the item-to-item channels read by default (`Defaults.recent_items`)

PROFILES = {
    "quick": BuildProfile(
        "quick",
        TwoTowerConfig(embedding_dim=32, id_dim=32, epochs=4, batch_size=512),
        RankerConfig(id_dim=16, epochs=2, expert_units=(64, 32), negatives_per_positive=3),
        # A coarser grid (each λ is a dense inversion, each k a pass over the validation users):
        # EASE adds about 5 s to a quick MovieLens build (docs: BENCHMARKS.md).
        ease_grid=(300.0, 3000.0),
        ease_neighbors_grid=(200,),
    ),
    "full": BuildProfile(
        "full",
        TwoTowerConfig(embedding_dim=64, id_dim=64, epochs=10),
        RankerConfig(epochs=10),
        ranker_int8=True,
    ),
}


def retrieval_only(profile: BuildProfile) -> BuildProfile:
    """`profile` without the ranker, EASE or the full-population evaluation, and with the
    two-tower trained in large batches for at most two epochs: on a million-item catalogue
    each step updates the whole item-id table (Adam), so the number of steps, not the number
    of rows, sets the training time; large batches also give in-batch softmax more negatives."""
    towers = dataclasses.replace(
        profile.two_tower,
        batch_size=max(profile.two_tower.batch_size, 4096),
        epochs=min(profile.two_tower.epochs, 2),
    )
    return dataclasses.replace(
        profile,
        name=f"{profile.name}+retrieval-only",
        two_tower=towers,
        retrieval_only=True,
        ease=False,
        max_eval_users=2000,
    )


class _RssSampler:
    """The process's resident set, sampled every 50 ms in a daemon thread: `ru_maxrss` only
    knows the whole run's peak, and the memory budget is set per stage (which one holds what)."""

    _STATM = Path("/proc/self/statm")

    def __init__(self, interval: float = 0.05) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._peak = self.current()
        self._lock = threading.Lock()
        if self._STATM.exists():
            # The thread holds the sampler weakly and ends once the build's stages are dropped: a
            # process that builds many times (the tests, tuning scripts) keeps no samplers behind.
            threading.Thread(
                target=_sample_rss, args=(weakref.ref(self), interval), daemon=True, name="rss"
            ).start()

    def current(self) -> int:
        try:
            return int(self._STATM.read_text().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample(self) -> None:
        rss = self.current()
        with self._lock:
            self._peak = max(self._peak, rss)

    def take_peak(self) -> int:
        """The peak since the last call, then restart from the current size."""
        rss = self.current()
        with self._lock:
            peak, self._peak = max(self._peak, rss), rss
        return peak


def _sample_rss(sampler: weakref.ref[_RssSampler], interval: float) -> None:
    while True:
        time.sleep(interval)
        live = sampler()
        if live is None:
            return
        live.sample()
        del live


class Stages:
    """Prints each stage with its duration and peak resident memory (stderr), and keeps both for
    the summary and the version's build report."""

    def __init__(self, quiet: bool = False) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self._quiet = quiet
        self._current: tuple[str, float] | None = None
        self._rss = _RssSampler()

    def start(self, name: str) -> None:
        self.finish()
        self._rss.take_peak()
        self._current = (name, time.perf_counter())
        if not self._quiet:
            print(f"▸ {name} …", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self._current is not None:
            name, started = self._current
            self.timings[name] = time.perf_counter() - started
            self.peak_rss[name] = self._rss.take_peak()
            if not self._quiet:
                print(
                    f"  {name}: {self.timings[name]:.1f} s, peak RSS {self.peak_rss[name] / 2**30:.2f} GiB",
                    file=sys.stderr,
                    flush=True,
                )
            self._current = None

    def note(self, text: str) -> None:
        if not self._quiet:
            print(f"  {text}", file=sys.stderr, flush=True)


@dataclass
class BuildResult:
    version: str
    path: Path
    metrics: dict[str, Any]
    timings: dict[str, float]
    sizes: dict[str, int]
    notes: list[str]
    peak_rss: dict[str, int] = field(default_factory=dict)


def _spec(encoded: Encoded, profile: BuildProfile) -> FeatureSpec:
    heads = ("click", "like") if encoded.capabilities.get("rating") else ("click",)
    spec = FeatureSpec(
        n_user_tokens=encoded.n_users + 1,
        n_item_tokens=encoded.n_items + 1,
        n_category_tokens=int(encoded.catalogue.category_vocab.shape[0]) + 1,
        n_author_tokens=int(encoded.catalogue.author_vocab.shape[0]) + 1,
        n_region_tokens=int(encoded.users.region_vocab.shape[0]) + 1,
        history_length=profile.history_length,
        max_categories=int(encoded.catalogue.categories.shape[1]),
        user_stat_names=("log_interactions", "mean_rating", "like_rate"),
        item_stat_names=("log_interactions", "mean_rating", "like_rate", "log_popularity"),
        embedding_dim=profile.two_tower.embedding_dim,
        heads=heads,
    )
    config = profile.two_tower
    if config.title_buckets <= 0:  # the profile turns the content inputs off
        return spec
    return dataclasses.replace(
        spec,
        n_publisher_buckets=config.publisher_buckets,
        n_title_buckets=config.title_buckets,
        max_title_tokens=config.max_title_tokens,
        n_year_buckets=N_YEAR_BUCKETS,
    )


def item_content(encoded: Encoded, spec: FeatureSpec) -> ContentTokens | None:
    """The content inputs of every item of the version, from its metadata (None without)."""
    if not spec.has_content:
        return None
    catalogue = encoded.catalogue
    publishers = encoded.publishers if encoded.publishers.shape[0] else np.full(catalogue.n_items, "")
    return ContentTokens.of(
        spec, catalogue.titles.tolist(), publishers.tolist(), catalogue.item_time.astype(np.float64)
    )


@dataclass
class Trained:
    user_tower: bytes
    item_tower: bytes
    ranker: bytes | None
    item_embeddings: np.ndarray
    index: HnswIndex
    parity: dict[str, Parity]
    losses: dict[str, list[float]]
    ann_recall_at_100: float


def _train_towers(
    encoded: Encoded,
    train: Interactions,
    validation_rows: np.ndarray,
    core_fit: CoreArtifacts,
    spec: FeatureSpec,
    profile: BuildProfile,
    stages: Stages,
    distribution: Distribution | None = None,
) -> Trained | None:
    """The two towers on the fit part, exported with parity, and the item embeddings' ANN
    index (the ranker comes later, on recall's candidates: `_train_ranker`).

    On a worker other than the chief of a multi-worker build: None after training when no
    ranker follows; else the export, embeddings and index the ranker's rows come from (the
    chief's, bit for bit), without the parity check and the ANN probe, which only the
    published version needs."""
    stages.start("two-tower: train")
    all_rows = sequence_rows(train, spec)
    in_validation = np.isin(all_rows.order, validation_rows)
    rows: SequenceRows = select(all_rows, ~in_validation)
    users = user_rows(rows, core_fit.users.regions, core_fit.statistics.user_stats)
    items = ItemFeatures(core_fit.catalogue, core_fit.statistics)
    with scope(distribution):
        towers = build_two_tower(spec, profile.two_tower)
    tower_users = {name: users[name] for name in ("user_id", "region", "history", "history_weight")}
    content = item_content(encoded, spec)

    def item_inputs(indexes: np.ndarray) -> Inputs:
        inputs = items.inputs(indexes, with_stats=False)
        if content is not None:
            inputs.update(content.take(indexes).inputs())
        return inputs

    # Each row's item features are gathered per batch, not copied per interaction.
    tower_items = gathered(item_inputs, rows.item)
    losses = {
        "two_tower": train_two_tower(
            towers,
            tower_users,
            tower_items,
            log_sampling_probability(rows.item.astype(np.int64) + 1),
            progress=lambda epoch, loss: stages.note(f"epoch {epoch + 1}: loss {loss:.4f}"),
            distribution=distribution,
        )
    }
    chief = distribution is None or distribution.is_chief
    if distribution is not None:
        towers = detached(towers, spec)
        if not chief and profile.retrieval_only:
            return None
    stages.start("two-tower: export + parity" if chief else "two-tower: export")
    sample = np.random.default_rng(profile.two_tower.seed).choice(
        rows.user.shape[0], size=min(profile.parity_rows, rows.user.shape[0]), replace=False
    )
    parity_users = {name: value[sample] for name, value in tower_users.items()}
    parity_items = {name: value[sample] for name, value in tower_items.items()}
    # Half of the rows as new items (item token 0): the tower's other use, proven as well.
    parity_items["item_id"] = np.where(np.arange(sample.shape[0]) % 2 == 0, parity_items["item_id"], 0)
    user_onnx = export_onnx(towers.user_model, spec.user_tower_inputs())
    item_onnx = export_onnx(towers.item_model, spec.item_tower_inputs())
    parity = (
        {
            "user_tower": check_parity(towers.user_model, user_onnx, parity_users),
            "item_tower": check_parity(towers.item_model, item_onnx, parity_items),
        }
        if chief
        else {}
    )
    stages.start("two-tower: item embeddings + ANN index")
    all_items = items.inputs(np.arange(encoded.n_items), with_stats=False)
    if content is not None:
        all_items.update(content.inputs())
    # Embeddings come from the exported item tower: the path a new item takes later.
    item_model = OnnxModel(item_onnx, threads=2)
    embeddings = np.concatenate(
        [
            item_model.run({name: value[start : start + 8192] for name, value in all_items.items()})[
                "item_embedding"
            ]
            for start in range(0, encoded.n_items, 8192)
        ]
    ).astype(np.float32)
    # One thread when several workers build it: HNSW's parallel inserts depend on thread timing,
    # and every worker must find the same two-tower candidates for the ranker's rows.
    index = HnswIndex.build(embeddings, threads=2 if distribution is None else 1)
    if not chief:
        return Trained(user_onnx, item_onnx, None, embeddings, index, parity, losses, math.nan)
    probe = embed(
        towers.user_model,
        {name: value[sample[:500]] for name, value in tower_users.items()},
        "user_embedding",
    )
    k = min(100, encoded.n_items)
    ann_recall = recall_at_k(index.search_many(probe, k), ExactIndex(embeddings).search_many(probe, k))
    stages.note(f"ANN recall@{k} vs exact: {ann_recall:.4f}")
    return Trained(user_onnx, item_onnx, None, embeddings, index, parity, losses, ann_recall)


def _train_ranker(
    fit_model: ServingModel,
    run: ChannelRun,
    weights: dict[str, float],
    quotas: dict[str, int],
    validation: Interactions,
    train: Interactions,
    n_items: int,
    profile: BuildProfile,
    stages: Stages,
    distribution: Distribution | None = None,
) -> tuple[bytes, Parity, RankerTraining, dict[str, int], RankerRowIndex] | None:
    """The ranker on the validation period (the next period after the fit part), over the
    candidates the served recall produces from fit-part artifacts with the version's merge
    weights and quotas: features from the past, labels from the future, rows from exactly
    the lists the services will ask it to order. (Cross features computed on the same period
    as the labels would leak the label into the CF tables and teach the ranker to over-trust
    them.)

    None on a worker other than the chief of a multi-worker build, after the last training
    step: the export and its parity check are the published version's."""
    spec, config = fit_model.spec, profile.ranker
    stages.start("ranker: rows from recall's candidates")
    merged = merged_candidates(run, weights, quotas, profile.candidate_budget)
    merged_users = {
        int(query.user_index): candidates.items for query, candidates in zip(run.queries, merged, strict=True)
    }
    sampler = NegativeSampler(
        train.user, train.item, n_items, seed=config.seed, exponent=config.negative_exponent
    )
    rows = candidate_rows(
        fit_model,
        run.queries,
        [full_history(fit_model, query) for query in run.queries],
        merged,
        validation,
        sampler,
        max_negatives=config.candidate_negatives,
        random_negatives=config.random_negatives,
        seed=config.seed,
    )
    counts = {
        "users": rows.users,
        "rows": int(rows.group.shape[0]),
        "positives": int(rows.labels["click"].sum()),
        "candidates_seen": rows.candidates,
    }
    stages.note(f"{counts['rows']:,} rows over {rows.users:,} users, {counts['positives']:,} positives")
    labels = {head: rows.labels[head] for head in spec.heads}
    stages.start("ranker: train")
    with scope(distribution):
        ranker = build_ranker(spec, config)
    training = train_ranker(
        ranker,
        rows.inputs,
        labels,
        config,
        group=rows.group,
        progress=lambda epoch, loss: stages.note(f"epoch {epoch + 1}: loss {loss:.4f}"),
        distribution=distribution,
    )
    stages.note(f"held-out users' {training.metric} per epoch: {[round(v, 4) for v in training.validation]}")
    if distribution is not None and not distribution.is_chief:
        return None
    stages.start("ranker: export + parity")
    # The twin in the exported formulation; parity is checked against the trained model itself.
    ranker_onnx = export_onnx(serving_twin(ranker, spec, config), spec.ranker_inputs())
    size = rows.inputs["item_id"].shape[0]
    sample = np.random.default_rng(1).choice(size, size=min(profile.parity_rows, size), replace=False)
    parity = check_parity(ranker, ranker_onnx, {name: value[sample] for name, value in rows.inputs.items()})
    index = RankerRowIndex(rows.user, rows.item, rows.labels["click"], rows.from_recall, merged_users)
    return ranker_onnx, parity, training, counts, index


def _serving_model(
    version: str, spec: FeatureSpec, core: CoreArtifacts, trained: Trained, defaults: Defaults
) -> ServingModel:
    return ServingModel(
        version=version,
        spec=spec,
        core=core,
        user_tower=OnnxModel(trained.user_tower),
        item_embeddings=trained.item_embeddings,
        index=trained.index,
        ranker=None if trained.ranker is None else OnnxModel(trained.ranker),
        defaults=defaults,
        item_tower=OnnxModel(trained.item_tower),
    )


def _gate_int8(
    fit_model: ServingModel, defaults: Defaults, run: ChannelRun, validation: HeldOut, fp32: bytes
) -> GateDecision:
    """The int8 ranker against the fp32 one it came from, each serving the fit part's
    pipeline (tuned merge, same candidates) for the validation users."""
    tuned = dataclasses.replace(fit_model, defaults=defaults)

    def score(ranker: bytes) -> float:
        return pipeline_ndcg(dataclasses.replace(tuned, ranker=OnnxModel(ranker)), run, validation.relevant)

    return quality_gate(fp32, quantise_int8(fp32), "int8", score)


def _ranker_eval_rows(
    encoded: Encoded, train: Interactions, test: Interactions, seed: int, config: RankerConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Held-out positives and negatives drawn as in training (training popularity to the same
    exponent), never consumed in training or held out."""
    consumed_user = np.concatenate([train.user, test.user])
    consumed_item = np.concatenate([train.item, test.item])
    sampler = NegativeSampler(
        consumed_user,
        consumed_item,
        encoded.n_items,
        seed=seed + 7,
        exponent=config.negative_exponent,
        popularity_items=train.item,
    )
    negatives = config.negatives_per_positive
    rows, items = sampler.sample(test.user, negatives)
    user = np.concatenate([test.user, test.user[rows]]).astype(np.int32)
    item = np.concatenate([test.item, items]).astype(np.int32)
    click = np.zeros(user.shape[0], bool)
    click[: test.user.shape[0]] = True
    like = click & np.concatenate([test.liked, np.zeros(rows.shape[0], bool)])
    return user, item, {"click": click, "like": like}


@dataclass(frozen=True)
class RankerRowIndex:
    """Which (user, item) pairs the ranker trained on, for the leakage test."""

    user: np.ndarray
    item: np.ndarray
    click: np.ndarray
    from_recall: np.ndarray  # one of recall's candidates for the user (else a random negative)
    candidates: dict[int, np.ndarray]  # user → recall's merged candidates from the fit part


@dataclass(frozen=True)
class EaseChannel:
    """The `ease` channel's settings chosen on validation, with the validation figures."""

    l2: float
    neighbors: int
    signed: bool  # the table keeps each item's strongest weights, negative ones too
    weighting: HistoryWeighting
    validation_recall: dict[str, float]  # "k=…, table, weighting" → the channel's recall@budget

    def to_json(self) -> dict[str, Any]:
        return {
            "l2": self.l2,
            "neighbors": self.neighbors,
            "signed": self.signed,
            "weighting": dataclasses.asdict(self.weighting),
            "validation_recall": self.validation_recall,
        }


def tune_ease(
    core_fit: CoreArtifacts,
    validation: HeldOut,
    profile: BuildProfile,
    recent_items: int,
    stages: Stages,
) -> tuple[CatalogueEase, EaseChannel]:
    """λ by the full EASE baseline's validation recall@max(KS) (one Gram matrix, one fit per λ),
    then, with the best λ's B, the channel's table (positive weights only, or signed), k and
    history weighting by its own validation recall@`budget`: everything on the fit part and the
    validation split. The variant (table, weighting) stays the first one, ItemCF's, unless
    another is better by more than EASE_WEIGHTING_MARGIN; k is the best for the variant."""
    budget = profile.candidate_budget
    gram = EaseGram.of(core_fit.history.items, core_fit.catalogue.n_items)
    best_score, best = -1.0, None
    for l2 in profile.ease_grid:
        fitted = gram.fit(l2)
        lists = ease_lists(core_fit, validation, l2, max(KS), fitted=fitted)
        score = mean_metrics(lists, validation.relevant, (max(KS),))[f"recall@{max(KS)}"]
        stages.note(f"λ={l2:g}: validation recall@{max(KS)} {score:.4f}")
        if score > best_score:
            best_score, best = score, fitted
        del fitted
    del gram
    assert best is not None
    queries = [build_query(core_fit, int(user), recent_limit=recent_items) for user in validation.users]
    # Negative weights matter when the whole history is scored, as full EASE does; over a few
    # recent items they never won on validation (MovieLens, Book-Crossing, a CSV), so a signed
    # table is tried with the whole-history weighting only (each variant is a validation pass).
    variants = [(False, weighting) for weighting in EASE_WEIGHTINGS] + [(True, EASE_WEIGHTINGS[-1])]
    recall: dict[tuple[int, bool, HistoryWeighting], float] = {}
    for k in profile.ease_neighbors_grid:
        for signed in (False, True):
            table = best.neighbor_table(k, signed=signed)
            for weighting in (weights for sign, weights in variants if sign == signed):
                source = NeighborSource(
                    "ease",
                    table,
                    decay=weighting.decay,
                    liked_boost=weighting.liked_boost,
                    history_items=weighting.items,
                )
                lists = [source.candidates(query, budget).items for query in queries]
                recall[k, signed, weighting] = mean_metrics(lists, validation.relevant, (budget,))[
                    f"recall@{budget}"
                ]
    # The best k of each variant (ties: the smaller k).
    best_k = {
        variant: max(profile.ease_neighbors_grid, key=lambda k: (recall[(k, *variant)], -k))
        for variant in variants
    }

    def best_recall(variant: tuple[bool, HistoryWeighting]) -> float:
        return recall[(best_k[variant], *variant)]

    chosen = variants[0]
    for variant in variants[1:]:
        if best_recall(variant) > best_recall(chosen) * (1 + EASE_WEIGHTING_MARGIN):
            chosen = variant
    labels = {
        f"k={k}, {'signed' if signed else 'positive'}, {_weighting_label(weighting)}": round(value, 5)
        for (k, signed, weighting), value in recall.items()
    }
    for label, value in labels.items():
        stages.note(f"ease channel {label}: validation recall@{budget} {value:.4f}")
    signed, weighting = chosen
    channel = EaseChannel(best.l2, best_k[chosen], signed, weighting, labels)
    stages.note(
        f"ease channel: λ={channel.l2:g}, k={channel.neighbors},"
        f" {'signed' if signed else 'positive'} weights, {_weighting_label(weighting)}"
    )
    return best, channel


def _weighting_label(weighting: HistoryWeighting) -> str:
    items = "recent items" if weighting.items == 0 else f"last {weighting.items} items"
    return f"{items}, decay {weighting.decay:g}, liked ×{weighting.liked_boost:g}"


@dataclass
class Candidate:
    """A trained and evaluated version, not yet in any store."""

    encoded: Encoded
    spec: FeatureSpec
    core: CoreArtifacts
    trained: Trained
    defaults: Defaults
    metrics: dict[str, Any]
    heldout_user: np.ndarray
    heldout_item: np.ndarray
    ranker_eval: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None
    training_config: dict[str, Any]
    ease_l2: float | None
    ease_channel: EaseChannel | None
    notes: list[str]
    stages: Stages
    channels: tuple[str, ...]
    ranker_rows: RankerRowIndex | None = None  # what the ranker trained on (in memory only)
    cold_start: ColdStartSet | None = None  # the item cold-start set evaluated (stored with it)


def prepare(
    raw: RawData,
    profile: BuildProfile,
    *,
    seed: int = 0,
    quiet: bool = False,
    cold_start: ColdStartSet | None = None,
    distribution: Distribution | None = None,
) -> Candidate | None:
    """Everything but publishing: split, train, export with parity, evaluate. `seed` sets the
    split and every model's initialisation and sampling (offset from the profile's own).
    `cold_start`: new items no part of the build saw (Book-Crossing's NewBooks) for the item
    cold-start evaluation (`recsys.evaluation.cold_start`), after the main one.

    `distribution`: a multi-worker build (`training.distributed`), every worker running this
    on the same data. The towers and the ranker train across the workers; the chief does
    everything else and returns the candidate. The other workers return None after their
    last training step (the towers' with --retrieval-only, else the ranker's): they run the
    stages the ranker's rows need (the towers' export, EASE and merge tuning, recall's
    candidates) and skip the parity checks, the ranker's export, the served core artifacts,
    the evaluation and publishing, which are the published version's alone."""
    profile = dataclasses.replace(
        profile,
        two_tower=dataclasses.replace(profile.two_tower, seed=profile.two_tower.seed + seed),
        ranker=dataclasses.replace(profile.ranker, seed=profile.ranker.seed + seed),
    )
    stages = Stages(quiet)
    notes = list(raw.report.summary_lines())
    stages.start("encode + split")
    encoded = encode(raw)
    interactions = encoded.interactions
    split: Split = holdout_split(
        interactions.user, interactions.time if encoded.has_time else None, seed=seed
    )
    train = interactions.take(split.train)
    test = interactions.take(split.test)
    inner = holdout_split(train.user, train.time if encoded.has_time else None, seed=seed + 1)
    fit, validation = train.take(inner.train), train.take(inner.test)
    notes.append(
        f"split by {split.method}: {len(train):,} train ({len(fit):,} fit + {len(validation):,} validation),"
        f" {len(test):,} held out over {np.unique(test.user).shape[0]:,} users"
    )
    spec = _spec(encoded, profile)
    core_config = dataclasses.replace(profile.core, seed=seed)

    stages.start("core artifacts (fit part)")
    core_fit = build_core(fit, encoded.catalogue, encoded.users, core_config, encoded.like_threshold)
    towers = _train_towers(encoded, train, inner.test, core_fit, spec, profile, stages, distribution)
    if towers is None:
        stages.finish()
        return None
    trained = towers

    validation_heldout = HeldOut.from_pairs(validation.user, validation.item)
    if profile.max_eval_users is not None:
        validation_heldout = validation_heldout.sample(profile.max_eval_users, seed=seed)
    ease_channel: EaseChannel | None = None
    history_weighting: dict[str, HistoryWeighting] = {}
    if profile.ease and encoded.n_items <= EASE_MAX_ITEMS:
        stages.start("tune EASE on validation")
        ease_fit, ease_channel = tune_ease(core_fit, validation_heldout, profile, RECENT_ITEMS, stages)
        # The towers trained above never read the EASE table; the ranker (below) reads its
        # candidates' provenance from the merged recall, which now includes the channel.
        table = ease_fit.neighbor_table(ease_channel.neighbors, signed=ease_channel.signed)
        core_fit = dataclasses.replace(core_fit, ease=table)
        del ease_fit
        if ease_channel.weighting != HistoryWeighting():
            history_weighting["ease"] = ease_channel.weighting

    stages.start("tune merge on validation")
    fit_model = _serving_model(
        "fit",
        spec,
        core_fit,
        trained,
        Defaults(
            recent_items=RECENT_ITEMS,
            candidate_budget=profile.candidate_budget,
            history_weighting=history_weighting,
        ),
    )
    if not profile.retrieval_only:
        # The ranker reads where each candidate came from: the channels this version serves.
        spec = dataclasses.replace(spec, provenance_channels=fit_model.channels)
        fit_model = dataclasses.replace(fit_model, spec=spec)
    run = run_channels(fit_model, validation_heldout)
    weights, quotas, validation_recall = tune_merge(run, validation_heldout, profile.candidate_budget)
    defaults = Defaults(
        weights,
        quotas,
        recent_items=RECENT_ITEMS,
        candidate_budget=profile.candidate_budget,
        history_weighting=history_weighting,
    )
    stages.note(f"weights {weights}")
    stages.note(
        f"quotas {quotas}; validation merged recall@{profile.candidate_budget} {validation_recall:.4f}"
    )
    ranker_training: RankerTraining | None = None
    ranker_counts: dict[str, int] = {}
    ranker_rows: RankerRowIndex | None = None
    quantisation: dict[str, Any] | None = None
    if not profile.retrieval_only:
        ranker = _train_ranker(
            fit_model, run, weights, quotas, validation, train, encoded.n_items, profile, stages, distribution
        )
        if ranker is None:
            stages.finish()
            return None
        ranker_onnx, ranker_parity, ranker_training, ranker_counts, ranker_rows = ranker
        if profile.ranker_int8:
            stages.start("ranker: int8 + quality gate on validation")
            gate = _gate_int8(fit_model, defaults, run, validation_heldout, ranker_onnx)
            stages.note(
                f"int8 ranker: validation ndcg@10 {gate.report['candidate']:.4f} vs fp32"
                f" {gate.report['reference']:.4f}; published {gate.report['published']}"
            )
            ranker_onnx, quantisation = gate.published, gate.report
        trained = dataclasses.replace(
            trained,
            ranker=ranker_onnx,
            parity={**trained.parity, "ranker": ranker_parity},
            losses={**trained.losses, "ranker": ranker_training.losses},
        )
    ease_l2 = None if ease_channel is None else ease_channel.l2
    # The fit part's core (its neighbour tables are 1.6 GB at 10⁶ items) is done with: let it go
    # before the whole training part's is built beside it.
    del fit_model, run, core_fit

    stages.start("core artifacts (whole training part)")
    core = build_core(train, encoded.catalogue, encoded.users, core_config, encoded.like_threshold)
    ease_served: CatalogueEase | None = None
    if ease_channel is not None:
        # One fit on the whole training part: the served channel's table and the EASE baseline.
        ease_served = CatalogueEase.fit(core.history.items, encoded.n_items, ease_channel.l2)
        table = ease_served.neighbor_table(ease_channel.neighbors, signed=ease_channel.signed)
        core = dataclasses.replace(core, ease=table)
    served = _serving_model("candidate", spec, core, trained, defaults)

    stages.start("evaluate on held-out part")
    heldout = HeldOut.from_pairs(test.user, test.item)
    if profile.max_eval_users is not None and len(heldout) > profile.max_eval_users:
        heldout = heldout.sample(profile.max_eval_users, seed=seed)
        notes.append(f"evaluated on a seeded sample of {len(heldout):,} held-out users")
    # The store keeps exactly the pairs evaluated, so `recsys evaluate` reproduces the figures.
    evaluated = test.take(np.flatnonzero(np.isin(test.user, heldout.users)))
    ranker_eval = (
        None if profile.retrieval_only else _ranker_eval_rows(encoded, train, test, seed, profile.ranker)
    )
    ease = (
        ease_lists(core, heldout, ease_served.l2, max(KS), fitted=ease_served)
        if ease_served is not None
        else None
    )
    del ease_served
    metrics = evaluate(served, heldout, ease_lists=ease, ranker_rows=ranker_eval)
    metrics["ann"] = {"recall@100_vs_exact": round(trained.ann_recall_at_100, 5)}
    metrics["validation"] = {"merged_recall": round(validation_recall, 5), "ease_l2": ease_l2}
    if ranker_training is not None:
        metrics["validation"]["ranker"] = {
            "metric": ranker_training.metric,
            "best": round(ranker_training.best, 5),
            "per_epoch": [round(value, 5) for value in ranker_training.validation],
            "rows": ranker_counts,
        }
    if ease_channel is not None:
        metrics["validation"]["ease_channel"] = ease_channel.to_json()
    metrics["parity"] = {name: value.to_json() for name, value in trained.parity.items()}
    if cold_start is not None:
        stages.start("item cold-start evaluation")
        metrics["item_cold_start"] = evaluate_item_cold_start_seeds(
            served, OnnxModel(trained.item_tower), cold_start, seed=seed, progress=stages.note
        )
    if quantisation is not None:
        metrics["validation"]["ranker_quantisation"] = quantisation
    stages.finish()
    training_config = {
        "profile": profile.name,
        "seed": seed,
        "workers": 1 if distribution is None else distribution.workers,
        "two_tower": dataclasses.asdict(profile.two_tower),
        "ranker": dataclasses.asdict(profile.ranker),
        "core": core_config.recorded(),
        "history_length": profile.history_length,
        "ease": {
            "enabled": ease_channel is not None,
            "l2_grid": list(profile.ease_grid),
            "neighbors_grid": list(profile.ease_neighbors_grid),
            "weightings": [dataclasses.asdict(weighting) for weighting in EASE_WEIGHTINGS],
        },
        "split": {
            "method": split.method,
            "train": len(train),
            "test": len(test),
            "validation": len(validation),
        },
        "losses": trained.losses,
    }
    return Candidate(
        encoded,
        spec,
        core,
        trained,
        defaults,
        metrics,
        evaluated.user,
        evaluated.item,
        ranker_eval,
        training_config,
        ease_l2,
        ease_channel,
        notes,
        stages,
        served.channels,
        ranker_rows,
        cold_start,
    )


def publish(
    candidate: Candidate,
    store: str | Path,
    *,
    keep: int = 5,
    fail_after: Callable[[str], None] | None = None,
) -> BuildResult:
    """Write, verify and publish a candidate; CURRENT moves only when all of it succeeded.
    `fail_after(stage)` is a test hook that may raise to simulate a crash."""
    stages = candidate.stages
    stages.start("write + verify + publish")
    trained, spec, defaults = candidate.trained, candidate.spec, candidate.defaults
    with VersionWriter(store) as version:
        save_core(candidate.core, version)
        version.save_json(FEATURE_SPEC, spec.to_json())
        version.save_json(DEFAULTS, defaults_json(defaults))
        version.save_bytes(USER_TOWER, trained.user_tower)
        version.save_bytes(ITEM_TOWER, trained.item_tower)
        if trained.ranker is not None:
            version.save_bytes(RANKER, trained.ranker)
        version.save_array(ITEM_EMBEDDINGS, trained.item_embeddings)
        trained.index.save(version.path_for(ANN_INDEX))
        if fail_after is not None:
            fail_after("artifacts")
        version.save_array("eval/heldout_user.npy", candidate.heldout_user)
        version.save_array("eval/heldout_item.npy", candidate.heldout_item)
        if candidate.ranker_eval is not None:
            ranker_user, ranker_item, ranker_labels = candidate.ranker_eval
            version.save_array("eval/ranker_user.npy", ranker_user)
            version.save_array("eval/ranker_item.npy", ranker_item)
            for head, labels in ranker_labels.items():
                if head in spec.heads:
                    version.save_array(f"eval/ranker_{head}.npy", labels)
        if candidate.cold_start is not None:
            version.save_json(COLD_START_SET, cold_start_set_to_json(candidate.cold_start))
        version.save_json("eval/metrics.json", candidate.metrics)
        write_report(
            version.path_for("eval/report.md"), candidate.metrics, candidate.encoded.name, candidate.notes
        )
        channels = [*candidate.channels, "cache"]
        heads = [] if trained.ranker is None else list(spec.heads)
        version.manifest_fields(
            feature_spec=spec.to_json(),
            capabilities={**candidate.encoded.capabilities, "channels": channels, "heads": heads},
            data_source=candidate.encoded.source,
            training_config=candidate.training_config,
            metrics=candidate.metrics,
            defaults=defaults_json(defaults),
            extra={
                "like_threshold": candidate.encoded.like_threshold,
                "notes": candidate.notes,
                "ease_l2": candidate.ease_l2,
                "ease_neighbors": (
                    None if candidate.ease_channel is None else candidate.ease_channel.neighbors
                ),
                "ease_signed": None if candidate.ease_channel is None else candidate.ease_channel.signed,
            },
        )
        version.verify_with(_verify_loads)
        if fail_after is not None:
            version.verify_with(lambda _path: fail_after("verify"))
        manifest = version.publish(make_current=True, keep=keep)
    stages.finish()
    version_path = ModelStore(store).path / manifest.version
    sizes = {path: entry.size for path, entry in manifest.artifacts.items()}
    return BuildResult(
        manifest.version,
        version_path,
        candidate.metrics,
        stages.timings,
        sizes,
        candidate.notes,
        stages.peak_rss,
    )


def build(
    raw: RawData,
    store: str | Path,
    profile: BuildProfile,
    *,
    seed: int = 0,
    keep: int = 5,
    quiet: bool = False,
    cold_start: ColdStartSet | None = None,
    distribution: Distribution | None = None,
) -> BuildResult | None:
    """Build, evaluate and publish one version. None on a worker other than the chief of a
    multi-worker build: it trains, and the chief alone writes the store."""
    candidate = prepare(
        raw, profile, seed=seed, quiet=quiet, cold_start=cold_start, distribution=distribution
    )
    return None if candidate is None else publish(candidate, store, keep=keep)


def _verify_loads(staging: Path) -> None:
    """Every ONNX file loads in onnxruntime, the ANN index in hnswlib, the whole version
    through the serving loader (in this process, which must not need TensorFlow for it)."""
    for path in staging.rglob("*.onnx"):
        OnnxModel(path)
    model = ServingModel.load(staging, version="staging")
    if model.index.size != model.core.catalogue.n_items:
        raise ValueError(f"{ANN_INDEX}: {model.index.size} vectors for {model.core.catalogue.n_items} items")
    # The probe the services run at load: a version they would refuse is never published.
    probe(model, staging)


def summary_rows(result: BuildResult) -> list[tuple[str, str]]:
    m = result.metrics
    rows = [("version", result.version), ("path", str(result.path))]
    total = sum(result.sizes.values())
    rows.append(("size", f"{total / 1e6:.1f} MB in {len(result.sizes)} files"))
    rows.append(("time", f"{sum(result.timings.values()):.0f} s"))
    for name, seconds in result.timings.items():
        peak = result.peak_rss.get(name)
        rows.append((f"  {name}", f"{seconds:.1f} s" + (f", {peak / 2**30:.2f} GiB" if peak else "")))
    if "pipeline" in m:
        rows.append(("pipeline ndcg@10", f"{m['pipeline']['ndcg@10']:.4f}"))
    rows.append(("popular ndcg@10", f"{m['baselines']['popular']['ndcg@10']:.4f}"))
    if "ease" in m["baselines"]:
        rows.append(("ease ndcg@10", f"{m['baselines']['ease']['ndcg@10']:.4f}"))
    rows.append(("merged recall@200", f"{m['merged']['recall@200']:.4f}"))
    best = max(m["channels"].items(), key=lambda item: item[1]["recall@200"])
    rows.append((f"best channel recall@200 ({best[0]})", f"{best[1]['recall@200']:.4f}"))
    for head, value in m.get("ranker", {}).get("auc", {}).items():
        rows.append((f"ranker AUC {head}", f"{value:.4f}" if not math.isnan(value) else "n/a"))
    rows.append(("ANN recall@100", f"{m['ann']['recall@100_vs_exact']:.4f}"))
    gate = m.get("validation", {}).get("ranker_quantisation")
    if gate is not None:
        rows.append(
            (
                "int8 ranker (validation ndcg@10)",
                f"{gate['candidate']:.4f} vs fp32 {gate['reference']:.4f}: published {gate['published']}",
            )
        )
    return rows


def metrics_json(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True)
