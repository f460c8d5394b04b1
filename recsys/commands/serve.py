"""`recsys serve <service>`: run a gRPC service (needs the `serve` extra)."""

from __future__ import annotations

import argparse
from typing import Any

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
        "--http-ui",
        dest="http_ui",
        action="store_const",
        const=True,
        help="serve the demo page at /ui and GET /v1/users/{id}/history (default off)",
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
    auth = gateway.add_argument_group("callers (off unless --auth-required; see docs/operations.md)")
    auth.add_argument(
        "--auth-required",
        dest="auth_required",
        action="store_const",
        const=True,
        help="callers must authenticate",
    )
    auth.add_argument("--auth-api-keys", dest="auth_api_keys_file", help="API keys file (sha256 of each key)")
    auth.add_argument("--auth-jwt-key", dest="auth_jwt_key_file", help="PEM public key or HS secret for JWTs")
    auth.add_argument(
        "--auth-jwt-algorithms", dest="auth_jwt_algorithms", help="comma-separated (default RS256)"
    )
    auth.add_argument("--auth-jwt-audience", dest="auth_jwt_audience", help="the `aud` a JWT must carry")
    auth.add_argument("--auth-jwt-issuer", dest="auth_jwt_issuer", help="the `iss` a JWT must carry")
    auth.add_argument(
        "--auth-service-certificates",
        dest="auth_service_certificates",
        help="comma-separated client certificate names with the recsys:service scope",
    )
    auth.add_argument(
        "--rate-limit-per-second",
        dest="rate_limit_per_second",
        type=float,
        help="per caller (default 100; 0: off)",
    )
    auth.add_argument(
        "--rate-limit-burst", dest="rate_limit_burst", type=int, help="per caller (default 200)"
    )
    hops = gateway.add_argument_group("calls to recall and rank (internal mTLS)")
    hops.add_argument(
        "--downstream-tls-ca", dest="downstream_tls_ca_file", help="CA verifying recall and rank"
    )
    hops.add_argument(
        "--downstream-tls-cert", dest="downstream_tls_cert_file", help="the gateway's client certificate"
    )
    hops.add_argument("--downstream-tls-key", dest="downstream_tls_key_file", help="its private key")
    hops.add_argument(
        "--downstream-tls-server-name",
        dest="downstream_tls_server_name",
        help="name checked in their certificates",
    )
    gateway.set_defaults(handler=_serve_gateway, command="serve gateway")


def _serve_recall(args: argparse.Namespace) -> int:
    from services.common.cli import settings_from_args
    from services.common.workers import serve
    from services.recall.app import SPEC
    from services.recall.settings import RecallSettings

    settings = settings_from_args(RecallSettings, args)
    check_ports(settings)
    return serve(SPEC, settings)


def _serve_rank(args: argparse.Namespace) -> int:
    from services.common.cli import settings_from_args
    from services.common.workers import serve
    from services.rank.app import SPEC
    from services.rank.settings import RankSettings

    settings = settings_from_args(RankSettings, args)
    check_ports(settings)
    return serve(SPEC, settings)


def _serve_gateway(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from recsys.errors import UsageError
    from services.common.cli import settings_from_args
    from services.common.settings import ClientSettings
    from services.common.workers import serve
    from services.gateway.app import SPEC
    from services.gateway.settings import GatewaySettings

    settings = settings_from_args(GatewaySettings, args)
    # The --downstream-tls-* flags fill the nested client settings (RECSYS_GATEWAY_CLIENT as JSON
    # is the environment's way); given any of them, the channels to recall and rank use TLS.
    hops = {
        name: getattr(args, f"downstream_{name}")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name")
        if getattr(args, f"downstream_{name}", None) is not None
    }
    if hops:
        try:
            client = ClientSettings(**{**settings.client.model_dump(), **hops, "tls": True})
        except ValidationError as error:
            problems = [
                f"--downstream-{_flag_name(item['loc'][0] if item['loc'] else 'tls')}: {item['msg']}"
                for item in error.errors()
            ]
            raise UsageError("; ".join(problems)) from None
        settings = settings.model_copy(update={"client": client})
    check_ports(settings, http_port=settings.http_port)
    return serve(SPEC, settings)


def check_ports(settings: Any, *, http_port: int | None = None) -> None:
    """Before anything starts: a port in use is one line naming its flag, not gRPC's error."""
    from recsys.commands.ports import check_free

    metrics_host = settings.metrics_host or settings.host
    check_free(
        [
            (f"--port {settings.port}", settings.host, settings.port),
            (f"--http-port {http_port}", settings.host, http_port),
            (f"--metrics-port {settings.metrics_port}", metrics_host, settings.metrics_port),
        ]
    )


def _flag_name(setting: object) -> str:
    return str(setting).removesuffix("_file").replace("_", "-")
