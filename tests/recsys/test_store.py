"""The versioned model store: atomic publish, manifests and checksums, rollback, pruning."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import recsys
from recsys.store import (
    CURRENT_FILE,
    MANIFEST_FILE,
    Manifest,
    ModelStore,
    StoreError,
    StoreIntegrityError,
    VersionNotFound,
    VersionWriter,
    new_version_name,
    validate_version_name,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

PublishVersion = Callable[..., str]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def publish_version(store_path: Path) -> PublishVersion:
    """Publish a small version, one minute after the previous one; return its name."""
    published: list[str] = []

    def publish(
        *, make_current: bool = True, keep: int | None = None, metrics: dict[str, Any] | None = None
    ) -> str:
        now = T0 + timedelta(minutes=len(published))
        with VersionWriter(store_path, now=now) as version:
            version.save_array("itemcf/neighbors.npy", np.arange(12, dtype=np.int32).reshape(3, 4))
            version.save_json("config/merge.json", {"weights": {"itemcf": 1.0}})
            version.manifest_fields(metrics=metrics or {"recall@50": 0.25 + len(published) / 100})
            version.publish(make_current=make_current, keep=keep)
        published.append(version.version)
        return version.version

    return publish


def visible_entries(store_path: Path) -> list[str]:
    return sorted(path.name for path in store_path.iterdir())


def assert_nothing_published(store_path: Path, current_before: str | None, names_before: list[str]) -> None:
    store = ModelStore(store_path)
    assert store.current() == current_before
    assert [info.name for info in store.versions()] == names_before
    leftovers = [name for name in visible_entries(store_path) if name.startswith(".")]
    assert leftovers == []
    assert sorted(visible_entries(store_path)) == sorted([*names_before, CURRENT_FILE])


# --- publish -----------------------------------------------------------------------------------
def test_publish_round_trip(store_path: Path) -> None:
    neighbors = np.arange(12, dtype=np.int64).reshape(3, 4)
    onnx = b"\x08\x07fake onnx model"
    with VersionWriter(f"file://{store_path}", now=T0) as version:
        assert version.staging_path.name.startswith(f".staging-{version.version}-")
        assert version.save_array("itemcf/neighbors.npy", neighbors).is_file()
        version.save_json("config/merge.json", {"weights": {"itemcf": 1.0, "swing": 0.5}})
        version.save_bytes("ranker/ranker.onnx", onnx)
        index = version.path_for("two_tower/deep/index.hnsw")
        assert index.parent.is_dir()
        index.write_bytes(b"written by a library")
        version.manifest_fields(
            capabilities={"channels": ["itemcf"], "rating": True},
            metrics={"recall@50": 0.31, "ranker": {"auc": 0.71}},
        )
        version.manifest_fields(
            capabilities={"channels": ["itemcf", "swing"], "heads": ["ctr"]},
            metrics={"ranker": {"logloss": 0.4}},
            data_source={"dataset": "movielens-100k", "files": {"u.data": "ab" * 32}},
            training_config={"epochs": 3},
            defaults={"quotas": {"itemcf": 200}},
            feature_spec={"user": ["age"]},
            extra={"note": "test"},
        )
        published = version.publish()
        name = version.version

    assert re.fullmatch(r"20240501T120000Z-[0-9a-f]{6}", name)
    assert (store_path / CURRENT_FILE).read_text() == f"{name}\n"
    store = ModelStore(store_path)
    assert store.current() == name
    manifest = store.manifest(name)
    assert manifest == published
    assert manifest.format_version == 1
    assert manifest.version == name
    assert manifest.created_at == T0
    assert manifest.code_version["recsys"] == recsys.__version__
    assert manifest.capabilities == {"channels": ["itemcf", "swing"], "heads": ["ctr"], "rating": True}
    assert manifest.metrics == {"recall@50": 0.31, "ranker": {"auc": 0.71, "logloss": 0.4}}
    assert manifest.data_source["dataset"] == "movielens-100k"
    assert manifest.training_config == {"epochs": 3}
    assert manifest.defaults == {"quotas": {"itemcf": 200}}
    assert manifest.feature_spec == {"user": ["age"]}
    assert manifest.extra == {"note": "test"}

    directory = store.version_path(name)
    assert directory == store_path / name
    assert sorted(manifest.artifacts) == [
        "config/merge.json",
        "itemcf/neighbors.npy",
        "ranker/ranker.onnx",
        "two_tower/deep/index.hnsw",
    ]
    for key, entry in manifest.artifacts.items():
        data = (directory / key).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.size == len(data)
    assert manifest.total_bytes == sum(entry.size for entry in manifest.artifacts.values())

    raw = (directory / MANIFEST_FILE).read_text()
    document = json.loads(raw)
    assert raw == json.dumps(document, sort_keys=True, indent=2) + "\n"
    assert document["created_at"] == "2024-05-01T12:00:00.000Z"
    assert document["artifacts"]["ranker/ranker.onnx"] == {
        "sha256": hashlib.sha256(onnx).hexdigest(),
        "bytes": 17,
    }
    assert Manifest.from_json(raw) == manifest

    np.testing.assert_array_equal(np.load(directory / "itemcf/neighbors.npy", allow_pickle=False), neighbors)
    assert json.loads((directory / "config/merge.json").read_text())["weights"]["swing"] == 0.5
    store.verify(name)

    (info,) = store.versions()
    assert (info.name, info.is_current, info.path, info.created_at) == (name, True, directory, T0)
    assert info.size_bytes == manifest.total_bytes
    assert info.artifact_count == 4
    assert info.metrics == {"ranker.auc": 0.71, "ranker.logloss": 0.4, "recall@50": 0.31}
    assert visible_entries(store_path) == [name, CURRENT_FILE]


def test_publish_without_make_current_leaves_current(
    publish_version: PublishVersion, store_path: Path
) -> None:
    first = publish_version()
    second = publish_version(make_current=False)
    store = ModelStore(store_path)
    assert store.current() == first
    assert [(info.name, info.is_current) for info in store.versions()] == [(first, True), (second, False)]


def test_versions_sorted_oldest_first_and_marker_changes(
    publish_version: PublishVersion, store_path: Path
) -> None:
    store = ModelStore(store_path, create=True)
    assert store.current_marker() == (None, 0)
    assert store.current() is None
    assert store.versions() == []
    names = [publish_version() for _ in range(3)]
    assert [info.name for info in store.versions()] == names
    marker = store.current_marker()
    assert marker[0] == names[-1]
    assert marker[1] > 0
    store.rollback(names[0])
    assert store.current_marker()[0] == names[0]
    assert store.current_marker() != marker


def test_headline_metrics_can_be_chosen(publish_version: PublishVersion, store_path: Path) -> None:
    publish_version(metrics={"headline": ["ranker.auc", "absent"], "ranker": {"auc": 0.7}, "a": 1})
    (info,) = ModelStore(store_path).versions()
    assert info.metrics == {"ranker.auc": 0.7}


def test_explicit_version_name_and_duplicates(store_path: Path) -> None:
    with VersionWriter(store_path, "release-1") as version:
        version.save_bytes("a.bin", b"a")
        version.publish()
    assert ModelStore(store_path).current() == "release-1"
    with pytest.raises(StoreError, match="already exists"), VersionWriter(store_path, "release-1"):
        pass


# --- version names ------------------------------------------------------------------------------
def test_new_version_names_are_sortable_utc_times() -> None:
    name = new_version_name(datetime(2024, 5, 1, 14, 30, 5, tzinfo=UTC) + timedelta())
    assert re.fullmatch(r"20240501T143005Z-[0-9a-f]{6}", name)
    later = new_version_name(datetime(2024, 5, 1, 14, 30, 6, tzinfo=UTC))
    assert name < later
    assert new_version_name() != new_version_name()
    with pytest.raises(ValueError, match="timezone-aware"):
        new_version_name(datetime(2024, 5, 1))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("..", r"'\.\.'"),
        ("x..y", r"'\.\.'"),
        (".staging-x", "starts with '.'"),
        ("CURRENT", "reserved"),
        ("a b", "whitespace"),
        ("x" * 200, "longer than"),
    ],
)
def test_invalid_version_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        validate_version_name(name)


# --- failures leave CURRENT and the listing as they were ------------------------------------------
def test_a_failing_verifier_aborts_the_publish(publish_version: PublishVersion, store_path: Path) -> None:
    first = publish_version()

    def load_every_model(directory: Path) -> None:
        assert (directory / "ranker/ranker.onnx").is_file()
        raise RuntimeError("cannot load ranker.onnx")

    with VersionWriter(store_path) as version:
        version.save_bytes("ranker/ranker.onnx", b"broken")
        version.verify_with(load_every_model)
        with pytest.raises(StoreIntegrityError, match=r"load_every_model: cannot load ranker\.onnx"):
            version.publish()
    assert_nothing_published(store_path, first, [first])


def test_an_artifact_changed_after_saving_aborts_the_publish(
    publish_version: PublishVersion, store_path: Path
) -> None:
    first = publish_version()
    with VersionWriter(store_path) as version:
        path = version.save_array("itemcf/neighbors.npy", np.ones(8))
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(StoreIntegrityError, match=r"itemcf/neighbors\.npy changed after it was saved"):
            version.publish()
    assert_nothing_published(store_path, first, [first])


def test_an_artifact_corrupted_during_verification_aborts_the_publish(
    publish_version: PublishVersion, store_path: Path
) -> None:
    first = publish_version()

    def corrupt(directory: Path) -> None:
        path = directory / "ranker/ranker.onnx"
        path.write_bytes(b"X" + path.read_bytes()[1:])

    with VersionWriter(store_path) as version:
        version.save_bytes("ranker/ranker.onnx", b"model")
        version.verify_with(corrupt)
        with pytest.raises(StoreIntegrityError, match=r"ranker/ranker\.onnx: sha256 mismatch"):
            version.publish()
    assert_nothing_published(store_path, first, [first])


def test_a_verifier_that_adds_files_aborts_the_publish(
    publish_version: PublishVersion, store_path: Path
) -> None:
    first = publish_version()
    with VersionWriter(store_path) as version:
        version.save_bytes("model.onnx", b"model")
        version.verify_with(lambda directory: (directory / "cache.bin").write_bytes(b"x"))
        with pytest.raises(StoreIntegrityError, match=r"cache\.bin: file is not in the manifest"):
            version.publish()
    assert_nothing_published(store_path, first, [first])


def test_an_exception_inside_the_with_block_discards_the_version(
    publish_version: PublishVersion, store_path: Path
) -> None:
    first = publish_version()

    def train() -> None:
        with VersionWriter(store_path) as version:
            version.save_bytes("model.onnx", b"model")
            raise RuntimeError("training diverged")

    with pytest.raises(RuntimeError, match="training diverged"):
        train()
    assert_nothing_published(store_path, first, [first])


def test_leaving_the_with_block_without_publishing_discards_the_version(
    publish_version: PublishVersion, store_path: Path
) -> None:
    first = publish_version()
    with VersionWriter(store_path) as version:
        version.save_bytes("model.onnx", b"model")
    assert_nothing_published(store_path, first, [first])
    with pytest.raises(StoreError, match="inside its `with` block"):
        version.save_bytes("late.bin", b"x")


@pytest.mark.parametrize("failing_step", ["CURRENT", "version directory"])
def test_a_failing_rename_leaves_current_unchanged(
    publish_version: PublishVersion, store_path: Path, monkeypatch: pytest.MonkeyPatch, failing_step: str
) -> None:
    first = publish_version()
    real_replace = os.replace

    def replace(source: Any, destination: Any) -> None:
        target = Path(destination)
        if (failing_step == "CURRENT" and target.name == CURRENT_FILE) or (
            failing_step == "version directory" and Path(source).name.startswith(".staging-")
        ):
            raise OSError(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with VersionWriter(store_path) as version:
        version.save_bytes("model.onnx", b"model")
        with pytest.raises(OSError, match="No space left"):
            version.publish()
    assert_nothing_published(store_path, first, [first])
    assert not (store_path / version.version).exists()
    assert (store_path / CURRENT_FILE).read_text() == f"{first}\n"


def test_a_writer_is_used_once(store_path: Path) -> None:
    writer = VersionWriter(store_path)
    with pytest.raises(StoreError, match="inside its `with` block"):
        writer.save_bytes("a.bin", b"a")
    with writer:
        writer.save_bytes("a.bin", b"a")
        writer.publish()
        with pytest.raises(StoreError, match="is published"):
            writer.publish()
    with pytest.raises(StoreError, match="entered only once"), writer:
        pass


# --- artifact paths and contents ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../escape.bin", "must stay inside the version"),
        ("a/../../escape.bin", "must stay inside the version"),
        ("a/./b.bin", "must stay inside the version"),
        ("a//b.bin", "must stay inside the version"),
        ("/etc/passwd", "is absolute"),
        ("", "is empty"),
        ("a\\b.bin", "backslash"),
        ("manifest.json", "reserved for the manifest"),
    ],
)
def test_artifact_paths_must_stay_inside_the_version(store_path: Path, path: str, problem: str) -> None:
    with VersionWriter(store_path) as version:
        with pytest.raises(ValueError, match=problem):
            version.save_bytes(path, b"x")
        with pytest.raises(ValueError, match=problem):
            version.path_for(path)
    assert not (store_path.parent / "escape.bin").exists()


def test_a_symlink_out_of_the_staging_directory_is_refused(store_path: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with VersionWriter(store_path) as version:
        (version.staging_path / "link").symlink_to(outside)
        with pytest.raises(ValueError, match="leads outside"):
            version.save_bytes("link/x.bin", b"x")
    assert list(outside.iterdir()) == []


def test_a_symlinked_artifact_is_refused_at_publish(store_path: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    with VersionWriter(store_path) as version:
        version.path_for("model.onnx").symlink_to(tmp_path / "secret")
        with pytest.raises(StoreError, match="only regular files"):
            version.publish()
    assert ModelStore(store_path).versions() == []


def test_content_checks(store_path: Path) -> None:
    with VersionWriter(store_path) as version:
        with pytest.raises(ValueError, match=r"must end in \.npy"):
            version.save_array("a.bin", np.zeros(2))
        with pytest.raises(ValueError, match=r"must end in \.json"):
            version.save_json("a.txt", {})
        with pytest.raises(ValueError, match="object arrays"):
            version.save_array("objects.npy", np.array([{"a": 1}], dtype=object))
        with pytest.raises(ValueError, match="Out of range float"):
            version.save_json("nan.json", {"x": float("nan")})
        with pytest.raises(ValueError, match="metrics: not JSON-serialisable"):
            version.manifest_fields(metrics={"auc": object()})
        version.save_bytes("ok.bin", b"ok")
        manifest = version.publish()
    assert list(manifest.artifacts) == ["ok.bin"]
    assert visible_entries(store_path / manifest.version) == [MANIFEST_FILE, "ok.bin"]


# --- pruning, rollback, deletion ----------------------------------------------------------------------
def test_prune_keeps_n_and_never_the_current(publish_version: PublishVersion, store_path: Path) -> None:
    names = [publish_version() for _ in range(6)]
    store = ModelStore(store_path)
    store.rollback(names[0])
    assert store.prune(3) == names[1:4]
    assert [info.name for info in store.versions()] == [names[0], names[4], names[5]]
    assert store.current() == names[0]
    assert store.prune(3) == []
    with pytest.raises(ValueError, match="keep: expected a whole number >= 1"):
        store.prune(0)


def test_publish_prunes_but_spares_current_and_the_new_version(
    publish_version: PublishVersion, store_path: Path
) -> None:
    names = [publish_version() for _ in range(3)]
    store = ModelStore(store_path)
    store.rollback(names[0])
    newest = publish_version(make_current=False, keep=1)
    assert [info.name for info in store.versions()] == [names[0], newest]
    assert store.current() == names[0]
    latest = publish_version(keep=2)
    assert [info.name for info in store.versions()] == [newest, latest]
    assert store.current() == latest


def test_publish_prunes_to_five_by_default(store_path: Path) -> None:
    for minute in range(7):
        with VersionWriter(store_path, now=T0 + timedelta(minutes=minute)) as version:
            version.save_bytes("a.bin", bytes([minute]))
            version.publish()
    assert len(ModelStore(store_path).versions()) == 5


def test_rollback(publish_version: PublishVersion, store_path: Path) -> None:
    first, second = publish_version(), publish_version()
    store = ModelStore(store_path)
    assert store.rollback(first) == second
    assert store.current() == first
    assert (store_path / CURRENT_FILE).read_text() == f"{first}\n"
    assert [info.is_current for info in store.versions()] == [True, False]
    with pytest.raises(VersionNotFound, match=rf"no version 'nope' in {re.escape(str(store_path))} \(have: "):
        store.rollback("nope")
    with pytest.raises(ValueError, match="path separator"):
        store.rollback("../store")
    assert store.current() == first


def test_rollback_refuses_a_corrupt_version(publish_version: PublishVersion, store_path: Path) -> None:
    first, second = publish_version(), publish_version()
    (store_path / first / "config/merge.json").write_text("{}")
    store = ModelStore(store_path)
    with pytest.raises(StoreIntegrityError, match=r"config/merge\.json: size mismatch"):
        store.rollback(first)
    assert store.current() == second


def test_delete(publish_version: PublishVersion, store_path: Path) -> None:
    first, second = publish_version(), publish_version()
    store = ModelStore(store_path)
    with pytest.raises(StoreError, match=r"refusing to delete version .* it is the current version"):
        store.delete(second)
    store.delete(first)
    assert [info.name for info in store.versions()] == [second]
    assert visible_entries(store_path) == [second, CURRENT_FILE]
    with pytest.raises(VersionNotFound):
        store.delete(first)


# --- verification --------------------------------------------------------------------------------------
def test_verify_detects_a_flipped_byte(publish_version: PublishVersion, store_path: Path) -> None:
    name = publish_version()
    path = store_path / name / "itemcf/neighbors.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        StoreIntegrityError, match=rf"version '{name}': itemcf/neighbors\.npy: sha256 mismatch"
    ):
        ModelStore(store_path).verify(name)


def test_verify_detects_a_missing_file(publish_version: PublishVersion, store_path: Path) -> None:
    name = publish_version()
    (store_path / name / "config/merge.json").unlink()
    with pytest.raises(StoreIntegrityError, match=r"config/merge\.json: missing"):
        ModelStore(store_path).verify(name)


def test_verify_detects_an_extra_file(publish_version: PublishVersion, store_path: Path) -> None:
    name = publish_version()
    (store_path / name / "itemcf/stray.npy").write_bytes(b"")
    with pytest.raises(StoreIntegrityError, match=r"itemcf/stray\.npy: file is not in the manifest"):
        ModelStore(store_path).verify(name)


# --- locations, CURRENT and incomplete versions ------------------------------------------------------
def test_file_urls_and_paths_name_the_same_store(publish_version: PublishVersion, store_path: Path) -> None:
    name = publish_version()
    by_url = ModelStore(f"file://{store_path}")
    assert by_url.path == store_path
    assert by_url.current() == name
    assert ModelStore(store_path).current() == name
    assert ModelStore(str(store_path)).current() == name


@pytest.mark.parametrize("location", ["s3://bucket/store", "gs://bucket/store", "http://host/store"])
def test_remote_schemes_are_refused(location: str) -> None:
    scheme = location.split(":")[0]
    with pytest.raises(ValueError, match=f"unsupported store URL scheme '{scheme}'"):
        ModelStore(location)
    with pytest.raises(ValueError, match=f"unsupported store URL scheme '{scheme}'"):
        VersionWriter(location)


def test_a_missing_store_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no model store at .*absent: no such directory"):
        ModelStore(tmp_path / "absent")
    with pytest.raises(ValueError, match="names no directory"):
        ModelStore("file://")


def test_current_naming_a_missing_version(publish_version: PublishVersion, store_path: Path) -> None:
    name = publish_version()
    (store_path / CURRENT_FILE).write_text("20200101T000000Z-abcdef\n")
    store = ModelStore(store_path)
    with pytest.raises(
        StoreIntegrityError,
        match=rf"CURRENT in .* names version '20200101T000000Z-abcdef', which does not exist "
        rf"\(have: {name}\)",
    ):
        store.current()
    assert [info.is_current for info in store.versions()] == [False]
    store.rollback(name)
    assert store.current() == name


def test_current_naming_an_incomplete_version(publish_version: PublishVersion, store_path: Path) -> None:
    publish_version()
    (store_path / "half").mkdir()
    (store_path / CURRENT_FILE).write_text("half\n")
    with pytest.raises(
        StoreIntegrityError,
        match=f"CURRENT in .* names version 'half', which is incomplete: it has no {MANIFEST_FILE}",
    ):
        ModelStore(store_path).current()


def test_current_with_an_unsafe_name(store_path: Path) -> None:
    store_path.mkdir()
    (store_path / CURRENT_FILE).write_text("../elsewhere\n")
    with pytest.raises(StoreIntegrityError, match=r"CURRENT in .* is invalid: .*path separator"):
        ModelStore(store_path).current()


def test_incomplete_versions_are_never_listed(publish_version: PublishVersion, store_path: Path) -> None:
    name = publish_version()
    (store_path / "no-manifest").mkdir()
    (store_path / "bad-manifest").mkdir()
    (store_path / "bad-manifest" / MANIFEST_FILE).write_text("{not json")
    (store_path / ".staging-x-123").mkdir()
    store = ModelStore(store_path)
    assert [info.name for info in store.versions()] == [name]
    with pytest.raises(
        StoreIntegrityError, match=r"'bad-manifest' is incomplete: manifest\.json: manifest: not valid JSON"
    ):
        store.manifest("bad-manifest")
    with pytest.raises(StoreIntegrityError, match="incomplete"):
        store.version_path("no-manifest")
    assert store.prune(1) == []


GOOD_MANIFEST: dict[str, Any] = {
    "format_version": 1,
    "version": "v1",
    "created_at": "2024-05-01T12:00:00Z",
    "artifacts": {"a.npy": {"sha256": "0" * 64, "bytes": 3}},
}


def test_a_minimal_manifest_reads() -> None:
    manifest = Manifest.from_dict(GOOD_MANIFEST)
    assert manifest.created_at == T0
    assert manifest.metrics == {}
    assert "code_version" not in manifest.to_dict()
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"version": "../x"}, "invalid version name"),
        ({"version": None}, "version: expected str"),
        ({"created_at": "2024-05-01T12:00:00"}, "timezone-aware"),
        ({"artifacts": {"../a": {"sha256": "0" * 64, "bytes": 1}}}, "must stay inside"),
        ({"artifacts": {"a": {"sha256": "xyz", "bytes": 1}}}, "64 lowercase hex"),
        ({"artifacts": {"a": {"sha256": "0" * 64, "bytes": True}}}, r"artifacts\['a'\]\.bytes: expected int"),
        ({"artifacts": {"a": {"sha256": "0" * 64}}}, r"artifacts\['a'\]\.bytes is missing"),
        ({"metrics": []}, "metrics: expected dict"),
    ],
)
def test_invalid_manifests_are_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Manifest.from_dict({**GOOD_MANIFEST, **change})


def test_a_manifest_without_a_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version is missing"):
        Manifest.from_dict({key: value for key, value in GOOD_MANIFEST.items() if key != "version"})
