"""The one place where domain errors become gRPC status codes.

Client errors → INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION, server errors →
RESOURCE_EXHAUSTED / UNAVAILABLE, platform errors → UNAVAILABLE. Anything else is a bug:
INTERNAL with a generic message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import grpc

from recsys import errors

_STATUS_BY_ERROR: tuple[tuple[type[errors.RecsysError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.WrongModelVersion, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.NotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.ModelOutputInvalid, grpc.StatusCode.UNAVAILABLE),
    (errors.DependencyUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: errors.RecsysError) -> grpc.StatusCode:
    for error_type, code in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


# A status message travels in a trailer (gRPC) or the body (HTTP). Clients cap metadata (grpc's
# default is 8 KB for all of it), so a message quoting a 10 KB field would make the client fail
# to read the answer at all; the field's name is at the start and survives the cut.
MAX_MESSAGE_CHARS = 512


def safe_message(message: str, most: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to `most` characters, control characters replaced (they are not allowed
    in a trailer and would garble a log line)."""
    cleaned = "".join(character if character.isprintable() else "?" for character in message[: most + 1])
    return cleaned if len(cleaned) <= most else cleaned[: most - 15] + "… (message cut)"


def code_label(code: grpc.StatusCode) -> str:
    """The `grpc_code` label value as go-grpc-prometheus writes it ("OK", "InvalidArgument")."""
    return _CODE_LABELS[code]


_CODE_LABELS = {
    code: "OK" if code is grpc.StatusCode.OK else "".join(part.title() for part in code.name.split("_"))
    for code in grpc.StatusCode
}
