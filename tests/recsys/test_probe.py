"""The model probe: a version whose models give NaN (checksums intact) is refused by every
loader, by the build before publishing, and by `recsys store verify`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from recsys.probe import ModelProbeError, probe
from recsys.serving_model import ServingModel
from recsys.store import ModelStore, StoreIntegrityError
from services.common.wiring import load_serving_model
from services.rank.app import load_model
from services.rank.scenes import SceneFusions
from tests.support.bad_versions import copy_version, poison_ranker


@pytest.fixture
def nan_store(quick_store: ModelStore, tmp_path: Path) -> tuple[ModelStore, str, str]:
    """A store with the quick version (good) and a copy whose ranker weights are NaN."""
    good = quick_store.current()
    assert good is not None
    target = tmp_path / "store"
    copy_version(quick_store, good, target, good, newer_by=0)
    bad = copy_version(quick_store, good, target, "nan-ranker")
    store = ModelStore(target)
    poison_ranker(store, bad)
    return store, good, bad


def test_a_good_version_passes_the_probe(quick_store: ModelStore) -> None:
    version = quick_store.current()
    assert version is not None
    path = quick_store.version_path(version)
    report = probe(ServingModel.load(path, version=version), path)
    assert report.models == ("item embeddings", "item tower", "user tower", "ranker")
    assert report.users > 2
    assert report.items > 2


def test_a_nan_ranker_passes_the_checksums_but_not_the_probe(nan_store: tuple[ModelStore, str, str]) -> None:
    store, good, bad = nan_store
    store.verify(bad)  # the checksums were recomputed: only the probe can tell
    with pytest.raises(ModelProbeError, match=r"ranker/ranker.onnx \(head \w+\): \d+ of \d+ probabilities"):
        load_serving_model(store, bad)
    with pytest.raises(ModelProbeError, match="not finite"):
        load_model(SceneFusions(), store, bad)
    assert load_serving_model(store, good).version == good


def test_a_probability_out_of_range_is_refused(nan_store: tuple[ModelStore, str, str]) -> None:
    store, good, _ = nan_store
    model = load_serving_model(store, good)

    class Shifted:
        """The real ranker's outputs shifted past 1: finite, but not probabilities."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def run(self, inputs: Any) -> dict[str, Any]:
            return {name: value + 1.5 for name, value in self.inner.run(inputs).items()}

    broken = dataclasses.replace(model, ranker=Shifted(model.ranker))  # type: ignore[arg-type]
    with pytest.raises(ModelProbeError, match=r"outside \[0, 1\]"):
        probe(broken)


def test_zero_item_embeddings_are_refused(nan_store: tuple[ModelStore, str, str]) -> None:
    store, good, _ = nan_store
    model = load_serving_model(store, good)
    embeddings = np.array(model.item_embeddings)
    embeddings[7] = 0
    with pytest.raises(ModelProbeError, match="1 of 1682 embeddings have a zero norm"):
        probe(dataclasses.replace(model, item_embeddings=embeddings))


def test_store_verify_runs_the_probe(nan_store: tuple[ModelStore, str, str]) -> None:
    store, good, bad = nan_store
    env = {key: value for key, value in os.environ.items() if key != "RECSYS_STORE"}

    def verify(version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "recsys.cli", "store", "verify", version, "--store", str(store.path)],
            capture_output=True,
            text=True,
            env=env,
        )

    ok = verify(good)
    assert ok.returncode == 0, ok.stderr
    assert "ranker finite and in range" in ok.stdout
    refused = verify(bad)
    assert refused.returncode != 0
    assert "checksums match" in refused.stdout
    assert "probabilities are not finite" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_build_refuses_to_publish_a_nan_ranker(quick_candidate: Any, tmp_path: Path) -> None:
    from training.build import publish

    assert quick_candidate.trained.ranker is not None
    model = onnx.load_from_string(quick_candidate.trained.ranker)
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if np.issubdtype(array.dtype, np.floating):
            initializer.CopyFrom(numpy_helper.from_array(np.full_like(array, np.nan), initializer.name))
    trained = dataclasses.replace(quick_candidate.trained, ranker=model.SerializeToString())
    store = tmp_path / "store"
    with pytest.raises(StoreIntegrityError, match=r"verification by _verify_loads: .*not finite") as refused:
        publish(dataclasses.replace(quick_candidate, trained=trained), store)
    assert isinstance(refused.value.__cause__, ModelProbeError)
    assert ModelStore(store).current() is None
    assert ModelStore(store).versions() == []
