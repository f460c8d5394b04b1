"""`recsys recommend` and `recsys report-event`: call a running gateway (see `recsys up`).

Output goes to stdout (a table, or with `--json` one JSON object with the proto's field
names); logs go to stderr; a gRPC error or an unreachable gateway is one line and a non-zero
exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from recsys.errors import RecsysError, UsageError

DEFAULT_ADDR = "127.0.0.1:50051"


class GatewayError(RecsysError):
    """The gateway answered with an error status or could not be reached."""


def default_addr() -> str:
    return os.environ.get("RECSYS_GATEWAY_ADDR", DEFAULT_ADDR)


def add_tls_arguments(parser: argparse.ArgumentParser, *, token: bool = True) -> None:
    """How a command reaches a gateway (or any service) that serves TLS or mTLS, and the
    bearer token it sends when the gateway requires callers to authenticate."""
    group = parser.add_argument_group("TLS and authentication")
    group.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) verifying the server; enables TLS")
    group.add_argument("--tls-cert", type=Path, help="this client's certificate (PEM), for mTLS")
    group.add_argument("--tls-key", type=Path, help="this client's private key (PEM), for mTLS")
    group.add_argument("--tls-server-name", help="name to check in the server's certificate")
    if token:
        # A token on the command line is visible in `ps`; the environment variable is not.
        group.add_argument(
            "--token",
            default=os.environ.get("RECSYS_TOKEN"),
            help="bearer token: an API key or a JWT (default $RECSYS_TOKEN)",
        )


def tls_from_args(args: argparse.Namespace) -> Any:
    """The `recsys.client.Tls` the --tls-* flags describe, or None for plaintext."""
    from recsys.client import Tls

    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key: give both or neither")
    if ca is None and cert is None:
        return None
    pems: dict[str, bytes | None] = {}
    for name, path in (("ca", ca), ("cert", cert), ("key", key)):
        try:
            pems[name] = path.read_bytes() if path is not None else None
        except OSError as error:
            raise UsageError(f"--tls-{name}: {error}") from None
    return Tls(**pems, server_name=getattr(args, "tls_server_name", None))


def open_channel(addr: str, args: argparse.Namespace) -> Any:
    """A blocking grpc channel to `addr`: TLS when --tls-ca (or a client certificate) is given."""
    from recsys.client import create_sync_channel

    return create_sync_channel(addr, tls_from_args(args))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    recommend = commands.add_parser(
        "recommend", help="ask a running gateway for recommendations", description="Call Recommend."
    )
    recommend.add_argument("--user", required=True, help="external user id")
    recommend.add_argument("--count", type=int, default=0, help="items (default: the scene's count.default)")
    recommend.add_argument("--scene", default="")
    recommend.add_argument("--region", default="", help="request context region (e.g. a zip prefix)")
    recommend.add_argument("--exclude", nargs="*", default=[], metavar="ITEM", help="item ids never to show")
    recommend.add_argument("--dry-run", action="store_true", help="no exposures or cache writes")
    recommend.add_argument("--debug-trace", action="store_true", help="ask for the per-stage trace")
    recommend.add_argument("--json", action="store_true", help="print one JSON object")
    recommend.add_argument(
        "--addr", default=default_addr(), help=f"gateway host:port (default {DEFAULT_ADDR})"
    )
    recommend.add_argument("--timeout", type=float, default=5.0, help="seconds")
    add_tls_arguments(recommend)
    recommend.set_defaults(handler=run_recommend)

    event = commands.add_parser(
        "report-event", help="report a user's event to a running gateway", description="Call ReportEvents."
    )
    event.add_argument("--user", required=True)
    event.add_argument("--item", required=True)
    event.add_argument(
        "--type",
        required=True,
        choices=("impression", "click", "like", "rating", "consume"),
        dest="event_type",
    )
    event.add_argument("--value", type=float, default=0.0, help="the rating for --type rating")
    event.add_argument("--event-id", default="", help="idempotency key (default: a new one)")
    event.add_argument("--scene", default="")
    event.add_argument("--json", action="store_true")
    event.add_argument("--addr", default=default_addr())
    event.add_argument("--timeout", type=float, default=5.0)
    add_tls_arguments(event)
    event.set_defaults(handler=run_report_event)


def _client(args: argparse.Namespace) -> Any:
    from recsys.client import SyncRecommender

    # Retries (on RESOURCE_EXHAUSTED and UNAVAILABLE) stay within --timeout.
    return SyncRecommender(
        args.addr, tls=tls_from_args(args), token=getattr(args, "token", None), timeout=args.timeout
    )


def _failed(error: Any, addr: str) -> GatewayError:
    import grpc

    details = error.details
    if error.code is grpc.StatusCode.UNAVAILABLE:
        details = f"gateway at {addr} unreachable or unavailable ({details}); is `recsys up` running?"
    return GatewayError(f"{error.code.name}: {details}")


def _as_json(message: Any) -> str:
    from google.protobuf import json_format

    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False
    )


def run_recommend(args: argparse.Namespace) -> int:
    from recsys.client import RecommenderError

    with _client(args) as client:
        try:
            answer = client.recommend(
                args.user,
                count=args.count,
                scene=args.scene,
                exclude_item_ids=args.exclude,
                region=args.region,
                dry_run=args.dry_run,
                debug=args.debug_trace,
                request_id=f"cli-{uuid.uuid4().hex[:12]}",
            )
        except RecommenderError as error:
            raise _failed(error, args.addr) from None
    if args.json:
        print(_as_json(answer.response))
        return 0
    flags = [f"version {answer.model_version}", f"scene {answer.scene}"]
    if answer.arm:
        flags.append(f"arm {answer.experiment}/{answer.arm}")
    if answer.cold_start:
        flags.append("cold start")
    if answer.degraded_reasons:
        flags.append("degraded: " + ", ".join(answer.degraded_reasons))
    print(f"user {args.user}: {len(answer.items)} items ({'; '.join(flags)})")
    width = max([5, *(len(item.title) for item in answer.items)])
    width = min(width, 60)
    print(f"{'pos':>3}  {'item':>8}  {'title':<{width}}  {'score':>7}  channels")
    for item in answer.items:
        title = item.title if len(item.title) <= width else item.title[: width - 1] + "…"
        channels = ",".join(item.channels)
        print(f"{item.position:>3}  {item.item_id:>8}  {title:<{width}}  {item.score:>7.4f}  {channels}")
    for stage in answer.trace:
        counts = f"{stage.candidates_in:>5} → {stage.candidates_out:<5}"
        print(f"  {stage.stage:<10} {counts} {stage.milliseconds:7.2f} ms {stage.detail}", file=sys.stderr)
    return 0


def run_report_event(args: argparse.Namespace) -> int:
    from recsys.client import Event, RecommenderError

    event = Event(
        args.user,
        args.item,
        args.event_type,
        value=args.value,
        event_id=args.event_id or f"cli-{uuid.uuid4().hex}",
        scene=args.scene,
    )
    with _client(args) as client:
        try:
            report = client.report_events([event])
        except RecommenderError as error:
            raise _failed(error, args.addr) from None
    if args.json:
        print(_as_json(report.response))
    elif report.rejections:
        rejection = report.rejections[0]
        raise GatewayError(f"event rejected: {rejection.field}: {rejection.reason}")
    else:
        state = "duplicate (already applied)" if report.duplicates else "accepted"
        print(f"{args.event_type} of item {args.item} by user {args.user}: {state}")
    return 0 if not report.rejections else 1
