"""`recsys recommend` and `recsys report-event`: call a running gateway (see `recsys up`).

Output goes to stdout (a table, or with `--json` one JSON object with the proto's field
names); logs go to stderr; a gRPC error or an unreachable gateway is one line and a non-zero
exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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


def open_channel(addr: str, args: argparse.Namespace) -> Any:
    """A blocking grpc channel to `addr`: TLS when --tls-ca (or a client certificate) is given."""
    import grpc

    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key: give both or neither")
    if ca is None and cert is None:
        return grpc.insecure_channel(addr)
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes() if ca else None,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
    except OSError as error:
        raise UsageError(f"--tls-*: {error}") from None
    server_name = getattr(args, "tls_server_name", None)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(addr, credentials, options=options)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    recommend = commands.add_parser(
        "recommend", help="ask a running gateway for recommendations", description="Call Recommend."
    )
    recommend.add_argument("--user", required=True, help="external user id")
    recommend.add_argument("--count", type=int, default=10)
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


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    import grpc

    from recsys.v1 import gateway_pb2_grpc

    addr = args.addr
    metadata = (("authorization", f"Bearer {args.token}"),) if getattr(args, "token", None) else None
    with open_channel(addr, args) as channel:
        stub = gateway_pb2_grpc.RecommenderStub(channel)
        try:
            return getattr(stub, method)(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            details = error.details() if hasattr(error, "details") else str(error)
            name = code.name if code is not None else "ERROR"
            if code is grpc.StatusCode.UNAVAILABLE:
                details = f"gateway at {addr} unreachable or unavailable ({details}); is `recsys up` running?"
            raise GatewayError(f"{name}: {details}") from None


def _as_json(message: Any) -> str:
    from google.protobuf import json_format

    return json.dumps(
        json_format.MessageToDict(message, preserving_proto_field_name=True), ensure_ascii=False
    )


def run_recommend(args: argparse.Namespace) -> int:
    from recsys.v1 import common_pb2, gateway_pb2

    request = gateway_pb2.RecommendRequest(
        user_id=args.user,
        count=args.count,
        scene=args.scene,
        exclude_item_ids=args.exclude,
        context=common_pb2.RequestContext(region=args.region),
        dry_run=args.dry_run,
        debug=args.debug_trace,
        request_id=f"cli-{uuid.uuid4().hex[:12]}",
    )
    response = _call(args, "Recommend", request)
    if args.json:
        print(_as_json(response))
        return 0
    flags = [f"version {response.model_version}", f"scene {response.scene}"]
    if response.arm:
        flags.append(f"arm {response.experiment}/{response.arm}")
    if response.cold_start:
        flags.append("cold start")
    if response.degraded_reasons:
        flags.append("degraded: " + ", ".join(response.degraded_reasons))
    print(f"user {args.user}: {len(response.items)} items ({'; '.join(flags)})")
    width = max([5, *(len(item.title) for item in response.items)])
    width = min(width, 60)
    print(f"{'pos':>3}  {'item':>8}  {'title':<{width}}  {'score':>7}  channels")
    for item in response.items:
        title = item.title if len(item.title) <= width else item.title[: width - 1] + "…"
        channels = ",".join(item.channels)
        print(f"{item.position:>3}  {item.item_id:>8}  {title:<{width}}  {item.score:>7.4f}  {channels}")
    for stage in response.trace:
        counts = f"{stage.candidates_in:>5} → {stage.candidates_out:<5}"
        print(f"  {stage.stage:<10} {counts} {stage.milliseconds:7.2f} ms {stage.detail}", file=sys.stderr)
    return 0


def run_report_event(args: argparse.Namespace) -> int:
    from recsys.v1 import gateway_pb2

    kinds = {
        "impression": gateway_pb2.EVENT_TYPE_IMPRESSION,
        "click": gateway_pb2.EVENT_TYPE_CLICK,
        "like": gateway_pb2.EVENT_TYPE_LIKE,
        "rating": gateway_pb2.EVENT_TYPE_RATING,
        "consume": gateway_pb2.EVENT_TYPE_CONSUME,
    }
    event = gateway_pb2.Event(
        event_id=args.event_id or f"cli-{uuid.uuid4().hex}",
        user_id=args.user,
        item_id=args.item,
        type=kinds[args.event_type],
        value=args.value,
        scene=args.scene,
    )
    event.time.FromNanoseconds(time.time_ns())
    response = _call(args, "ReportEvents", gateway_pb2.ReportEventsRequest(events=[event]))
    if args.json:
        print(_as_json(response))
    elif response.rejections:
        rejection = response.rejections[0]
        raise GatewayError(f"event rejected: {rejection.field}: {rejection.reason}")
    else:
        state = "duplicate (already applied)" if response.duplicates else "accepted"
        print(f"{args.event_type} of item {args.item} by user {args.user}: {state}")
    return 0 if not response.rejections else 1
