"""Reading and managing a model store: list versions, read manifests, verify, move CURRENT.

Services poll `current_marker()` (one open and fstat, no manifest parsing) and load a
version when the marker changes; `recsys store …` wraps the rest for operators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from recsys.store.layout import (
    CURRENT_FILE,
    MANIFEST_FILE,
    IncompleteVersion,
    Manifest,
    StoreError,
    StoreIntegrityError,
    VersionNotFound,
    check_files,
    parse_store_location,
    remove_version_directory,
    validate_version_name,
    write_current,
)


@dataclass(frozen=True)
class VersionInfo:
    """One complete version, as `ModelStore.versions()` lists it."""

    name: str
    created_at: datetime
    path: Path
    is_current: bool
    size_bytes: int  # the artifacts' total, from the manifest
    artifact_count: int
    metrics: dict[str, float] = field(default_factory=dict)  # a few headline metrics, if any


class ModelStore:
    """A model store directory, given as `PATH` or `file://PATH`.

    With `create=True` (what the writer uses) a missing directory is created; otherwise it
    must exist."""

    def __init__(self, location: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = parse_store_location(location)
        self.location = os.fspath(location)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            problem = "not a directory" if self.path.exists() else "no such directory"
            raise StoreError(f"no model store at {self.location}: {problem}")

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"ModelStore({self.location!r})"

    # --- CURRENT ---------------------------------------------------------------------------
    def current_marker(self) -> tuple[str | None, int]:
        """CURRENT's content (stripped) and mtime in ns, or (None, 0) without CURRENT: cheap
        enough to poll. Content and mtime come from one open file, so they agree."""
        try:
            with (self.path / CURRENT_FILE).open("rb") as file:
                mtime_ns = os.fstat(file.fileno()).st_mtime_ns
                content = file.read(4096)
        except FileNotFoundError:
            return None, 0
        return content.decode("utf-8", errors="replace").strip(), mtime_ns

    def current(self) -> str | None:
        """The current version's name, or None if CURRENT does not exist yet. Raise
        StoreIntegrityError if CURRENT names a version that is missing or incomplete."""
        name, _ = self.current_marker()
        if name is None:
            return None
        try:
            validate_version_name(name)
        except ValueError as error:
            raise StoreIntegrityError(f"{CURRENT_FILE} in {self.location} is invalid: {error}") from None
        try:
            self.manifest(name)
        except VersionNotFound:
            raise StoreIntegrityError(
                f"{CURRENT_FILE} in {self.location} names version {name!r}, which does not exist "
                f"(have: {self._names_for_message()}); roll back to one of them"
            ) from None
        except IncompleteVersion as error:
            raise StoreIntegrityError(
                f"{CURRENT_FILE} in {self.location} names version {name!r}, which is incomplete: "
                f"{error.problem}"
            ) from None
        return name

    def set_current(self, version: str) -> None:
        """Point CURRENT at `version` atomically, after checking it is complete and verifies."""
        self.verify(version)
        write_current(self.path, version)

    def rollback(self, version: str) -> str | None:
        """Make an earlier (or any other) complete version current; return the one it replaces.

        The previous CURRENT may itself be broken (that is often why one rolls back), so it is
        read without checking."""
        previous, _ = self.current_marker()
        self.set_current(version)
        return previous

    # --- versions --------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """Complete versions (a directory with a valid manifest), oldest first."""
        current, _ = self.current_marker()
        listed = []
        for entry in os.scandir(self.path):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                manifest = self._read_manifest(entry.name)
            except StoreError:
                continue
            listed.append(
                VersionInfo(
                    name=entry.name,
                    created_at=manifest.created_at,
                    path=self.path / entry.name,
                    is_current=entry.name == current,
                    size_bytes=manifest.total_bytes,
                    artifact_count=len(manifest.artifacts),
                    metrics=manifest.headline_metrics(),
                )
            )
        listed.sort(key=lambda info: (info.created_at, info.name))
        return listed

    def version_path(self, version: str) -> Path:
        """The directory of a complete version."""
        self.manifest(version)
        return self.path / version

    def manifest(self, version: str) -> Manifest:
        """The manifest of `version`. VersionNotFound if there is no such directory,
        StoreIntegrityError if its manifest is missing or invalid."""
        self._existing_directory(version)
        return self._read_manifest(version)

    def verify(self, version: str) -> None:
        """Recompute every artifact's size and sha256; raise StoreIntegrityError naming the
        first bad file (or one the manifest does not list)."""
        check_files(self.path / version, self.manifest(version))

    # --- removing versions -------------------------------------------------------------------
    def delete(self, version: str) -> None:
        """Delete a version (complete or not). Refuses the current one."""
        self._existing_directory(version)
        current, _ = self.current_marker()
        if version == current:
            raise StoreError(
                f"refusing to delete version {version!r}: it is the current version; roll back first"
            )
        remove_version_directory(self.path / version)

    def prune(self, keep: int, *, protect: frozenset[str] = frozenset()) -> list[str]:
        """Delete the oldest complete versions so that `keep` remain, never CURRENT nor any
        name in `protect`; return the names deleted. Incomplete directories are left alone."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep: expected a whole number >= 1, got {keep!r}")
        current, _ = self.current_marker()
        spared = protect | ({current} if current is not None else set())
        versions = self.versions()
        excess = len(versions) - keep
        deleted: list[str] = []
        for info in versions:  # oldest first
            if len(deleted) >= excess:
                break
            if info.name not in spared:
                remove_version_directory(info.path)
                deleted.append(info.name)
        return deleted

    # --- helpers -----------------------------------------------------------------------------
    def _existing_directory(self, version: str) -> Path:
        validate_version_name(version)
        path = self.path / version
        if not path.is_dir() or path.is_symlink():
            raise VersionNotFound(
                f"no version {version!r} in {self.location} (have: {self._names_for_message()})"
            )
        return path

    def _read_manifest(self, version: str) -> Manifest:
        path = self.path / version / MANIFEST_FILE
        try:
            manifest = Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            raise IncompleteVersion(version, f"it has no {MANIFEST_FILE}") from None
        except (OSError, ValueError) as error:
            raise IncompleteVersion(version, f"{MANIFEST_FILE}: {error}") from None
        if manifest.version != version:
            raise IncompleteVersion(version, f"its {MANIFEST_FILE} describes {manifest.version!r}")
        return manifest

    def _names_for_message(self, limit: int = 10) -> str:
        names = [info.name for info in self.versions()]
        if not names:
            return "none"
        shown = names[-limit:]
        more = f"{len(names) - limit} older, " if len(names) > limit else ""
        return more + ", ".join(shown)
