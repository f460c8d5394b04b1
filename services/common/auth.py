"""Who is calling, and may they: caller authentication, the per-caller rate limit and the
"act only for yourself" rule, in one place for both edges (the gRPC `CallGuard` and the
gateway's HTTP middleware).

Credentials, in the order they are looked at:
- `authorization: Bearer <token>` (gRPC metadata or HTTP header). A token with three
  dot-separated parts is a JWT when a JWT key is configured: verified with PyJWT against the
  key, the allowed algorithms, the audience and the issuer, and it must carry `exp` and
  `sub`. Any other token is an API key, looked up by its SHA-256 in the keys file (the file
  never holds a key itself, so reading it does not let anyone call).
- A verified client certificate (mTLS): its subject CN, else its first SAN, is the caller.

Authentication is off unless configured (`make demo` and `recsys up` run without it); with it
on, a call without valid credentials is UNAUTHENTICATED (HTTP 401). Health and reflection stay
open: probes carry no credentials.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from recsys.errors import Overloaded, PermissionDenied, Unauthenticated
from services.common.settings import AuthSettings, TlsSettings

# A back end acting for many users (a web server reporting its users' clicks) carries this.
SERVICE_SCOPE = "recsys:service"
# Changing what is served (the live catalogue: `UpsertItems`, `WithdrawItems`) is an
# operator's or the content back end's right, not every service's: a scope of its own.
CATALOGUE_SCOPE = "recsys:catalogue"
_MAX_TOKEN_CHARS = 8192  # a JWT with a few claims is well under 2 KB; anything longer is junk
_MAX_SUBJECT_CHARS = 256


@dataclass(frozen=True)
class Caller:
    subject: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    method: str = "api_key"  # "api_key", "jwt" or "certificate": for logs

    def may_act_for(self, user_id: str) -> bool:
        return user_id == self.subject or SERVICE_SCOPE in self.scopes


# Set by the edge for the call being handled (each gRPC call and each HTTP request runs in
# its own task, so the variable is per call); None when authentication is off.
caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("recsys_caller", default=None)


def authorize_user(user_id: str, field_name: str) -> None:
    """Refuse (PERMISSION_DENIED) a call naming a user the authenticated caller may not act
    for. A no-op with authentication off."""
    caller = caller_var.get()
    if caller is None or caller.may_act_for(user_id):
        return
    raise PermissionDenied(
        f"{field_name}: caller {caller.subject!r} may act only for user_id {caller.subject!r} "
        f"(or needs the {SERVICE_SCOPE} scope)"
    )


def authorize_scope(scope: str, what: str) -> None:
    """Refuse (PERMISSION_DENIED) a caller without `scope`. A no-op with authentication off."""
    caller = caller_var.get()
    if caller is None or scope in caller.scopes:
        return
    raise PermissionDenied(f"{what}: caller {caller.subject!r} needs the {scope} scope")


def load_api_keys(path: Path) -> dict[str, Caller]:
    """The keys file: `{"keys": [{"sha256": "<hex of sha256(key)>", "subject": "web",
    "scopes": ["recsys:service"]}, …]}`."""
    try:
        document = json.loads(path.read_text())
        entries = document["keys"]
        keys: dict[str, Caller] = {}
        for index, entry in enumerate(entries):
            digest = str(entry["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"keys[{index}].sha256: expected 64 hex digits")
            subject = str(entry["subject"])
            if not 0 < len(subject) <= _MAX_SUBJECT_CHARS:
                raise ValueError(f"keys[{index}].subject: expected 1 to {_MAX_SUBJECT_CHARS} characters")
            keys[digest] = Caller(subject, frozenset(entry.get("scopes", ())), "api_key")
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not an API keys file ({error})") from None
    return keys


def hash_api_key(key: str) -> str:
    """What the keys file holds for `key` (`recsys`' docs show the shell equivalent)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class JwtPolicy:
    key: str | bytes  # a PEM public key (RS*/ES*/EdDSA) or a shared secret (HS*)
    algorithms: tuple[str, ...]
    audience: str
    issuer: str
    leeway_seconds: float = 30.0


class Authenticator:
    """Credentials → `Caller`, or `Unauthenticated` saying what was wrong (never which part
    of a key matched)."""

    def __init__(
        self,
        *,
        api_keys: Mapping[str, Caller] | None = None,
        jwt_policy: JwtPolicy | None = None,
        accept_certificates: bool = False,
        certificate_scopes: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self._api_keys = dict(api_keys or {})
        self._jwt = jwt_policy
        self._certificates = accept_certificates
        self._certificate_scopes = dict(certificate_scopes or {})

    def authenticate(self, authorization: str | None, certificate_names: Sequence[str] = ()) -> Caller:
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization: expected 'Bearer <token>'")
            if len(token) > _MAX_TOKEN_CHARS:
                raise Unauthenticated(f"authorization: token longer than {_MAX_TOKEN_CHARS} characters")
            return self._token(token)
        if self._certificates and certificate_names:
            name = certificate_names[0][:_MAX_SUBJECT_CHARS]
            return Caller(name, self._certificate_scopes.get(name, frozenset()), "certificate")
        raise Unauthenticated("no credentials: send 'authorization: Bearer <token>' or a client certificate")

    def _token(self, token: str) -> Caller:
        if self._jwt is not None and token.count(".") == 2:
            return self._verify_jwt(token, self._jwt)
        caller = self._api_keys.get(hashlib.sha256(token.encode()).hexdigest())
        if caller is None:
            raise Unauthenticated("authorization: unknown API key or invalid token")
        return caller

    @staticmethod
    def _verify_jwt(token: str, policy: JwtPolicy) -> Caller:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                policy.key,
                algorithms=list(policy.algorithms),
                audience=policy.audience,
                issuer=policy.issuer,
                leeway=policy.leeway_seconds,
                options={"require": ["exp", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("authorization: token expired") from None
        except jwt.InvalidTokenError as error:
            # The class names the failure (InvalidSignatureError, InvalidAudienceError, …)
            # without quoting the token back.
            raise Unauthenticated(f"authorization: invalid token ({type(error).__name__})") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= _MAX_SUBJECT_CHARS:
            raise Unauthenticated("authorization: invalid token (sub)")
        return Caller(subject, _scopes(claims), "jwt")


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth 2 puts scopes in `scope` as one space-separated string; some issuers use a
    `scopes` list. Either is read."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scopes = claims.get("scopes")
    if isinstance(scopes, list):
        return frozenset(str(value) for value in scopes)
    return frozenset()


class CallerRateLimiter:
    """A token bucket per caller subject, per process: `rate` calls a second on average,
    bursts of up to `burst`. At most `max_callers` buckets are kept; the caller idle longest
    is forgotten first (it comes back with a full bucket, which is what an idle caller has
    anyway once `burst / rate` seconds passed)."""

    def __init__(
        self, rate: float, burst: int, max_callers: int = 10_000, clock: Any = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1 or max_callers < 1:
            raise ValueError(
                f"rate, burst, max_callers: must be positive, got {rate}, {burst}, {max_callers}"
            )
        self.rate = rate
        self.burst = burst
        self._max_callers = max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # subject → (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, subject: str) -> bool:
        now = self._clock()
        bucket = self._buckets.pop(subject, None)
        if bucket is None:
            tokens = float(self.burst)
        else:
            tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[subject] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self._max_callers:
            self._buckets.popitem(last=False)
        return allowed


class CallerAuth:
    """What an edge calls per request: authenticate, then rate-limit the caller. Raises
    `Unauthenticated` or `Overloaded` (RESOURCE_EXHAUSTED / HTTP 429)."""

    def __init__(self, authenticator: Authenticator, limiter: CallerRateLimiter | None) -> None:
        self.authenticator = authenticator
        self.limiter = limiter

    def admit(self, authorization: str | None, certificate_names: Sequence[str] = ()) -> Caller:
        caller = self.authenticator.authenticate(authorization, certificate_names)
        if self.limiter is not None and not self.limiter.allow(caller.subject):
            raise Overloaded(
                f"rate limit: caller {caller.subject!r} past {self.limiter.rate:g} calls/s "
                f"(burst {self.limiter.burst}); retry later"
            )
        return caller


def grpc_certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The verified peer certificate's CN, then its SANs, from `context.auth_context()` (grpc
    fills these only for a certificate that chained to the configured client CA)."""
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()):
            name = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if name and name not in names:
                names.append(name)
    return names


def ssl_certificate_names(peercert: Mapping[str, Any] | None) -> list[str]:
    """The same from `ssl.SSLSocket.getpeercert()` (the HTTP port): CN, then SANs."""
    if not peercert:
        return []
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value not in names:
                names.append(str(value))
    for _kind, value in peercert.get("subjectAltName", ()):
        if value not in names:
            names.append(str(value))
    return names


def caller_auth_from(settings: AuthSettings, tls: TlsSettings) -> CallerAuth | None:
    """The edge's `CallerAuth` from its settings; None with authentication off."""
    if not settings.auth_required:
        return None
    jwt_policy = None
    if settings.auth_jwt_key_file is not None:
        assert settings.auth_jwt_audience is not None  # the settings' validator checked both
        assert settings.auth_jwt_issuer is not None
        algorithms = tuple(name.strip() for name in settings.auth_jwt_algorithms.split(",") if name.strip())
        key = settings.auth_jwt_key_file.read_bytes()
        jwt_policy = JwtPolicy(
            key.strip() if algorithms[0].startswith("HS") else key,
            algorithms,
            settings.auth_jwt_audience,
            settings.auth_jwt_issuer,
            settings.auth_jwt_leeway_seconds,
        )
    certificates = settings.auth_certificates and tls.tls_client_ca_file is not None
    service_names = [name.strip() for name in settings.auth_service_certificates.split(",") if name.strip()]
    authenticator = Authenticator(
        api_keys=load_api_keys(settings.auth_api_keys_file) if settings.auth_api_keys_file else None,
        jwt_policy=jwt_policy,
        accept_certificates=certificates,
        certificate_scopes={name: frozenset({SERVICE_SCOPE}) for name in service_names},
    )
    limiter = (
        CallerRateLimiter(
            settings.rate_limit_per_second, settings.rate_limit_burst, settings.rate_limit_callers
        )
        if settings.rate_limit_per_second > 0
        else None
    )
    return CallerAuth(authenticator, limiter)


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The HTTP port's TLS, the same files and rules as the gRPC port's: a client CA makes
    client certificates required (mTLS); None without a server certificate."""
    if tls.tls_cert_file is None or tls.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.tls_cert_file, tls.tls_key_file)
    if tls.tls_client_ca_file is not None:
        context.load_verify_locations(cafile=tls.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
