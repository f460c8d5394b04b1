"""`recsys serve <service>`: run a gRPC service (needs the `serve` extra)."""

from __future__ import annotations

import argparse

SERVICES = ("recall",)


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


def _serve_recall(args: argparse.Namespace) -> int:
    from services.common.cli import settings_from_args
    from services.common.workers import serve
    from services.recall.app import SPEC
    from services.recall.settings import RecallSettings

    return serve(SPEC, settings_from_args(RecallSettings, args))
