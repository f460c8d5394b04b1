"""Writing a new version: stage, checksum, verify, then publish with one rename.

```python
with VersionWriter("store") as version:
    version.save_array("itemcf/neighbors.npy", neighbors)
    version.save_bytes("ranker/ranker.onnx", onnx_bytes)
    version.manifest_fields(capabilities={"channels": ["itemcf"]}, metrics={"recall@50": 0.31})
    version.verify_with(load_every_onnx_file)
    version.publish()
```

Nothing is visible until `publish()` succeeds: artifacts go to a hidden staging directory,
which becomes `<store>/<version>` in one `os.replace` once the manifest is written and
verified; only then does CURRENT move. Any failure on the way, or leaving the `with` block
without publishing, deletes the staging directory and leaves CURRENT as it was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import recsys
from recsys.store.layout import (
    MANIFEST_FILE,
    STAGING_PREFIX,
    ArtifactEntry,
    Manifest,
    StoreError,
    StoreIntegrityError,
    artifact_key,
    check_files,
    dumps_json,
    fsync_directory,
    list_files,
    new_version_name,
    remove_version_directory,
    utc,
    validate_version_name,
    write_current,
    write_file_durably,
)
from recsys.store.reader import ModelStore

logger = logging.getLogger(__name__)

Verifier = Callable[[Path], object]
_State = Literal["new", "open", "publishing", "published", "closed"]


class VersionWriter:
    """Writes one version of `store` (a ModelStore, a path or a file:// URL).

    `version` defaults to a fresh `new_version_name(now)`; `now` (timezone-aware) is the
    creation time recorded in the manifest."""

    def __init__(
        self,
        store: ModelStore | str | os.PathLike[str],
        version: str | None = None,
        *,
        now: datetime | None = None,
    ) -> None:
        self.store = store if isinstance(store, ModelStore) else ModelStore(store, create=True)
        self.created_at = utc(now) if now is not None else datetime.now(UTC)
        self.version = (
            validate_version_name(version) if version is not None else new_version_name(self.created_at)
        )
        self._state: _State = "new"
        self._staging: Path | None = None
        self._written: dict[str, ArtifactEntry] = {}  # what save_* wrote, to catch later changes
        self._sections: dict[str, dict[str, Any]] = {}
        self._verifiers: list[Verifier] = []

    def __repr__(self) -> str:
        return f"VersionWriter({self.store.location!r}, version={self.version!r}, state={self._state!r})"

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> VersionWriter:
        if self._state != "new":
            raise StoreError(f"VersionWriter for {self.version!r} can be entered only once")
        if (self.store.path / self.version).exists():
            raise StoreError(f"version {self.version!r} already exists in {self.store}")
        self._staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.version}-", dir=self.store.path))
        self._state = "open"
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._state == "open" and kind is None:
            logger.warning("version %s was not published: its staging directory is discarded", self.version)
        self._discard()

    @property
    def staging_path(self) -> Path:
        """The staging directory (only while the writer is open)."""
        return self._require_open()

    # --- artifacts --------------------------------------------------------------------------
    def path_for(self, relative_path: str) -> Path:
        """Where to put an artifact a library writes itself (parent directories are created).
        Its checksum is taken at publish."""
        staging = self._require_open()
        key = artifact_key(relative_path)
        path = staging / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.resolve().is_relative_to(staging.resolve()):
            raise ValueError(f"artifact path {relative_path!r} leads outside the version directory")
        self._written.pop(key, None)
        return path

    def save_bytes(self, relative_path: str, data: bytes) -> Path:
        path = self.path_for(relative_path)
        with _removed_on_failure(path):
            write_file_durably(path, data)
        self._written[relative_path] = ArtifactEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        return path

    def save_json(self, relative_path: str, data: Any) -> Path:
        """Save JSON-serialisable data (sorted keys, indent 2; NaN refused) as a .json file."""
        _require_suffix(relative_path, ".json")
        return self.save_bytes(relative_path, dumps_json(data).encode())

    def save_array(self, relative_path: str, array: npt.ArrayLike) -> Path:
        """Save an array as a .npy file (no pickles: object arrays are refused)."""
        _require_suffix(relative_path, ".npy")
        values = np.asarray(array)
        if values.dtype.hasobject:
            raise ValueError(f"{relative_path}: object arrays cannot be saved (they need pickle)")
        path = self.path_for(relative_path)
        with _removed_on_failure(path), path.open("wb") as file:
            hashing = _HashingWriter(file)
            np.save(hashing, values, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())
        self._written[relative_path] = ArtifactEntry(sha256=hashing.hexdigest(), size=hashing.size)
        return path

    # --- manifest and verification ------------------------------------------------------------
    def manifest_fields(
        self,
        *,
        feature_spec: Mapping[str, Any] | None = None,
        capabilities: Mapping[str, Any] | None = None,
        data_source: Mapping[str, Any] | None = None,
        training_config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Fill manifest sections. Calls merge: nested objects merge key by key, anything else
        is replaced by the later call. Values must be JSON (checked now, not at publish)."""
        self._require_open()
        given = {
            "feature_spec": feature_spec,
            "capabilities": capabilities,
            "data_source": data_source,
            "training_config": training_config,
            "metrics": metrics,
            "defaults": defaults,
            "extra": extra,
        }
        for section, values in given.items():
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise TypeError(f"{section}: expected a mapping, got {type(values).__name__}")
            try:
                dumps_json(values)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{section}: not JSON-serialisable: {error}") from None
            self._sections[section] = _merge(self._sections.get(section, {}), values)

    def verify_with(self, verifier: Verifier) -> None:
        """Run `verifier(staging_directory)` before publishing (e.g. load every ONNX file);
        an exception aborts the publish."""
        self._require_open()
        self._verifiers.append(verifier)

    # --- publish -------------------------------------------------------------------------------
    def publish(self, *, make_current: bool = True, keep: int | None = 5) -> Manifest:
        """Checksum, write manifest.json, verify, rename into place, then (if `make_current`)
        point CURRENT at the new version and prune to `keep` versions (None: no pruning).

        On any failure the staging directory is removed, CURRENT is unchanged and no new
        version is listed."""
        staging = self._require_open()
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep: expected a whole number >= 1 or None, got {keep!r}")
        self._state = "publishing"
        try:
            manifest = Manifest(
                version=self.version,
                created_at=self.created_at,
                artifacts=self._checksum(staging),
                code_version=code_version(),
                feature_spec=self._sections.get("feature_spec", {}),
                capabilities=self._sections.get("capabilities", {}),
                data_source=self._sections.get("data_source", {}),
                training_config=self._sections.get("training_config", {}),
                metrics=self._sections.get("metrics", {}),
                defaults=self._sections.get("defaults", {}),
                extra=self._sections.get("extra", {}),
            )
            write_file_durably(staging / MANIFEST_FILE, manifest.to_json().encode())
            for verifier in self._verifiers:
                try:
                    verifier(staging)
                except Exception as error:
                    raise StoreIntegrityError(
                        f"version {self.version!r} failed verification by {_name_of(verifier)}: {error}"
                    ) from error
            # Last, so that it also catches a verifier that changed or added files.
            check_files(staging, manifest)
            for directory in _directories(staging):
                fsync_directory(directory)
            self._install(staging, make_current=make_current)
        except BaseException:
            self._state = "closed"
            self._discard()
            raise
        self._state = "published"
        self._staging = None
        if keep is not None:
            try:
                self.store.prune(keep, protect=frozenset({self.version}))
            except (OSError, StoreError) as error:  # the version is published; pruning can wait
                logger.warning("published %s but could not prune %s: %s", self.version, self.store, error)
        return manifest

    def _checksum(self, staging: Path) -> dict[str, ArtifactEntry]:
        artifacts = {}
        for key in list_files(staging):
            path = staging / key
            if path.is_symlink() or not path.is_file():
                raise StoreError(f"version {self.version!r}: {key}: only regular files can be artifacts")
            artifact_key(key)
            with path.open("rb") as file:
                entry = ArtifactEntry(
                    sha256=hashlib.file_digest(file, "sha256").hexdigest(),
                    size=os.fstat(file.fileno()).st_size,
                )
                os.fsync(file.fileno())  # files that libraries wrote via path_for were never synced
            written = self._written.get(key)
            if written is not None and written != entry:
                raise StoreIntegrityError(
                    f"version {self.version!r}: {key} changed after it was saved "
                    f"(saved {written.size} bytes sha256 {written.sha256[:12]}…, "
                    f"now {entry.size} bytes sha256 {entry.sha256[:12]}…)"
                )
            artifacts[key] = entry
        missing = sorted(set(self._written) - set(artifacts))
        if missing:
            raise StoreIntegrityError(f"version {self.version!r}: {missing[0]} was saved but is gone")
        return artifacts

    def _install(self, staging: Path, *, make_current: bool) -> None:
        final = self.store.path / self.version
        if final.exists():
            raise StoreError(f"version {self.version!r} already exists in {self.store}")
        # A directory rename does not replace a non-empty directory, so a concurrent writer
        # of the same name makes this fail instead of clobbering.
        os.replace(staging, final)
        self._staging = None
        try:
            fsync_directory(self.store.path)
            if make_current:
                write_current(self.store.path, self.version)
        except BaseException:
            # CURRENT did not move (write_current cannot fail after its rename): withdraw the
            # version so that a failed publish leaves nothing behind.
            remove_version_directory(final)
            raise

    # --- helpers --------------------------------------------------------------------------------
    def _require_open(self) -> Path:
        if self._state != "open" or self._staging is None:
            raise StoreError(
                f"VersionWriter for {self.version!r} is {self._state}: "
                "use it inside its `with` block, before publish()"
            )
        return self._staging

    def _discard(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if self._state != "published":
            self._state = "closed"


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it, so that the checksum
    describes what np.save meant to write."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        written: int = self._file.write(data)
        return written

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@functools.cache
def _code_version() -> tuple[tuple[str, str], ...]:
    info = [("recsys", recsys.__version__)]
    source_root = Path(recsys.__file__).resolve().parent.parent
    if (source_root / ".git").exists():
        try:
            result = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=source_root,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return tuple(info)
        commit = result.stdout.strip()
        if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit):
            info.append(("git_commit", commit))
    return tuple(info)


def code_version() -> dict[str, str]:
    """recsys's version, plus the git commit when running from a git checkout."""
    return dict(_code_version())


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = _copy_json(value)
    return merged


def _copy_json(value: Any) -> Any:
    """A deep copy, so that later changes to the caller's objects do not reach the manifest."""
    if isinstance(value, Mapping):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_json(item) for item in value]
    return value


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """A half-written artifact must not be published by a caller that catches the error."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _require_suffix(relative_path: str, suffix: str) -> None:
    if not isinstance(relative_path, str) or not relative_path.endswith(suffix):
        raise ValueError(f"artifact path {relative_path!r} must end in {suffix}")


def _directories(root: Path) -> Iterable[Path]:
    yield root
    for directory, names, _ in os.walk(root):
        for name in names:
            yield Path(directory) / name


def _name_of(verifier: Verifier) -> str:
    return getattr(verifier, "__qualname__", None) or repr(verifier)
