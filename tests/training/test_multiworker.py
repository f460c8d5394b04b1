"""Two `recsys build` workers on this machine, each its own process with its own TF_CONFIG,
train the towers and the ranker together on a slice of MovieLens-100K: the chief exports
and publishes (parity proven), the other worker writes nothing, both end with the same
weights, and workers that prepared different data stop with an error instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys.store import ModelStore
from tests.support.stack import free_ports
from training.data import default_data_dir
from training.export import PARITY_TOLERANCE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# `recsys build` itself, with its training functions wrapped to save each model's final
# weights (after early stopping restored the best epoch) into the directory in argv[1].
WORKER = """
import sys
from pathlib import Path
import numpy as np
import training.build
from recsys.cli import main

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
train_two_tower, train_ranker = training.build.train_two_tower, training.build.train_ranker

def save(name, weights):
    np.savez(out / f"{name}.npz", *weights)

def towers(model, *args, **kwargs):
    losses = train_two_tower(model, *args, **kwargs)
    save("two_tower", model.user_model.get_weights() + model.item_model.get_weights())
    return losses

def ranker(model, *args, **kwargs):
    result = train_ranker(model, *args, **kwargs)
    save("ranker", model.get_weights())
    return result

training.build.train_two_tower, training.build.train_ranker = towers, ranker
sys.exit(main(sys.argv[2:]))
"""

# The two-tower on random rows across the workers; worker 0 then trains the same towers
# (same seed, same rows) in one process, and writes both per-epoch losses to argv[1].
TOWERS = """
import json, os, sys
import numpy as np
from recsys.features import FeatureSpec
from training.distributed import Distribution, resolve_cluster, scope
distribution = Distribution(resolve_cluster(os.environ))  # before TensorFlow runs anything
from training.models.two_tower import (
    TwoTowerConfig, build_two_tower, log_sampling_probability, train_two_tower,
)

spec = FeatureSpec(
    n_user_tokens=30, n_item_tokens=50, n_category_tokens=5, n_author_tokens=4, n_region_tokens=3,
    history_length=6, max_categories=2, user_stat_names=(), item_stat_names=(), embedding_dim=8,
    heads=("click",),
)
config = TwoTowerConfig(embedding_dim=8, id_dim=8, side_dim=4, hidden=16, batch_size=64, epochs=3,
                        holdout_fraction=0.0, title_buckets=0)
rng = np.random.default_rng(0)
rows = 640
users = {
    "user_id": rng.integers(1, 30, rows), "region": rng.integers(0, 3, rows),
    "history": rng.integers(0, 50, (rows, 6)), "history_weight": rng.random((rows, 6)).astype(np.float32),
}
items = {
    "item_id": rng.integers(1, 50, rows), "categories": rng.integers(0, 5, (rows, 2)),
    "author": rng.integers(0, 4, rows),
}
log_q = log_sampling_probability(items["item_id"])
with scope(distribution):
    towers = build_two_tower(spec, config)
losses = {"two_workers": train_two_tower(towers, users, items, log_q, distribution=distribution)}
if distribution.is_chief:
    losses["one_process"] = train_two_tower(build_two_tower(spec, config), users, items, log_q)
    with open(sys.argv[1], "w") as out:
        json.dump(losses, out)
"""

USERS = 100  # MovieLens users 1..100: about 10,000 ratings, enough rows for the parity checks


def ratings_slice(path: Path, users: int, drop_last: bool = False) -> Path:
    lines = (default_data_dir() / "ml-100k" / "u.data").read_text().splitlines()
    kept = [line for line in lines if int(line.split("\t")[0]) <= users]
    if drop_last:  # one rating fewer: a worker that read different data
        kept = kept[:-1]
    path.write_text("\n".join(["user\titem\trating\ttime", *kept]) + "\n")
    return path


def worker_env(hosts: list[str], index: int) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("TF_CONFIG", "RECSYS_TF_WORKER_HOSTS", "JOB_COMPLETION_INDEX")
    }
    env["PYTHONPATH"] = str(ROOT)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
    return env


def run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """One worker process per command, all at once (the cluster waits for every worker)."""
    hosts = [f"127.0.0.1:{port}" for port in free_ports(len(commands))]
    started = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=worker_env(hosts, index),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index, command in enumerate(commands)
    ]
    results = []
    try:
        for process, command in zip(started, commands, strict=True):
            stdout, stderr = process.communicate(timeout=110)
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def run_workers(
    tmp_path: Path, data: list[Path], extra: tuple[str, ...] = ()
) -> list[tuple[subprocess.CompletedProcess[str], Path, Path]]:
    """`recsys build` on each worker (worker i reads data[i]); (result, store, weights) each."""
    commands, outputs = [], []
    for index, path in enumerate(data):
        store, weights = tmp_path / f"store-{index}", tmp_path / f"weights-{index}"
        outputs.append((store, weights))
        commands.append(
            [
                *(sys.executable, "-c", WORKER, str(weights)),
                *("build", "--dataset", "csv", "--interactions", str(path), "--user-col", "user"),
                *("--item-col", "item", "--rating-col", "rating", "--time-col", "time"),
                *("--profile", "quick", "--store", str(store), "--quiet", *extra),
            ]
        )
    return [(result, *output) for result, output in zip(run_all(commands), outputs, strict=True)]


def tail(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr[-3000:]


def test_two_workers_train_the_same_weights_and_only_the_chief_publishes(tmp_path: Path) -> None:
    data = ratings_slice(tmp_path / "ratings.tsv", USERS)
    (chief, chief_store, chief_weights), (other, other_store, other_weights) = run_workers(
        tmp_path, [data, data]
    )
    assert chief.returncode == 0, tail(chief)
    assert other.returncode == 0, tail(other)
    assert "worker 1 of 2: trained; the chief (worker 0) evaluates and publishes" in other.stderr

    # The chief published one complete, verified version, with its parity proofs.
    store = ModelStore(chief_store)
    version = store.current()
    assert version is not None
    assert [info.name for info in store.versions()] == [version]
    store.verify(version)
    manifest = store.manifest(version)
    assert manifest.training_config["workers"] == 2
    for name in ("user_tower", "item_tower", "ranker"):
        parity = manifest.metrics["parity"][name]
        assert parity["rows"] >= 1000
        assert parity["max_abs_diff"] <= PARITY_TOLERANCE
    assert {"two_tower/user_tower.onnx", "two_tower/item_tower.onnx", "ranker/ranker.onnx"} <= set(
        manifest.artifacts
    )
    assert len(manifest.training_config["losses"]["two_tower"]) >= 1
    assert len(manifest.training_config["losses"]["ranker"]) >= 1
    assert manifest.metrics["channels"]["two_tower"]["recall@200"] > 0

    # The other worker wrote no store at all.
    assert not other_store.exists()

    # Mirrored: both workers ended with bit-identical weights, for both models.
    for model in ("two_tower", "ranker"):
        with (
            np.load(chief_weights / f"{model}.npz") as first,
            np.load(other_weights / f"{model}.npz") as second,
        ):
            assert first.files == second.files
            assert len(first.files) > 5
            for name in first.files:
                assert first[name].shape == second[name].shape
                assert np.array_equal(first[name], second[name]), f"{model} weight {name} differs"


def test_workers_with_different_data_stop_with_an_error(tmp_path: Path) -> None:
    data = [
        ratings_slice(tmp_path / "ratings.tsv", USERS),
        ratings_slice(tmp_path / "fewer.tsv", USERS, drop_last=True),
    ]
    results = run_workers(tmp_path, data, ("--retrieval-only",))
    for result, store, _ in results:
        assert result.returncode == 2, tail(result)
        assert "two-tower rows: the workers prepared different data" in result.stderr
        assert not store.exists()


def test_the_two_tower_loss_across_workers_is_the_one_process_loss(tmp_path: Path) -> None:
    """The workers' item embeddings are gathered: every row's softmax runs over the whole
    global batch, so two workers compute the loss (and steps) of one process. Each worker
    alone would see half the negatives, a loss lower by about log 2."""
    out = tmp_path / "losses.json"
    for result in run_all([[sys.executable, "-c", TOWERS, str(out)]] * 2):
        assert result.returncode == 0, tail(result)
    losses = json.loads(out.read_text())
    assert len(losses["one_process"]) == 3
    assert losses["one_process"][-1] < losses["one_process"][0]  # it learns
    np.testing.assert_allclose(losses["two_workers"], losses["one_process"], rtol=1e-4)
