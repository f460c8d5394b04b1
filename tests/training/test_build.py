"""The quick MovieLens-100K build (built once per run) and what users do with its store."""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.errors import NotReady
from recsys.evaluation.evaluator import HeldOut, evaluate
from recsys.serving_model import ServingModel
from recsys.store import ModelStore, StoreIntegrityError
from training.build import Stages, publish
from training.export import PARITY_TOLERANCE
from training.report import write_report

ROOT = Path(__file__).resolve().parents[2]


class Crash(RuntimeError):
    pass


def test_quick_build_beats_popularity_and_records_everything(quick_store: ModelStore) -> None:
    version = quick_store.current()
    assert version is not None
    manifest = quick_store.manifest(version)
    metrics = manifest.metrics
    assert metrics["pipeline"]["ndcg@10"] > metrics["baselines"]["popular"]["ndcg@10"]
    # No authors in MovieLens; EASE is a channel (tuned on validation) and still the full baseline.
    assert set(metrics["channels"]) == {"itemcf", "swing", "ease", "two_tower", "geo", "popular"}
    assert set(metrics["single_channel_top10"]) == set(metrics["channels"])
    assert set(metrics["baselines"]) == {"popular", "ease"}
    assert "ease" in manifest.capabilities["channels"]
    ease = metrics["validation"]["ease_channel"]
    assert ease["l2"] == manifest.extra["ease_l2"] == metrics["validation"]["ease_l2"]
    assert ease["neighbors"] == manifest.extra["ease_neighbors"]
    assert ease["signed"] == manifest.extra["ease_signed"]
    assert {"core/ease/neighbors.npy", "core/ease/scores.npy"} <= set(manifest.artifacts)
    assert manifest.capabilities["authors"] is False
    assert "author" not in manifest.capabilities["channels"]
    assert set(manifest.capabilities["heads"]) == {"click", "like"}
    for name in ("user_tower", "item_tower", "ranker"):
        assert metrics["parity"][name]["rows"] >= 1000
        assert metrics["parity"][name]["max_abs_diff"] <= PARITY_TOLERANCE
    assert metrics["ann"]["recall@100_vs_exact"] >= 0.95
    assert manifest.defaults["channel_quotas"]
    onnx_files = [path for path in manifest.artifacts if path.endswith(".onnx")]
    assert sorted(onnx_files) == [
        "ranker/ranker.onnx",
        "two_tower/item_tower.onnx",
        "two_tower/user_tower.onnx",
    ]
    assert manifest.data_source["dataset"] == "ml-100k"
    quick_store.verify(version)
    report = (quick_store.version_path(version) / "eval" / "report.md").read_text()
    assert "pipeline: NDCG@10" in report
    assert (quick_store.version_path(version) / "eval" / "recall.png").stat().st_size > 1000


SERVE_WITHOUT_TENSORFLOW = """
import sys, json
import numpy as np
from recsys.serving_model import ServingModel
from recsys.store import ModelStore, StoreIntegrityError
store = ModelStore(sys.argv[1])
model = ServingModel.load(store.version_path(store.current()))
query = model.query(0)
history = np.asarray(model.core.history.items.row(0))
vector = model.user_embeddings([model.user_inputs(query, history, np.ones(len(history), bool))])[0]
import dataclasses
query = dataclasses.replace(query, embedding=vector)
found = {name: source.candidates(query, 50).items.tolist() for name, source in model.sources.items()}
scores = model.score(model.user_inputs(query), np.array(found["itemcf"][:20]), vector)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx'))
returned = set(sum(found.values(), []))
print(json.dumps({"found": {k: len(v) for k, v in found.items()}, "heavy": heavy, "heads": sorted(scores),
                  "consumed_returned": sorted(returned & set(history.tolist()))}))
"""


def test_onnx_models_and_the_index_load_and_serve_without_tensorflow(quick_store: ModelStore) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TENSORFLOW, str(quick_store.path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["heavy"] == []
    assert answer["consumed_returned"] == []
    assert answer["heads"] == ["click", "like"]
    assert all(count == 50 for count in answer["found"].values()), answer["found"]


def test_evaluate_prints_only_the_json_and_reproduces_the_build_metrics(quick_store: ModelStore) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "evaluate", "--store", str(quick_store.path), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)  # stdout is exactly one JSON document
    for key in ("channels", "merged", "baselines", "pipeline", "ranker"):
        assert key in metrics
    assert set(metrics["channels"]["itemcf"]) >= {"recall@50", "recall@200"}
    assert set(metrics["ranker"]["auc"]) == {"click", "like"}
    stored = quick_store.manifest(quick_store.current()).metrics  # type: ignore[arg-type]
    assert metrics["pipeline"] == stored["pipeline"]
    assert metrics["merged"] == stored["merged"]
    assert metrics["channels"] == stored["channels"]
    assert metrics["served"] == stored["served"]
    assert metrics["served"]["scene"]["name"] == "default"
    assert set(metrics["ranker"]["auc_candidates"]) == {"click", "click_per_user"}
    for name in ("ranker_top10", "reranked_top10"):
        assert set(metrics["served"][name]) >= {"ndcg@10", "intra_list_similarity", "distinct_categories"}
    # MMR trades some accuracy for diversity: the reranked lists are less alike.
    served = metrics["served"]
    assert served["reranked_top10"]["intra_list_similarity"] < served["ranker_top10"]["intra_list_similarity"]


def test_evaluate_runs_the_served_path_of_a_named_scene(quick_store: ModelStore) -> None:
    def evaluate(*extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "recsys.cli", "evaluate", "--store", str(quick_store.path), *extra]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)

    scenes = str(ROOT / "deploy" / "scenes.example.json")
    result = evaluate("--json", "--scenes", scenes, "--scene", "home")
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)["served"]
    assert served["scene"] == {
        "name": "home",
        "prerank_keep": 200,
        "recall_candidates": 800,
        "rerank": "mmr",
        "theta": 0.7,
    }
    assert 0 < served["reranked_top10"]["ndcg@10"] < 1
    refused = evaluate("--scenes", scenes, "--scene", "nope")
    assert refused.returncode != 0
    assert "--scene: 'nope' is not in" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_failed_publish_leaves_current_unchanged(quick_candidate: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"

    def crash_at(stage: str) -> Any:
        def hook(reached: str) -> None:
            if reached == stage:
                raise Crash(stage)

        return hook

    with pytest.raises(Crash):
        publish(quick_candidate, store, fail_after=crash_at("artifacts"))
    assert ModelStore(store).current() is None
    assert ModelStore(store).versions() == []
    first = publish(quick_candidate, store).version
    for stage in ("artifacts", "verify"):
        # A verifier's failure is reported as an integrity error of the version.
        with pytest.raises((Crash, StoreIntegrityError)):
            publish(quick_candidate, store, fail_after=crash_at(stage))
        assert ModelStore(store).current() == first
        assert [info.name for info in ModelStore(store).versions()] == [first]
    assert not [path for path in store.iterdir() if path.name.startswith(".staging")]


def test_a_retrieval_only_version_publishes_loads_and_evaluates_without_a_ranker(
    quick_candidate: Any, tmp_path: Path
) -> None:
    """The shape `recsys build --retrieval-only` publishes (the 1M-item benchmark catalogue),
    made from the shared candidate by dropping its ranker: no second training run."""
    candidate = dataclasses.replace(
        quick_candidate,
        trained=dataclasses.replace(quick_candidate.trained, ranker=None),
        ranker_eval=None,
    )
    version = publish(candidate, tmp_path / "store").version
    store = ModelStore(tmp_path / "store")
    manifest = store.manifest(version)
    assert manifest.capabilities["heads"] == []
    assert "ranker/ranker.onnx" not in manifest.artifacts
    assert not (store.version_path(version) / "ranker").exists()
    model = ServingModel.load(store.version_path(version))
    assert model.ranker is None
    with pytest.raises(NotReady, match="retrieval-only"):
        model.score(model.user_inputs(model.query(0)), np.arange(5))
    heldout = HeldOut.from_pairs(candidate.heldout_user, candidate.heldout_item)
    sample = heldout.sample(200, seed=3)
    assert len(sample) == 200
    assert set(sample.users.tolist()) <= set(heldout.users.tolist())
    metrics = evaluate(model, sample)
    assert "pipeline" not in metrics
    assert "ranker" not in metrics
    assert metrics["headline"] == ["merged.recall@200"]
    assert metrics["merged"]["recall@200"] > metrics["channels"]["popular"]["recall@200"]
    write_report(tmp_path / "report.md", metrics, "ml-100k", [])
    assert "retrieval-only" in (tmp_path / "report.md").read_text()


def test_the_ease_channel_never_returns_consumed_items(quick_store: ModelStore) -> None:
    model = ServingModel.load(quick_store.version_path(quick_store.current()))  # type: ignore[arg-type]
    assert model.core.ease is not None
    model.core.ease.validate()
    source = model.sources["ease"]
    answered = 0
    for user in range(0, model.core.users.n_users, 5):
        query = model.query(user)
        items = source.candidates(query, 500).items
        consumed = np.asarray(model.core.history.items.row(user))
        assert not np.isin(items, consumed).any(), user
        assert len(np.unique(items)) == len(items)
        answered += bool(len(items))
    assert answered > 150


def test_a_version_without_an_ease_table_loads_and_serves_without_the_channel(
    quick_candidate: Any, tmp_path: Path
) -> None:
    """What a version published before the channel existed (or built without EASE) holds: no
    table, no `ease` file. It loads, verifies and evaluates without the channel (recall serves it:
    tests/services/recall)."""
    candidate = dataclasses.replace(
        quick_candidate,
        core=dataclasses.replace(quick_candidate.core, ease=None),
        channels=tuple(name for name in quick_candidate.channels if name != "ease"),
    )
    version = publish(candidate, tmp_path / "store").version
    store = ModelStore(tmp_path / "store")
    store.verify(version)
    assert not [path for path in store.manifest(version).artifacts if path.startswith("core/ease")]
    assert not (store.version_path(version) / "core" / "ease").exists()
    model = ServingModel.load(store.version_path(version))
    assert model.core.ease is None
    assert "ease" not in model.channels
    assert "ease" not in model.sources
    heldout = HeldOut.from_pairs(candidate.heldout_user, candidate.heldout_item).sample(100, seed=1)
    assert "ease" not in evaluate(model, heldout)["channels"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args], capture_output=True, text=True, cwd=ROOT, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("build", "--dataset", "csv", "--store", "x"), "--interactions: required with --dataset csv"),
        (("build", "--dataset", "ml-100k", "--data-dir", "/nonexistent"), "--data-dir: no such directory"),
        (("build", "--dataset", "ml-100k", "--keep", "0"), "--keep: must be at least 1"),
        (
            ("build", "--dataset", "ml-100k", "--spark-master", "spark://x:7077"),
            "--spark-master: only with --engine spark",
        ),
        (
            ("build", "--dataset", "ml-100k", "--retrieval-only", "--ranker-int8"),
            "--ranker-int8: a --retrieval-only build has no ranker",
        ),
        (("build", "--dataset", "synthetic", "--users", "many"), "--users: expected a whole number"),
        (("build", "--dataset", "movies"), "argument --dataset: invalid choice: 'movies'"),
        (("evaluate", "--store", "/nonexistent-store"), "/nonexistent-store"),
    ],
)
def test_cli_errors_name_the_flag(args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]  # one line (after argparse's usage)


def test_each_stage_records_its_own_peak_memory_and_the_sampler_ends_with_the_stages() -> None:
    def samplers() -> int:
        return sum(thread.name == "rss" for thread in threading.enumerate())

    before = samplers()
    stages = Stages(quiet=True)
    stages.start("small")
    time.sleep(0.15)
    stages.start("large")
    block = np.ones(256 * 2**20, dtype=np.uint8)  # 256 MiB, touched
    time.sleep(0.15)
    del block
    stages.start("after")
    time.sleep(0.15)
    stages.finish()
    assert set(stages.peak_rss) == {"small", "large", "after"}
    assert stages.peak_rss["large"] - stages.peak_rss["small"] >= 200 * 2**20
    assert stages.peak_rss["after"] < stages.peak_rss["large"] - 200 * 2**20
    assert samplers() == before + 1
    del stages
    gc.collect()
    deadline = time.monotonic() + 2.0
    while samplers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert samplers() == before


@pytest.mark.parametrize(
    ("flags", "int8"),
    [
        (("--profile", "full"), True),  # the deployed profile publishes int8 behind its gate
        (("--profile", "quick"), False),
        (("--profile", "full", "--no-ranker-int8"), False),
        (("--profile", "quick", "--ranker-int8"), True),
    ],
)
def test_the_int8_ranker_is_the_full_profiles_default(flags: tuple[str, ...], int8: bool) -> None:
    from recsys.cli import build_parser
    from recsys.commands.build import build_profile

    args = build_parser().parse_args(["build", "--dataset", "ml-100k", *flags])
    assert build_profile(args).ranker_int8 is int8
