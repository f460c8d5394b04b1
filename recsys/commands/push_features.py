"""`recsys store push-features`: load a version's per-user snapshot into Redis for serving."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recsys.feature_store.push import PushProgress

REDIS_VARIABLE = "RECSYS_REDIS_URL"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def add_push_features(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `push-features` to the `recsys store` subcommands."""
    description = (
        "Load every user's training history and region of a version (default: CURRENT) into "
        "Redis, then mark the version ready. Re-running overwrites the same keys."
    )
    parser = subcommands.add_parser(
        "push-features",
        help="Load a version's user snapshots into Redis, then mark it ready.",
        description=description,
    )
    parser.add_argument(
        "--store",
        metavar="PATH",
        help="the store, a directory or file://PATH (default: $RECSYS_STORE, else ./store)",
    )
    parser.add_argument(
        "--redis", metavar="URL", help=f"the Redis to load (default: ${REDIS_VARIABLE}, else {DEFAULT_REDIS})"
    )
    parser.add_argument("--version", metavar="V", help="the version to push (default: CURRENT)")
    parser.add_argument("--prefix", metavar="P", default="recsys", help="key prefix (default: recsys)")
    parser.add_argument(
        "--batch", metavar="N", type=at_least_one, default=1_000, help="users per pipeline (default: 1000)"
    )
    parser.set_defaults(handler=_push_features, command="store push-features")


def _push_features(args: argparse.Namespace) -> int:
    from recsys.commands.store import DEFAULT_STORE, STORE_VARIABLE
    from recsys.errors import UsageError
    from recsys.feature_store.base import FeatureStoreUnavailable
    from recsys.feature_store.push import push_features, resolve_version
    from recsys.feature_store.redis_store import parse_redis_url, redact_url
    from recsys.store import ModelStore, StoreError

    url = args.redis or os.environ.get(REDIS_VARIABLE) or DEFAULT_REDIS
    source = "--redis" if args.redis or not os.environ.get(REDIS_VARIABLE) else f"${REDIS_VARIABLE}"
    try:
        parse_redis_url(url)
    except ValueError as error:
        raise UsageError(f"{source}: {error}") from None
    location = args.store or os.environ.get(STORE_VARIABLE) or DEFAULT_STORE
    try:
        store = ModelStore(location)
    except (StoreError, ValueError) as error:
        raise StoreError(f"--store: {error}") from None
    try:
        version_dir, version = resolve_version(store.path, args.version)
    except (StoreError, ValueError) as error:
        raise StoreError(f"--version: {error}") from None

    def report(progress: PushProgress) -> None:
        print(
            f"push-features: {progress.version}: {progress.done}/{progress.total} users, "
            f"{progress.written} snapshots, {_size(progress.bytes)}",
            file=sys.stderr,
            flush=True,
        )

    try:
        result = asyncio.run(
            push_features(version_dir, version, url, args.prefix, batch=args.batch, progress=report)
        )
    except FeatureStoreUnavailable as error:
        raise UsageError(f"{source}: {error}") from None
    print(
        f"pushed {result.version} to {redact_url(url)} (prefix {args.prefix!r}): {result.users} users, "
        f"{result.written} snapshots, {_size(result.bytes)} in {result.batches} batches, "
        f"{result.seconds:.1f} s; the version is ready"
    )
    return 0


def _size(size: int) -> str:
    if size < 1_048_576:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1_048_576:.1f} MiB"


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value
