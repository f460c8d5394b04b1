"""Fetch a data set for `recsys build`: download a URL into a directory and unpack it.

The build Job's first init container runs this (in the train image) with the build settings
from the environment:

    RECSYS_BUILD_DATA_URL     http(s) URL of a .zip, .tar(.gz|.bz2|.xz) or plain file;
                              empty: do nothing (the data volume already holds the data)
    RECSYS_BUILD_DATA_SHA256  expected hex sha256 of the download; empty: not checked

An archive is unpacked as it is laid out, so the GroupLens `ml-100k.zip` becomes
`<dest>/ml-100k/u.data …`, which is what `recsys build --dataset ml-100k --data-dir <dest>`
reads. Only the standard library: the script must run in any image with Python.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

CHUNK = 1 << 20


def download(url: str, target: Path, timeout: float) -> str:
    """Stream `url` into `target`; return the hex sha256 of what was written."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"RECSYS_BUILD_DATA_URL: expected an http(s) URL, got scheme {scheme!r}")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as file:
        while chunk := response.read(CHUNK):
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def _inside(root: Path, name: str) -> bool:
    return (root / name).resolve().is_relative_to(root.resolve())


def unpack(archive: Path, dest: Path, name: str) -> None:
    """Unpack a zip or tar archive into `dest` (refusing members that escape it); copy any
    other file as `name`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                if not _inside(dest, member):
                    raise ValueError(f"{name}: member {member!r} would be written outside {dest}")
            bundle.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            bundle.extractall(dest, filter="data")  # "data" refuses links and paths outside dest
    else:
        shutil.copyfile(archive, dest / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download and unpack a data set for `recsys build`.")
    parser.add_argument("--dest", type=Path, required=True, help="directory to unpack into")
    parser.add_argument("--url", default=os.environ.get("RECSYS_BUILD_DATA_URL", ""))
    parser.add_argument("--sha256", default=os.environ.get("RECSYS_BUILD_DATA_SHA256", ""))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before failing")
    args = parser.parse_args(argv)
    if not args.url:
        print(f"fetch-data: no URL given; building from {args.dest} as mounted", file=sys.stderr)
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlsplit(args.url).path).name or "data"
    with tempfile.TemporaryDirectory(dir=args.dest) as scratch:
        archive = Path(scratch) / name
        print(f"fetch-data: downloading {args.url}", file=sys.stderr, flush=True)
        actual = download(args.url, archive, args.timeout)
        if args.sha256 and actual != args.sha256.lower():
            print(f"fetch-data: sha256 mismatch: expected {args.sha256}, got {actual}", file=sys.stderr)
            return 1
        unpack(archive, args.dest, name)
    print(f"fetch-data: {name} (sha256 {actual}) unpacked into {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
