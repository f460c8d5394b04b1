"""`recsys serve <service>`: run a gRPC service (needs the `serve` extra)."""

from __future__ import annotations

import argparse

SERVICES = ("recall", "rank")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.common.cli import add_server_arguments

    parser = commands.add_parser("serve", help="run a service", description="Run one of the gRPC services.")
    services = parser.add_subparsers(dest="service", metavar="SERVICE", title="services")
    services.required = True
    recall = services.add_parser("recall", help="candidate generation", description="Run the recall service.")
    add_server_arguments(recall)
    recall.add_argument("--store", help="model store PATH or file://PATH (default ./store)")
    recall.add_argument(
        "--redis", help="redis://HOST:PORT/DB for the shared feature store (default: in-process)"
    )
    recall.set_defaults(handler=_serve_recall, command="serve recall")
    rank = services.add_parser(
        "rank", help="multi-task scoring", description="Run the rank service (ONNX ranker, micro-batched)."
    )
    add_server_arguments(rank)
    rank.add_argument("--store", help="model store PATH or file://PATH (default ./store)")
    rank.add_argument(
        "--redis", help="redis://HOST:PORT/DB for the shared feature store (default: in-process)"
    )
    rank.add_argument("--scenes", dest="scenes_file", help="scenes JSON: each scene's score fusion")
    rank.add_argument(
        "--batch-window-ms", dest="batch_window_ms", type=float, help="micro-batch wait, ≤ 1 ms (default 0.5)"
    )
    rank.add_argument("--max-batch-rows", dest="max_batch_rows", type=int, help="rows per onnxruntime run")
    rank.add_argument("--max-candidates", dest="max_candidates", type=int, help="candidates per call at most")
    rank.set_defaults(handler=_serve_rank, command="serve rank")


def _serve_recall(args: argparse.Namespace) -> int:
    from services.common.cli import settings_from_args
    from services.common.workers import serve
    from services.recall.app import SPEC
    from services.recall.settings import RecallSettings

    return serve(SPEC, settings_from_args(RecallSettings, args))


def _serve_rank(args: argparse.Namespace) -> int:
    from services.common.cli import settings_from_args
    from services.common.workers import serve
    from services.rank.app import SPEC
    from services.rank.settings import RankSettings

    return serve(SPEC, settings_from_args(RankSettings, args))
