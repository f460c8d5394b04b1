"""The on-disk format of a model store, shared by the writer and the reader.

```
<store>/CURRENT                     the current version's name + "\\n", replaced atomically
<store>/<version>/manifest.json     what the version holds, with a checksum per file
<store>/<version>/<artifacts>       .onnx models, .npy arrays, .json data, in sub-directories
<store>/.staging-<version>-<random> a version being written; hidden until renamed into place
```

A version directory appears in one `os.replace` of a fully written and verified staging
directory, so a reader sees either a complete version or none. Names starting with "." are
never versions: staging, temporary and to-be-deleted directories all hide behind the dot.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.errors import RecsysError

FORMAT_VERSION = 1
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
STAGING_PREFIX = ".staging-"
DELETING_PREFIX = ".deleting-"

# The manifest sections that callers fill (opaque to the store), in the order `show` lists them.
SECTIONS = ("capabilities", "metrics", "defaults", "feature_spec", "data_source", "training_config", "extra")

_GENERATED_NAME = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_NAME_LENGTH = 128
_HASH_CHUNK = 1 << 20

logger = logging.getLogger(__name__)


class StoreError(RecsysError):
    """The model store cannot do what was asked (no such version, refusing to delete CURRENT, …)."""


class VersionNotFound(StoreError):
    """A version named by the caller or by CURRENT is not in the store."""


class StoreIntegrityError(StoreError):
    """What is on disk does not match what the manifest promises, or CURRENT points nowhere."""


class IncompleteVersion(StoreIntegrityError):
    """A version directory without a valid manifest.json: never listed, never loaded."""

    def __init__(self, version: str, problem: str) -> None:
        super().__init__(f"version {version!r} is incomplete: {problem}")
        self.version = version
        self.problem = problem


# --- locations and names ----------------------------------------------------------------
def parse_store_location(location: str | os.PathLike[str]) -> Path:
    """`PATH` or `file://PATH` → the store directory. Remote schemes are not supported (yet)."""
    if isinstance(location, os.PathLike):
        return Path(location)
    if not isinstance(location, str):
        raise TypeError(f"store location must be a path or a file:// URL, got {type(location).__name__}")
    text = location
    scheme = _SCHEME.match(text)
    if scheme is not None:
        if scheme.group(1).lower() != "file":
            raise ValueError(
                f"unsupported store URL scheme {scheme.group(1)!r} in {location!r}: "
                "use a local path or file://PATH"
            )
        text = text[scheme.end() :]
    if not text:
        raise ValueError(f"store location {location!r} names no directory")
    return Path(text)


def new_version_name(now: datetime | None = None) -> str:
    """A sortable version name: `YYYYMMDDTHHMMSSZ-<6 hex>` (UTC creation time + random suffix)."""
    moment = utc(now) if now is not None else datetime.now(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def is_generated_name(name: str) -> bool:
    return _GENERATED_NAME.fullmatch(name) is not None


def validate_version_name(name: str) -> str:
    """Return `name` if it can name a version directory; raise ValueError saying why not.

    Names come from CURRENT and the command line, so they must never reach outside the store:
    no path separators, no "..", no leading "." (reserved for staging directories)."""
    if not isinstance(name, str):
        raise TypeError(f"version name must be a string, got {type(name).__name__}")
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "contains a path separator"
    elif ".." in name:
        problem = "contains '..'"
    elif name.startswith("."):
        problem = "starts with '.' (reserved for staging directories)"
    elif any(not character.isprintable() or character.isspace() for character in name):
        problem = "contains whitespace or control characters"
    elif name == CURRENT_FILE:
        problem = f"is reserved for the {CURRENT_FILE} file"
    elif len(name) > _MAX_NAME_LENGTH:
        problem = f"is longer than {_MAX_NAME_LENGTH} characters"
    if problem is not None:
        raise ValueError(f"invalid version name {name!r}: it {problem}")
    return name


def artifact_key(relative_path: str) -> str:
    """Check an artifact's path relative to its version directory and return it.

    Keys are POSIX paths without ".", ".." or empty components, so one key names one file and
    every file stays inside its version."""
    if not isinstance(relative_path, str):
        raise TypeError(f"artifact path must be a string, got {type(relative_path).__name__}")
    problem = None
    if not relative_path:
        problem = "is empty"
    elif relative_path.startswith("/") or os.path.isabs(relative_path):
        problem = "is absolute; give a path relative to the version directory"
    elif "\\" in relative_path or "\x00" in relative_path:
        problem = "contains a backslash or NUL; use '/' between directories"
    elif any(part in ("", ".", "..") for part in relative_path.split("/")):
        problem = "must not contain '..', '.' or empty components (it must stay inside the version)"
    elif relative_path == MANIFEST_FILE:
        problem = "is reserved for the manifest"
    if problem is not None:
        raise ValueError(f"artifact path {relative_path!r} {problem}")
    return relative_path


# --- time ---------------------------------------------------------------------------------
def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with a Z, to the millisecond: `2024-05-01T12:00:00.000Z`."""
    return utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    return utc(datetime.fromisoformat(text))


# --- the manifest ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactEntry:
    """One file of a version: its SHA-256 (hex) and size in bytes (`"bytes"` in the JSON)."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """`manifest.json`: what a version holds and how it was made.

    `artifacts` lists every file of the version except manifest.json itself, keyed by its
    POSIX path relative to the version directory. The other sections are opaque to the store:
    the trainer fills them and the services read them."""

    version: str
    created_at: datetime
    artifacts: dict[str, ArtifactEntry]
    code_version: dict[str, str] = field(default_factory=dict)
    feature_spec: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    data_source: dict[str, Any] = field(default_factory=dict)
    training_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.artifacts.values())

    def headline_metrics(self, limit: int = 3) -> dict[str, float]:
        """A few numbers worth showing in a listing.

        `metrics["headline"]` may name them (dotted paths into nested sections, e.g.
        `"ranker.auc"`); otherwise the first `limit` numeric metrics in key order."""
        flat = _flatten_numbers(self.metrics)
        chosen = self.metrics.get("headline")
        if isinstance(chosen, list) and all(isinstance(name, str) for name in chosen):
            return {name: flat[name] for name in chosen if name in flat}
        return dict(sorted(flat.items())[:limit])

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "format_version": self.format_version,
            "version": self.version,
            "created_at": format_timestamp(self.created_at),
            "artifacts": {
                key: {"sha256": entry.sha256, "bytes": entry.size} for key, entry in self.artifacts.items()
            },
        }
        if self.code_version:
            document["code_version"] = dict(self.code_version)
        for section in SECTIONS:
            document[section] = getattr(self, section)
        return document

    def to_json(self) -> str:
        return dumps_json(self.to_dict())

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Manifest:
        """Read and check a manifest. Unknown keys are ignored, so that a section added later
        within format 1 does not make older readers refuse the version."""
        if not isinstance(document, Mapping):
            raise ValueError(f"manifest: expected a JSON object, got {type(document).__name__}")
        format_version = _field(document, "format_version", int)
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"manifest: format_version {format_version} is not supported "
                f"(this code reads {FORMAT_VERSION})"
            )
        version = _field(document, "version", str)
        try:
            validate_version_name(version)
            created_at = parse_timestamp(_field(document, "created_at", str))
        except ValueError as error:
            raise ValueError(f"manifest: {error}") from None
        artifacts: dict[str, ArtifactEntry] = {}
        for key, entry in _field(document, "artifacts", dict).items():
            try:
                artifact_key(key)
            except (TypeError, ValueError) as error:
                raise ValueError(f"manifest: artifacts: {error}") from None
            where = f"artifacts[{key!r}]"
            sha256 = _field(entry, "sha256", str, where)
            size = _field(entry, "bytes", int, where)
            if _SHA256.fullmatch(sha256) is None:
                raise ValueError(
                    f"manifest: {where}.sha256: expected 64 lowercase hex digits, got {sha256!r}"
                )
            if size < 0:
                raise ValueError(f"manifest: {where}.bytes: expected a size >= 0, got {size}")
            artifacts[key] = ArtifactEntry(sha256=sha256, size=size)
        code_version = _field(document, "code_version", dict, default={})
        if not all(isinstance(value, str) for value in code_version.values()):
            raise ValueError("manifest: code_version: expected string values")
        sections = {section: _field(document, section, dict, default={}) for section in SECTIONS}
        return cls(
            version=version,
            created_at=created_at,
            artifacts=artifacts,
            code_version=code_version,
            format_version=format_version,
            **sections,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            document = json.loads(text)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"manifest: not valid JSON ({error})") from None
        return cls.from_dict(document)


def _field(
    document: Mapping[str, Any],
    name: str,
    kind: type[Any],
    where: str = "",
    default: Any = None,
) -> Any:
    label = f"{where}.{name}" if where else name
    if not isinstance(document, Mapping):
        raise ValueError(f"manifest: {where}: expected a JSON object, got {type(document).__name__}")
    if name not in document:
        if default is not None:
            return default
        raise ValueError(f"manifest: {label} is missing")
    value = document[name]
    # bool is an int in Python but not a count or a size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"manifest: {label}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _flatten_numbers(section: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def dumps_json(document: Any) -> str:
    """The store's JSON: sorted keys, indent 2, strict (NaN and infinities are refused)."""
    return json.dumps(document, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


# --- files ---------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_files(directory: Path, manifest: Manifest) -> None:
    """Check that `directory` holds exactly the manifest's artifacts with their sizes and
    checksums. Raise StoreIntegrityError naming the first bad file."""
    label = f"version {manifest.version!r}"
    # Sizes first: a missing or truncated file is found without hashing gigabytes.
    for key, entry in sorted(manifest.artifacts.items()):
        path = directory / key
        if path.is_symlink() or not path.is_file():
            problem = "missing" if not path.exists() and not path.is_symlink() else "not a regular file"
            raise StoreIntegrityError(f"{label}: {key}: {problem}")
        size = path.stat().st_size
        if size != entry.size:
            raise StoreIntegrityError(
                f"{label}: {key}: size mismatch (manifest {entry.size} bytes, file {size} bytes)"
            )
    for key, entry in sorted(manifest.artifacts.items()):
        digest = file_sha256(directory / key)
        if digest != entry.sha256:
            raise StoreIntegrityError(
                f"{label}: {key}: sha256 mismatch (manifest {entry.sha256[:12]}…, file {digest[:12]}…)"
            )
    for key in list_files(directory):
        if key not in manifest.artifacts:
            raise StoreIntegrityError(f"{label}: {key}: file is not in the manifest")


def list_files(directory: Path) -> list[str]:
    """Every entry under `directory` that is not a directory, as sorted POSIX keys, without
    the top-level manifest.json. Symbolic links are listed (and refused by the callers)."""
    keys = []
    for root, directories, files in os.walk(directory, onerror=_raise):
        relative = Path(root).relative_to(directory)
        # os.walk does not descend into symlinked directories; report them as entries.
        entries = files + [name for name in directories if (Path(root) / name).is_symlink()]
        for name in entries:
            key = (relative / name).as_posix()
            if key != MANIFEST_FILE:
                keys.append(key)
    return sorted(keys)


def _raise(error: OSError) -> None:
    # os.walk skips directories it cannot read; a checksum pass must not.
    raise error


def write_file_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable. Some filesystems cannot
    fsync a directory; there the rename is as durable as the platform allows."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EISDIR):
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def write_current(store_path: Path, version: str) -> None:
    """Point CURRENT at `version` atomically: temp file in the store, fsync, os.replace.

    If this raises, CURRENT is unchanged: nothing after the os.replace can fail."""
    validate_version_name(version)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{CURRENT_FILE}-", suffix=".tmp", dir=store_path)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(f"{version}\n".encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, store_path / CURRENT_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:
        fsync_directory(store_path)
    except OSError as error:  # CURRENT has changed already; report, do not pretend it has not
        logger.warning("could not fsync %s after updating %s: %s", store_path, CURRENT_FILE, error)


def remove_version_directory(path: Path) -> None:
    """Remove a version so that no reader ever sees it half deleted: rename it out of sight
    first, or, if that fails, drop its manifest (an incomplete version is never listed)."""
    hidden = path.with_name(f"{DELETING_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        os.replace(path, hidden)
    except OSError:
        (path / MANIFEST_FILE).unlink(missing_ok=True)
        hidden = path
    shutil.rmtree(hidden, ignore_errors=True)
