"""The authenticator, the per-caller rate limit and the auth settings, without servers (the
stack tests are tests/services/gateway/test_auth.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.errors import Overloaded, PermissionDenied, Unauthenticated
from services.common.auth import (
    SERVICE_SCOPE,
    Authenticator,
    Caller,
    CallerAuth,
    CallerRateLimiter,
    authorize_user,
    caller_var,
    grpc_certificate_names,
    hash_api_key,
    load_api_keys,
    ssl_certificate_names,
)
from services.gateway.settings import GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_allows_a_burst_then_its_rate() -> None:
    clock = Clock()
    limiter = CallerRateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    clock.now = 0.5  # one token back at 2/s
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    assert limiter.allow("b")  # every caller has its own bucket


def test_the_limiter_tracks_a_bounded_number_of_callers_forgetting_the_idlest() -> None:
    clock = Clock()
    limiter = CallerRateLimiter(rate=1.0, burst=1, max_callers=100, clock=clock)
    assert limiter.allow("busy")
    for index in range(10_000):
        limiter.allow(f"caller-{index}")
    assert len(limiter) == 100
    # "busy" was idle longest and forgotten: it comes back with a full bucket.
    assert limiter.allow("busy")
    assert not limiter.allow("busy")


def test_api_keys_are_looked_up_by_their_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            {"keys": [{"sha256": hash_api_key("s3cret"), "subject": "web", "scopes": [SERVICE_SCOPE]}]}
        )
    )
    authenticator = Authenticator(api_keys=load_api_keys(path))
    caller = authenticator.authenticate("Bearer s3cret")
    assert caller == Caller("web", frozenset({SERVICE_SCOPE}), "api_key")
    assert "s3cret" not in path.read_text()
    for header in ("Bearer other", "s3cret", "Basic s3cret", "Bearer ", None):
        with pytest.raises(Unauthenticated):
            authenticator.authenticate(header)
    path.write_text(json.dumps({"keys": [{"sha256": "not-hex", "subject": "web"}]}))
    with pytest.raises(ValueError, match="sha256"):
        load_api_keys(path)


def test_certificates_name_the_caller_only_when_accepted() -> None:
    names = grpc_certificate_names(
        {"x509_common_name": [b"web"], "x509_subject_alternative_name": [b"web.svc"]}
    )
    assert names == ["web", "web.svc"]
    peer = {"subject": ((("commonName", "196"),),), "subjectAltName": (("DNS", "client.test"),)}
    assert ssl_certificate_names(peer) == ["196", "client.test"]
    accepting = Authenticator(
        accept_certificates=True, certificate_scopes={"web": frozenset({SERVICE_SCOPE})}
    )
    assert accepting.authenticate(None, names).scopes == {SERVICE_SCOPE}
    with pytest.raises(Unauthenticated):
        Authenticator().authenticate(None, names)


def test_the_rate_limit_raises_overloaded() -> None:
    clock = Clock()
    auth = CallerAuth(Authenticator(accept_certificates=True), CallerRateLimiter(1.0, 1, clock=clock))
    auth.admit(None, ["a"])
    with pytest.raises(Overloaded, match="rate limit"):
        auth.admit(None, ["a"])


def test_a_caller_acts_for_itself_unless_service_scoped() -> None:
    authorize_user("anyone", "user_id")  # authentication off: no caller, no rule
    token = caller_var.set(Caller("196"))
    try:
        authorize_user("196", "user_id")
        with pytest.raises(PermissionDenied, match=r"^events\[2\]\.user_id: "):
            authorize_user("197", "events[2].user_id")
    finally:
        caller_var.reset(token)
    token = caller_var.set(Caller("web", frozenset({SERVICE_SCOPE})))
    try:
        authorize_user("197", "user_id")
    finally:
        caller_var.reset(token)


def test_auth_settings_refuse_configurations_no_caller_could_pass(tmp_path: Path) -> None:
    assert not GatewaySettings().auth_required  # local mode: off
    with pytest.raises(ValueError, match="auth_required"):
        GatewaySettings(auth_required=True)
    key = tmp_path / "jwt.pub"
    key.write_text("not checked here")
    with pytest.raises(ValueError, match="auth_jwt_audience"):
        GatewaySettings(auth_required=True, auth_jwt_key_file=key)
    with pytest.raises(ValueError, match="HS"):
        GatewaySettings(
            auth_jwt_key_file=key,
            auth_jwt_audience="a",
            auth_jwt_issuer="i",
            auth_jwt_algorithms="RS256,HS256",
        )
