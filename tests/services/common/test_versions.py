"""Model version watching: first load, swap, grace period, refusal of a corrupt version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recsys.errors import NotReady, WrongModelVersion
from recsys.feature_store import FeatureStoreUnavailable
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from services.common.versions import Loaded, ModelVersions, VersionMetrics

METRICS = VersionMetrics("versions_test")


def load(store: ModelStore, version: str) -> ServingModel:
    return ServingModel.load(store.version_path(version), version=version)


async def test_load_swap_grace_and_refusal(quick_candidate: Any, tmp_path: Path) -> None:
    from training.build import publish

    store = ModelStore(tmp_path / "store", create=True)
    versions: ModelVersions[ServingModel] = ModelVersions(store, load, METRICS, grace_seconds=30)
    with pytest.raises(NotReady):
        versions.get()
    assert await versions.refresh() is False  # nothing published yet
    first = publish(quick_candidate, store.path).version
    assert await versions.refresh() is True
    assert versions.get().version == first
    assert versions.get(first).model.core.catalogue.n_items == 1682
    with pytest.raises(WrongModelVersion, match="nope"):
        versions.get("nope")

    second = publish(quick_candidate, store.path).version
    assert await versions.refresh() is True
    assert versions.get().version == second
    created = store.manifest(second).created_at.timestamp()
    assert METRICS.created._value.get() == pytest.approx(created)  # the model-age alert reads it
    assert versions.get(first).version == first  # the previous one, within its grace period
    assert sorted(versions.available()) == sorted([first, second])

    third = publish(quick_candidate, store.path).version
    corrupt = store.version_path(third) / "ranker" / "ranker.onnx"
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert await versions.refresh() is False  # refused: checksum mismatch
    assert versions.get().version == second  # the loaded one keeps serving
    assert await versions.refresh() is False  # and it is not retried on every poll


async def test_a_version_waits_for_its_features(quick_candidate: Any, tmp_path: Path) -> None:
    from training.build import publish

    store = ModelStore(tmp_path / "store", create=True)
    ready: set[str] = set()

    async def features_ready(version: str) -> bool:
        return version in ready

    versions: ModelVersions[ServingModel] = ModelVersions(store, load, METRICS, ready_check=features_ready)
    name = publish(quick_candidate, store.path).version
    assert await versions.refresh() is False
    assert versions.current is None
    ready.add(name)
    assert await versions.refresh() is True
    assert versions.get().version == name


async def test_a_lost_snapshot_is_noticed_at_the_next_check(quick_candidate: Any, tmp_path: Path) -> None:
    from training.build import publish

    store = ModelStore(tmp_path / "store", create=True)
    ready: set[str] = set()
    answering = True
    lost: list[str] = []

    async def features_ready(version: str) -> bool:
        if not answering:
            raise FeatureStoreUnavailable("redis: connection refused")
        return version in ready

    async def on_lost(loaded: Loaded[ServingModel]) -> None:
        lost.append(loaded.version)

    versions: ModelVersions[ServingModel] = ModelVersions(
        store,
        load,
        METRICS,
        ready_check=features_ready,
        snapshot_check=features_ready,
        on_snapshot_lost=on_lost,
    )
    name = publish(quick_candidate, store.path).version
    ready.add(name)
    assert await versions.refresh() is True
    assert await versions.check_snapshot() is True
    assert METRICS.snapshot_ready._value.get() == 1

    ready.clear()  # Redis came back empty
    assert await versions.check_snapshot() is False
    assert versions.snapshot_ready is False
    assert lost == [name]
    assert METRICS.snapshot_ready._value.get() == 0
    assert versions.get().version == name  # still serving it, from its own data

    answering = False  # an outage says nothing about the snapshot: the finding stands
    assert await versions.check_snapshot() is False
    assert lost == [name]

    answering = True
    ready.add(name)  # pushed again
    assert await versions.check_snapshot() is True
    assert METRICS.snapshot_ready._value.get() == 1
