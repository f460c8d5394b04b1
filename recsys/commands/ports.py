"""Refuse to start on a port something else holds, in one line naming the flag.

gRPC reports a port it cannot bind with an error line of its own and an exception that says
nothing of the flag; aiohttp and the metrics server with an OSError of theirs. Checked first,
before anything starts, the answer is one line: `--http-port 8080: address 127.0.0.1:8080 is
already in use`. (What a check cannot see, a port taken in the instant after it, is still
refused by the server itself.)
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from recsys.errors import UsageError

_PROBLEMS = {
    errno.EADDRINUSE: "is already in use",
    errno.EACCES: "needs privileges (a port below 1024)",
    errno.EADDRNOTAVAIL: "is not an address of this machine",
}


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound right now (None: it can)."""
    host = host.strip("[]")
    try:
        resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"does not resolve ({error.strerror})"
    for family, kind, protocol, _, address in resolved:
        with socket.socket(family, kind, protocol) as probe:
            # As the servers do: a port whose old connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                return _PROBLEMS.get(error.errno or 0, f"cannot be bound ({error.strerror})")
    return None


def check_free(ports: Iterable[tuple[str, str, int | None]]) -> None:
    """UsageError for the first `(label, host, port)` that cannot be bound, the label first
    (the flag and its value, e.g. `--http-port 8080`). Port 0 (any free port), None and
    negative ports (switched off) are not checked."""
    for label, host, port in ports:
        if port is None or port <= 0:
            continue
        problem = bind_problem(host, port)
        if problem is not None:
            raise UsageError(f"{label}: address {_address(host, port)} {problem}")
