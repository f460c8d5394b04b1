"""Broken model versions, made as a bad export or a damaged disk would make them, in a store of
the test's own (the shared quick store is never modified)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from recsys.serving_model import RANKER
from recsys.store import MANIFEST_FILE, ArtifactEntry, Manifest, ModelStore
from recsys.store.layout import file_sha256, write_current


def _link_or_copy(source: str, target: str) -> None:
    """Hard links make a copy of a version nearly free; files that change are replaced, never
    written in place, so the source version stays intact."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_version(source: ModelStore, version: str, target: Path, name: str, *, newer_by: float = 1.0) -> str:
    """Copy `version` of `source` into the store at `target` as `name`, created `newer_by`
    seconds after the original (so that "newest" orderings see it as the later one)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.version_path(version), target / name, copy_function=_link_or_copy)
    manifest = source.manifest(version)
    _write_manifest(
        target / name,
        dataclasses.replace(
            manifest, version=name, created_at=manifest.created_at + timedelta(seconds=newer_by)
        ),
    )
    return name


def poison_ranker(store: ModelStore, version: str, value: float = float("nan")) -> None:
    """Set every float weight of the version's ranker to `value` and recompute the checksums,
    as an export of a diverged training run would: the files are consistent, the model is not."""
    path = store.path / version / RANKER
    model = onnx.load(str(path))
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if np.issubdtype(array.dtype, np.floating):
            initializer.CopyFrom(numpy_helper.from_array(np.full_like(array, value), initializer.name))
    data = model.SerializeToString()
    path.unlink()  # may be a hard link to the original version's file
    path.write_bytes(data)
    manifest = store.manifest(version)
    artifacts = dict(manifest.artifacts)
    artifacts[RANKER] = ArtifactEntry(file_sha256(path), len(data))
    _write_manifest(store.path / version, dataclasses.replace(manifest, artifacts=artifacts))


def corrupt_file(store: ModelStore, version: str, relative_path: str) -> bytes:
    """Flip a byte of one artifact without touching the manifest (a damaged disk); returns
    the original content so a test can repair it."""
    path = store.path / version / relative_path
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(damaged))
    return original


def restore_file(store: ModelStore, version: str, relative_path: str, content: bytes) -> None:
    path = store.path / version / relative_path
    path.unlink()
    path.write_bytes(content)


def make_current(store: ModelStore, version: str) -> None:
    """Point CURRENT at a version without verifying it (as a careless operator or a bad
    deploy script would)."""
    write_current(store.path, version)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    path = directory / MANIFEST_FILE
    path.unlink(missing_ok=True)
    path.write_text(manifest.to_json())
