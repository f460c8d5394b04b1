"""Client channels for service-to-service calls.

`create_channel` gives a grpc.aio channel with keepalive (so a dead peer is noticed between
calls, not on the next request), a reconnect backoff capped at a second (so calls resume
within a second of a restarted peer being back), client-side health checking (calls go only
to SERVING peers), message size limits, optional TLS, a retry policy for the
methods the caller declares idempotent (UNAVAILABLE only: the call never reached a server
that could have acted on it), and an interceptor that forwards the current request id.
Deadlines are per call: pass `timeout=deadline.budget(margin)` (see `deadline.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from services.common.interceptor import REQUEST_ID_KEY
from services.common.logs import request_id_var
from services.common.settings import ClientSettings


def _with_request_id(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    request_id = request_id_var.get()
    if request_id == "-":
        return details
    metadata = aio.Metadata()
    for key, value in details.metadata or ():
        if key != REQUEST_ID_KEY:
            metadata.add(key, value)
    metadata.add(REQUEST_ID_KEY, request_id)
    return aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class RequestIdInterceptor(aio.UnaryUnaryClientInterceptor):
    """Forwards the request id of the call being served, so one id spans every hop's logs."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[aio.ClientCallDetails, Any], Any],
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_with_request_id(client_call_details), request)


def service_config(idempotent_services: Sequence[str], settings: ClientSettings) -> str:
    """gRPC service config JSON with a retry policy for the given full service names."""
    # round_robin spreads calls over every address the target resolves to (a headless
    # Service's pods); pick_first would send them all down one connection.
    balancing: list[dict[str, dict[str, object]]] = [{settings.load_balancing: {}}]
    config: dict[str, object] = {"loadBalancingConfig": balancing, "methodConfig": []}
    if settings.health_checking:
        # Client-side health checking: each connection watches the peer's grpc.health.v1
        # status and round_robin skips peers that are not SERVING, so a peer that flips to
        # NOT_SERVING on SIGTERM stops getting calls at once, before it refuses any.
        config["healthCheckConfig"] = {"serviceName": ""}
    if not idempotent_services:
        return json.dumps(config)
    return json.dumps(
        {
            **config,
            "methodConfig": [
                {
                    "name": [{"service": name} for name in idempotent_services],
                    "retryPolicy": {
                        "maxAttempts": settings.retry_max_attempts,
                        "initialBackoff": f"{settings.retry_initial_backoff_seconds}s",
                        "maxBackoff": f"{settings.retry_max_backoff_seconds}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def _credentials(settings: ClientSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None,
        private_key=settings.tls_key_file.read_bytes() if settings.tls_key_file else None,
        certificate_chain=settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None,
    )


def create_channel(
    target: str,
    settings: ClientSettings | None = None,
    *,
    idempotent_services: Sequence[str] = (),
    forward_request_id: bool = True,
) -> aio.Channel:
    """A channel to `target` ("host:port"); call it once per dependency and reuse it.
    `forward_request_id=False`: the caller sets the request id metadata itself (cheaper
    than the interceptor, which costs a task per call)."""
    settings = settings or ClientSettings()
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", int(settings.reconnect_initial_backoff_seconds * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(settings.reconnect_initial_backoff_seconds * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(settings.reconnect_max_backoff_seconds * 1000)),
        ("grpc.service_config", service_config(idempotent_services, settings)),
    ]
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    interceptors = (RequestIdInterceptor(),) if forward_request_id else ()
    if settings.tls or settings.tls_ca_file is not None:
        return aio.secure_channel(target, _credentials(settings), options=options, interceptors=interceptors)
    return aio.insecure_channel(target, options=options, interceptors=interceptors)
