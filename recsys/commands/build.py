"""`recsys build`: data → a new verified model version in the store (needs the `train` extra)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.errors import UsageError

if TYPE_CHECKING:  # the training code (TensorFlow) only when a build runs
    from training.build import BuildProfile

DATASETS = ("ml-100k", "book-crossing", "csv", "synthetic")

# CsvSpec field → flag, for the importer's options. --interactions, --items and --users
# are files with --dataset csv and counts with --dataset synthetic.
CSV_FLAGS = {
    "interactions": ("--interactions", str),
    "user_col": ("--user-col", str),
    "item_col": ("--item-col", str),
    "rating_col": ("--rating-col", str),
    "like_threshold": ("--like-threshold", float),
    "time_col": ("--time-col", str),
    "items": ("--items", str),
    "item_id_col": ("--item-id-col", str),
    "title_col": ("--title-col", str),
    "categories_col": ("--categories-col", str),
    "categories_sep": ("--categories-sep", str),
    "author_col": ("--author-col", str),
    "item_time_col": ("--item-time-col", str),
    "publisher_col": ("--publisher-col", str),
    "users": ("--users", str),
    "user_id_col": ("--user-id-col", str),
    "region_col": ("--region-col", str),
    "delimiter": ("--delimiter", str),
    "encoding": ("--encoding", str),
}


SYNTHETIC_DEFAULTS = {"users": 10_000, "items": 20_000, "interactions": 500_000}

# Extra Spark settings for --engine spark, one `key=value` per line: what a Spark master needs
# beyond its URL (on Kubernetes: namespace, executor image, the driver's address; see
# deploy/k8s/components/spark-build). An environment variable rather than flags, so that a
# kustomize patch can change it by name, and so that the values can use Kubernetes' $(VAR)
# expansion of the pod's own name, namespace and address.
SPARK_CONF_VARIABLE = "RECSYS_SPARK_CONF"


def _count(args: argparse.Namespace, name: str) -> int:
    value = getattr(args, f"csv_{name}")
    if value is None:
        return SYNTHETIC_DEFAULTS[name]
    try:
        count = int(str(value).replace("_", ""))
    except ValueError:
        raise UsageError(
            f"--{name}: expected a whole number with --dataset synthetic, got {value!r}"
        ) from None
    if count <= 0:
        raise UsageError(f"--{name}: must be positive, got {count}")
    return count


def spark_conf(text: str) -> tuple[tuple[str, str], ...]:
    """The `key=value` lines of RECSYS_SPARK_CONF, in order (blank lines and `#` comments are
    skipped; a value may contain `=`). Only `spark.*` keys: Spark ignores any other with no more
    than a warning, so a misspelt prefix would silently change nothing."""
    pairs: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        key, value = key.strip(), value.strip()
        where = f"{SPARK_CONF_VARIABLE} line {number}"
        if not equals or not key:
            raise UsageError(f"{where}: expected key=value, got {line!r}")
        if not key.startswith("spark."):
            raise UsageError(f"{where}: {key!r} is not a Spark setting (keys start with 'spark.')")
        if key == "spark.master":
            raise UsageError(f"{where}: the master is --spark-master, not spark.master")
        if key in pairs:  # a second line winning silently would hide the first one's mistake
            raise UsageError(f"{where}: {key} is set twice")
        pairs[key] = value
    return tuple(pairs.items())


def default_store() -> str:
    return os.environ.get("RECSYS_STORE", "./store")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "build",
        help="train, evaluate and publish a model version",
        description="Build every artifact from a data set, evaluate it on the held-out part and publish "
        "it as the store's current version (only if complete and verified).",
        epilog="Several training workers: run the same command on each, with TF_CONFIG or "
        "RECSYS_TF_WORKER_HOSTS (host:port,…) and JOB_COMPLETION_INDEX set; worker 0 publishes.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument(
        "--store", default=default_store(), help="model store PATH or file://PATH (default ./store)"
    )
    parser.add_argument("--profile", choices=("quick", "full"), default="full")
    parser.add_argument(
        "--retrieval-only",
        action="store_true",
        help="no ranker: recall artifacts only, evaluated on a sample of users (for very large catalogues)",
    )
    parser.add_argument(
        "--engine",
        choices=("numpy", "spark"),
        default="numpy",
        help="where the core artifacts (histories, popularity, statistics, authors, ItemCF, Swing) are "
        "computed: numpy in this process (default), or Spark (needs the spark extra and Java 17; the same "
        "files, for logs past one machine)",
    )
    parser.add_argument(
        "--spark-master",
        default="local[*]",
        help="Spark master URL with --engine spark (default local[*]: every core of this machine); other "
        f"Spark settings come from {SPARK_CONF_VARIABLE}, one spark.KEY=VALUE a line",
    )
    parser.add_argument(
        "--ranker-int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="publish an int8-quantised ranker if its validation NDCG@10 is within 0.005 of the fp32 one "
        "(else the fp32 ranker, and the metrics say why); default: on for --profile full, off for quick",
    )
    parser.add_argument("--data-dir", type=Path, help="directory with ml-100k/ and book-crossing-subset/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=int, default=5, help="versions to keep in the store")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    csv = parser.add_argument_group(
        "--dataset csv / synthetic",
        "--interactions, --items and --users name files for csv, and counts for synthetic "
        f"(default {SYNTHETIC_DEFAULTS['users']:,} users, {SYNTHETIC_DEFAULTS['items']:,} items, "
        f"{SYNTHETIC_DEFAULTS['interactions']:,} interactions)",
    )
    for name, (flag, kind) in CSV_FLAGS.items():
        metavar = (
            "FILE|N" if name in ("interactions", "items", "users") else ("X" if kind is float else "NAME")
        )
        csv.add_argument(flag, dest=f"csv_{name}", type=kind, metavar=metavar)
    parser.set_defaults(handler=run)


def _raw(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from training import data

    if args.dataset in ("ml-100k", "book-crossing"):
        directory = args.data_dir or data.default_data_dir()
        if not directory.is_dir():
            raise UsageError(f"--data-dir: no such directory: {directory}")
        if args.dataset == "ml-100k":
            return data.load_movielens_100k(directory)
        return data.load_book_crossing(directory)
    if args.dataset == "synthetic":
        return data.generate_synthetic(
            data.SyntheticSpec(
                users=_count(args, "users"),
                items=_count(args, "items"),
                interactions=_count(args, "interactions"),
                seed=args.seed,
            )
        )
    given = {
        name: getattr(args, f"csv_{name}") for name in CSV_FLAGS if getattr(args, f"csv_{name}") is not None
    }
    for name in ("interactions", "items", "users"):
        if name in given:
            given[name] = Path(given[name])
    for required in ("interactions", "user_col", "item_col"):
        if required not in given:
            raise UsageError(f"{CSV_FLAGS[required][0]}: required with --dataset csv")
    return data.load_csv(data.CsvSpec(**given))


def build_profile(
    args: argparse.Namespace, extra_spark_conf: tuple[tuple[str, str], ...] = ()
) -> BuildProfile:
    """The named profile as the flags adjust it."""
    from training.build import PROFILES, retrieval_only

    profile = PROFILES[args.profile]
    if args.retrieval_only:
        profile = retrieval_only(profile)
    if args.ranker_int8 is not None:  # else the profile's own choice (on for full)
        profile = dataclasses.replace(profile, ranker_int8=args.ranker_int8)
    if args.engine == "spark":
        profile = dataclasses.replace(
            profile,
            core=dataclasses.replace(
                profile.core, engine="spark", spark_master=args.spark_master, spark_conf=extra_spark_conf
            ),
        )
    return profile


def run(args: argparse.Namespace) -> int:
    if args.keep < 1:
        raise UsageError("--keep: must be at least 1")
    if args.ranker_int8 and args.retrieval_only:
        raise UsageError("--ranker-int8: a --retrieval-only build has no ranker")
    extra_spark_conf = spark_conf(os.environ.get(SPARK_CONF_VARIABLE, ""))
    if args.engine == "spark":
        _check_spark()
    elif args.spark_master != "local[*]":
        raise UsageError("--spark-master: only with --engine spark")
    elif extra_spark_conf:
        raise UsageError(f"{SPARK_CONF_VARIABLE}: only with --engine spark")
    from training.distributed import resolve_cluster

    # A multi-worker build (TF_CONFIG, or RECSYS_TF_WORKER_HOSTS with JOB_COMPLETION_INDEX):
    # a bad value fails here, naming the variable, before any data is read.
    cluster = resolve_cluster(os.environ)
    raw = _raw(args)  # data errors surface before TensorFlow is imported
    cold_start = None
    if args.dataset == "book-crossing":  # the data set with a held-out set of new items
        from training import data
        from training.cold_start import book_crossing_cold_start

        cold_start = book_crossing_cold_start(args.data_dir or data.default_data_dir())
    distribution = None
    if cluster is not None:
        from training.distributed import Distribution

        # Before anything else runs in TensorFlow: collectives are configured at its start-up.
        distribution = Distribution(cluster)
    from training.build import build, metrics_json, summary_rows

    result = build(
        raw,
        args.store,
        build_profile(args, extra_spark_conf),
        seed=args.seed,
        keep=args.keep,
        quiet=args.quiet,
        cold_start=cold_start,
        distribution=distribution,
    )
    if result is None:  # a worker other than the chief of a multi-worker build
        where = "" if cluster is None else f"worker {cluster.index} of {cluster.size}: "
        print(f"{where}trained; the chief (worker 0) evaluates and publishes", file=sys.stderr)
        return 0
    if args.json:
        print(metrics_json(result.metrics))
        return 0
    width = max(len(name) for name, _ in summary_rows(result))
    for name, value in summary_rows(result):
        print(f"{name:<{width}}  {value}")
    print(f"report: {result.path / 'eval' / 'report.md'}", file=sys.stderr)
    return 0


def _check_spark() -> None:
    """--engine spark needs PySpark, pyarrow and a Java runtime: say which is missing, in one line."""
    import importlib.util
    import shutil

    for module in ("pyspark", "pyarrow"):
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"--engine spark: {module} is not installed (pip install '.[spark]')")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise UsageError("--engine spark: no Java runtime found (Spark needs Java 17; set JAVA_HOME)")
