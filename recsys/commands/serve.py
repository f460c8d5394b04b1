"""`recsys serve <service>`: run a gRPC service (needs the `serve` extra)."""

from __future__ import annotations

import argparse

SERVICES = ("recall", "rank", "gateway")


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
    recall.add_argument(
        "--blocklist",
        dest="blocklist_file",
        help="item ids never to recall, one per line (re-read on change)",
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
    gateway = services.add_parser(
        "gateway",
        help="the public API",
        description="Run the gateway (Recommend, ReportEvents; gRPC and HTTP/JSON).",
    )
    add_server_arguments(gateway)
    gateway.add_argument("--store", help="model store PATH or file://PATH (default ./store)")
    gateway.add_argument(
        "--http-port", dest="http_port", type=int, help="HTTP/JSON port (default 8080; -1: no HTTP)"
    )
    gateway.add_argument(
        "--recall-addr", dest="recall_addr", help="recall host:port (default 127.0.0.1:50052)"
    )
    gateway.add_argument("--rank-addr", dest="rank_addr", help="rank host:port (default 127.0.0.1:50053)")
    gateway.add_argument(
        "--redis", help="redis://HOST:PORT/DB for the shared feature store (default: in-process)"
    )
    gateway.add_argument("--scenes", dest="scenes_file", help="scenes JSON (default: `default` only)")
    gateway.add_argument("--experiments", dest="experiments_file", help="experiments JSON")
    gateway.add_argument("--blocklist", dest="blocklist_file", help="item ids never to show, one per line")
    gateway.add_argument(
        "--event-log", dest="event_log", help="event log file without Redis (default events.csv)"
    )
    gateway.set_defaults(handler=_serve_gateway, command="serve gateway")


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


def _serve_gateway(args: argparse.Namespace) -> int:
    from services.common.cli import settings_from_args
    from services.common.workers import serve
    from services.gateway.app import SPEC
    from services.gateway.settings import GatewaySettings

    return serve(SPEC, settings_from_args(GatewaySettings, args))
