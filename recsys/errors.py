"""Domain errors, sorted once into the kinds a caller can act on.

Stage code raises these; the service edge (`services.common.errors`) maps each kind to one
gRPC status code, and the CLI to an exit message. Nothing here knows about gRPC.
"""

from __future__ import annotations


class RecsysError(Exception):
    """Base of every error the system raises on purpose."""


# --- client errors: the caller can fix the request -------------------------------------
class InvalidArgument(RecsysError):
    """A request field is missing or out of range. `field` names it (e.g. `quotas[geo]`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(RecsysError):
    """The request names an entity that does not exist (and no fallback applies)."""


class WrongModelVersion(RecsysError):
    """The request names a model version this process does not have (any more)."""

    def __init__(self, requested: str, available: list[str]) -> None:
        have = ", ".join(available) if available else "none loaded"
        super().__init__(f"model_version: {requested!r} is not loaded here (have: {have})")
        self.requested = requested
        self.available = available


class Unauthenticated(RecsysError):
    """The caller sent no credentials, or ones that do not verify (unknown key, bad or expired token)."""


class PermissionDenied(RecsysError):
    """The caller is known but may not do this (e.g. write events for another user)."""


class UsageError(RecsysError):
    """A command-line mistake; the message names the flag (e.g. `--keep: must be at least 1`)."""


# --- server errors: this process cannot take the call right now -----------------------
class Overloaded(RecsysError):
    """Too much work in flight; the call is shed instead of queued."""


class DeadlineExpired(RecsysError):
    """The caller's deadline passed before this stage could start: the work is dropped, since
    nobody is waiting for its answer any more."""


class ModelOutputInvalid(RecsysError):
    """The model gave unusable outputs (non-finite scores) for this call: the stage has failed
    like an outage, and the caller falls back as it would for one."""


class NotReady(RecsysError):
    """The process is starting (no model version loaded) or shutting down."""


# --- platform errors: something this process depends on failed -------------------------
class DependencyUnavailable(RecsysError):
    """A dependency (Redis, a downstream service) is down or timed out."""

    def __init__(self, dependency: str, problem: str) -> None:
        super().__init__(f"{dependency} unavailable: {problem}")
        self.dependency = dependency
