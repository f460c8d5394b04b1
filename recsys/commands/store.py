"""`recsys store …`: list, show, verify, roll back and prune the versions of a model store."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from recsys.commands.push_features import add_push_features, at_least_one

if TYPE_CHECKING:
    from datetime import datetime

    from recsys.store import ModelStore, VersionInfo

STORE_VARIABLE = "RECSYS_STORE"
DEFAULT_STORE = "./store"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "store",
        help="list, show, verify, roll back and prune model versions",
        description="Inspect and manage the versioned model store that `recsys build` writes "
        "and the services load.",
    )
    subcommands = parser.add_subparsers(dest="store_command", metavar="SUBCOMMAND", title="subcommands")
    subcommands.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="PATH",
        help=f"the store, a directory or file://PATH (default: ${STORE_VARIABLE}, else {DEFAULT_STORE})",
    )

    def add(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        subparser = subcommands.add_parser(name, parents=[common], help=help_text, description=help_text)
        # `command` names the subcommand too, so that errors read "recsys store rollback: error: …".
        subparser.set_defaults(handler=handler, command=f"store {name}")
        return subparser

    listing = add("list", _list, "List the complete versions, oldest first; * marks CURRENT.")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    show = add("show", _show, "Summarise a version's manifest (default: the current version).")
    show.add_argument("version", metavar="VERSION", nargs="?", help="the version (default: CURRENT)")
    show.add_argument("--json", action="store_true", help="print the whole manifest as JSON")

    rollback = add("rollback", _rollback, "Verify a version, then point CURRENT at it.")
    rollback.add_argument("version", metavar="VERSION", help="the version to make current")

    verify = add(
        "verify",
        _verify,
        "Recompute every artifact's checksum and size against the manifest, then run the models"
        " on a probe batch (outputs must be finite and in range).",
    )
    verify.add_argument("version", metavar="VERSION", nargs="?", help="the version (default: CURRENT)")

    prune = add("prune", _prune, "Delete the oldest versions, keeping N (never the current one).")
    prune.add_argument("--keep", metavar="N", type=at_least_one, required=True, help="versions to keep")

    add_push_features(subcommands)


# --- handlers --------------------------------------------------------------------------------
def _list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    versions = store.versions()
    if args.json:
        print(json.dumps([_info_json(info) for info in versions], indent=2))
    elif not versions:
        print(f"no versions in {store}")
    else:
        _print_table(versions)
    current, _ = store.current_marker()
    if current is not None and not any(info.is_current for info in versions):
        print(
            f"warning: CURRENT names {current!r}, which is not a complete version; "
            "use `recsys store rollback VERSION`",
            file=sys.stderr,
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    version = _version_argument(store, args.version)
    manifest = store.manifest(version)
    is_current = store.current_marker()[0] == version
    if args.json:
        document = manifest.to_dict()
        document.update(
            current=is_current,
            path=str(store.path / version),
            artifact_count=len(manifest.artifacts),
            total_bytes=manifest.total_bytes,
        )
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    code = f"recsys {manifest.code_version.get('recsys', 'unknown')}"
    if "git_commit" in manifest.code_version:
        code += f" (git {manifest.code_version['git_commit']})"
    rows = [
        ("version", f"{version} (current)" if is_current else version),
        ("created", _timestamp(manifest.created_at)),
        ("code", code),
        ("path", str(store.path / version)),
        ("artifacts", f"{_count(len(manifest.artifacts), 'file')}, {_human_size(manifest.total_bytes)}"),
    ]
    width = max(len(label) for label in ("training_config", *(label for label, _ in rows)))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    from recsys.store.layout import SECTIONS

    for section in SECTIONS:
        values: dict[str, Any] = getattr(manifest, section)
        if not values:
            continue
        print(f"{section}:")
        for key, value in sorted(values.items()):
            print(f"  {key:<{width - 2}}  {json.dumps(value, sort_keys=True)}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    store = _open_store(args)
    version = _version_argument(store, args.version)
    previous = store.rollback(version)
    if previous == version:
        print(f"{version} verified; it was already current")
    else:
        print(f"CURRENT: {previous or '(none)'} -> {version}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    store = _open_store(args)
    version = _version_argument(store, args.version)
    store.verify(version)
    manifest = store.manifest(version)
    size = _human_size(manifest.total_bytes)
    print(f"ok: {version}: {_count(len(manifest.artifacts), 'artifact')}, {size}, checksums match")
    # Then what the services do at load: the models must answer a probe batch sanely.
    from recsys.probe import probe
    from recsys.serving_model import FEATURE_SPEC, ServingModel

    path = store.version_path(version)
    if not (path / FEATURE_SPEC).exists():  # the store format holds any artifacts, not only models
        print(f"ok: {version}: no models to probe")
        return 0
    report = probe(ServingModel.load(path, version=version), path)
    print(f"ok: {version}: {report.summary()}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    store = _open_store(args)
    deleted = store.prune(args.keep)
    for name in deleted:
        print(f"deleted {name}")
    if not deleted:
        count = len(store.versions())
        print(f"nothing to prune: {_count(count, 'version')}, keeping up to {args.keep}")
    return 0


# --- arguments -----------------------------------------------------------------------------------
def _open_store(args: argparse.Namespace) -> ModelStore:
    from recsys.store import ModelStore, StoreError

    if args.store:
        location, source, hint = args.store, "--store", ""
    elif os.environ.get(STORE_VARIABLE):
        location, source, hint = os.environ[STORE_VARIABLE], f"${STORE_VARIABLE}", ""
    else:
        location, source, hint = DEFAULT_STORE, "--store", f" (set --store or ${STORE_VARIABLE})"
    try:
        return ModelStore(location)
    except (StoreError, ValueError) as error:
        raise StoreError(f"{source}: {error}{hint}") from None


def _version_argument(store: ModelStore, name: str | None) -> str:
    """The version the VERSION argument names (CURRENT when omitted), known to exist."""
    from recsys.store import StoreError, VersionNotFound

    if name is None:
        current = store.current()
        if current is None:
            raise StoreError(f"VERSION: none given and {store} has no CURRENT version yet")
        return current
    try:
        store.version_path(name)
    except (VersionNotFound, ValueError) as error:
        raise StoreError(f"VERSION: {error}") from None
    return name


# --- formatting ---------------------------------------------------------------------------------
def _print_table(versions: list[VersionInfo]) -> None:
    rows = [
        (
            "*" if info.is_current else "",
            info.name,
            _timestamp(info.created_at),
            _human_size(info.size_bytes),
            "  ".join(f"{name}={value:.4g}" for name, value in info.metrics.items()),
        )
        for info in versions
    ]
    header = ("", "VERSION", "CREATED", "SIZE", "METRICS")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)]
        cells[3] = f"{row[3]:>{widths[3]}}"  # sizes align on the right
        print("  ".join(cells).rstrip())


def _info_json(info: VersionInfo) -> dict[str, Any]:
    from recsys.store.layout import format_timestamp

    return {
        "version": info.name,
        "created_at": format_timestamp(info.created_at),
        "current": info.is_current,
        "bytes": info.size_bytes,
        "artifacts": info.artifact_count,
        "metrics": info.metrics,
        "path": str(info.path),
    }


def _timestamp(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
