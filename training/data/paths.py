"""Where the data sets live, and the fingerprints that tie a model store to its inputs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

DATA_DIR_VARIABLE = "RECSYS_DATA_DIR"

# training/data/paths.py → the repository root is three levels up.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path:
    """`$RECSYS_DATA_DIR` when set; else the first existing of `./../shared/data` and
    `<repo root>/../shared/data` (the layout of a development checkout)."""
    configured = os.environ.get(DATA_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    candidates = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(candidate.resolve()) for candidate in candidates)
    raise FileNotFoundError(
        f"no data directory found (tried {tried}); set {DATA_DIR_VARIABLE} or pass --data-dir"
    )


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def describe_files(paths: Iterable[Path], base: Path | None = None) -> dict[str, dict[str, int | str]]:
    """{name: {"bytes": n, "sha256": hex}} for each file, named relative to `base` (default: the
    files' common parent), for the `source` record of a `RawData`."""
    resolved = [path.resolve() for path in paths]
    if not resolved:
        return {}
    root = base.resolve() if base is not None else Path(os.path.commonpath([p.parent for p in resolved]))
    return {
        relative_name(path, root): {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in resolved
    }


def relative_name(path: Path, base: Path) -> str:
    """`path` relative to `base` with forward slashes, or the absolute path when outside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(base.resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()
