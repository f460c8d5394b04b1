"""Model version watching: first load, swap, grace period, refusal of a corrupt version."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.errors import NotReady, WrongModelVersion
from recsys.feature_store import FeatureStoreUnavailable
from recsys.serving_model import ServingModel
from recsys.store import ModelStore
from services.common.versions import Loaded, LocalVersionCopies, ModelVersions, VersionMetrics
from services.common.wiring import load_serving_model

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


# -- the last good version ---------------------------------------------------------------------
async def test_a_process_started_on_a_corrupt_current_serves_the_last_good_one_until_current_loads(
    quick_store: ModelStore, tmp_path: Path
) -> None:
    from services.common.wiring import load_serving_model
    from tests.support.bad_versions import copy_version, corrupt_file, make_current, restore_file

    good = quick_store.current()
    assert good is not None
    copy_version(quick_store, good, tmp_path / "store", "v1", newer_by=0)
    copy_version(quick_store, good, tmp_path / "store", "v2", newer_by=1)
    copy_version(quick_store, good, tmp_path / "store", "v3", newer_by=2)
    store = ModelStore(tmp_path / "store")
    original = corrupt_file(store, "v3", "ranker/ranker.onnx")
    corrupt_file(store, "v2", "two_tower/user_tower.onnx")  # the newest but one is bad too
    make_current(store, "v3")
    metrics = VersionMetrics("versions_fallback_test")
    retired: list[str] = []
    versions: ModelVersions[ServingModel] = ModelVersions(
        store,
        load_serving_model,
        metrics,
        retry_refused_seconds=0.0,
        grace_seconds=0,
        on_retire=retired.append,
    )
    assert await versions.refresh() is True
    assert versions.get().version == "v1"  # v3 and v2 refused: the newest that verifies
    assert versions.fallback_from == "v3"
    assert metrics.fallback._value.get() == 1
    assert await versions.refresh() is False  # still broken: keeps serving v1

    restore_file(store, "v3", "ranker/ranker.onnx", original)
    assert await versions.refresh() is True  # CURRENT became loadable: switched to it
    assert versions.get().version == "v3"
    assert fallback_of(versions) is None
    assert metrics.fallback._value.get() == 0
    versions._expire_previous()
    assert retired == ["v1"]
    labels = {sample.labels["version"] for sample in next(iter(metrics.loaded.collect())).samples}
    assert labels == {"v3"}  # the retired version's series are gone


async def test_a_serving_process_keeps_its_version_and_flags_a_bad_current(
    quick_store: ModelStore, tmp_path: Path
) -> None:
    from services.common.wiring import load_serving_model
    from tests.support.bad_versions import copy_version, make_current, poison_ranker

    good = quick_store.current()
    assert good is not None
    copy_version(quick_store, good, tmp_path / "store", "v1", newer_by=0)
    copy_version(quick_store, good, tmp_path / "store", "v2", newer_by=1)
    store = ModelStore(tmp_path / "store")
    poison_ranker(store, "v2")  # checksums fine, NaN model: the probe refuses it
    make_current(store, "v1")
    metrics = VersionMetrics("versions_flag_test")
    versions: ModelVersions[ServingModel] = ModelVersions(store, load_serving_model, metrics)
    assert await versions.refresh() is True
    make_current(store, "v2")
    assert await versions.refresh() is False
    assert versions.get().version == "v1"
    assert versions.fallback_from == "v2"
    assert metrics.fallback._value.get() == 1


def fallback_of(versions: ModelVersions[ServingModel]) -> str | None:
    return versions.fallback_from  # read afresh (an attribute assert would narrow it for good)


async def test_a_fallback_without_pushed_features_says_so(quick_store: ModelStore, tmp_path: Path) -> None:
    from services.common.wiring import load_serving_model
    from tests.support.bad_versions import copy_version, corrupt_file, make_current

    good = quick_store.current()
    assert good is not None
    copy_version(quick_store, good, tmp_path / "store", "v1", newer_by=0)
    copy_version(quick_store, good, tmp_path / "store", "v2", newer_by=1)
    store = ModelStore(tmp_path / "store")
    corrupt_file(store, "v2", "ranker/ranker.onnx")
    make_current(store, "v2")

    async def nothing_pushed(version: str) -> bool:
        return False

    lost: list[str] = []

    async def on_lost(loaded: Loaded[ServingModel]) -> None:
        lost.append(loaded.version)

    versions: ModelVersions[ServingModel] = ModelVersions(
        store,
        load_serving_model,
        VersionMetrics("versions_unpushed_test"),
        ready_check=nothing_pushed,
        snapshot_check=nothing_pushed,
        on_snapshot_lost=on_lost,
    )
    assert await versions.refresh() is True  # serving beats NOT_SERVING, even without features
    assert versions.get().version == "v1"
    assert versions.snapshot_ready is False  # answers flagged feature_snapshot_missing at once
    assert await versions.check_snapshot() is False
    assert lost == ["v1"]  # and its features get pushed, as after a lost snapshot


def _mapped_files() -> set[str]:
    """Every file this process has memory-mapped (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


async def test_versions_are_copied_verified_and_served_from_local_disk(
    quick_candidate: Any, tmp_path: Path
) -> None:
    from training.build import publish

    store = ModelStore(tmp_path / "shared", create=True)
    local = tmp_path / "local"
    versions: ModelVersions[ServingModel] = ModelVersions(
        store,
        load_serving_model,
        METRICS,
        poll_seconds=0.05,
        grace_seconds=0,
        local_copies=LocalVersionCopies(local),
    )
    first = publish(quick_candidate, store.path).version
    assert await versions.refresh() is True
    model = versions.get().model
    mapped = _mapped_files()
    assert any(path.startswith(str(local / first)) for path in mapped)
    assert not any(path.startswith(str(store.path)) for path in mapped)  # nothing from the share
    assert (local / first / "manifest.json").is_file()

    # What pruning on another node does to a shared file that is mapped: it goes away under
    # the reader (truncated, then deleted). The copy is untouched, so serving is too.
    embeddings = store.path / first / "two_tower" / "item_embeddings.npy"
    with embeddings.open("r+b") as file:
        file.truncate(0)
    shutil.rmtree(store.path / first)
    total = float(np.asarray(model.item_embeddings, dtype=np.float64).sum())
    assert np.isfinite(total)
    user = model.user_lookup["196"]
    assert len(model.core.history.items.row(user)) > 0
    assert versions.get().model.item_lookup  # still the one being served

    second = publish(quick_candidate, store.path).version
    await versions.start()
    try:
        for _ in range(200):  # the swap, then the previous version's copy retired (grace 0)
            swapped = versions.current is not None and versions.current.version == second
            if swapped and sorted(p.name for p in local.iterdir()) == [second]:
                break
            await asyncio.sleep(0.05)
    finally:
        await versions.stop()
    assert versions.get().version == second
    assert sorted(p.name for p in local.iterdir()) == [second]


async def test_a_copy_that_does_not_match_its_manifest_is_refused(
    quick_candidate: Any, tmp_path: Path
) -> None:
    from training.build import publish

    store = ModelStore(tmp_path / "shared", create=True)
    local = tmp_path / "local"
    versions: ModelVersions[ServingModel] = ModelVersions(
        store, load, METRICS, local_copies=LocalVersionCopies(local)
    )
    name = publish(quick_candidate, store.path).version
    corrupt = store.version_path(name) / "core" / "catalogue" / "item_ids.npy"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    assert await versions.refresh() is False
    assert versions.current is None
    assert list(local.iterdir()) == []  # no half-verified copy left behind
