"""Channels to the gateway: plaintext, TLS against a CA, or mTLS with a client certificate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

# Keep idle connections alive through NATs and balancers without pinging faster than the
# servers allow (they accept pings without data every 5 s: services/common/server.py).
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

PemSource = Path | str | bytes


def _pem(value: PemSource | None, name: str) -> bytes | None:
    """PEM bytes as given, or read from a path (a str is a path)."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {value}: {error.strerror or error}") from None


@dataclass(frozen=True)
class Tls:
    """TLS towards the gateway. `ca`: the CA that signed the server's certificate (None: the
    system's roots). `cert` and `key`: this client's certificate and key, for mTLS (both or
    neither). `server_name`: the name to check in the server's certificate when it is not the
    host dialled. Each PEM is bytes or a path."""

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert, key: give both (mTLS) or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, "ca"),
            private_key=_pem(self.key, "key"),
            certificate_chain=_pem(self.cert, "cert"),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _options(tls: Tls | None, extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    # Later options win in grpc's channel args, so the caller's come last.
    return [*DEFAULT_OPTIONS, *(tls.options() if tls else []), *extra]


def create_channel(
    target: str, tls: Tls | None = None, options: Sequence[tuple[str, Any]] = ()
) -> aio.Channel:
    """An asyncio channel to `target` (host:port, or any gRPC target such as dns:///name:port)."""
    if tls is None:
        return aio.insecure_channel(target, options=_options(None, options))
    return aio.secure_channel(target, tls.credentials(), options=_options(tls, options))


def create_sync_channel(
    target: str, tls: Tls | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel (threads, or gevent after grpc.experimental.gevent.init_gevent())."""
    if tls is None:
        return grpc.insecure_channel(target, options=_options(None, options))
    return grpc.secure_channel(target, tls.credentials(), options=_options(tls, options))
