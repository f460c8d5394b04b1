"""Settings read once at start-up into frozen objects.

Every service subclasses `ServerSettings` with its own environment prefix
(`RECSYS_RECALL_`, `RECSYS_RANK_`, `RECSYS_GATEWAY_`) and defaults that work locally with
no configuration. Command-line flags override the environment (see `services.common.cli`).
Business code receives these objects; it never reads `os.environ`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.admission import AdmissionPolicy

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class TlsSettings(BaseSettings):
    """Optional TLS. A server serves TLS when both `tls_cert_file` and `tls_key_file` are
    set, and requires client certificates (mTLS) when `tls_client_ca_file` is set too."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None


class AuthSettings(BaseSettings):
    """Caller authentication on a public API (the gateway; see `services.common.auth`). Off
    by default: local mode and `make demo` take any caller."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    auth_required: bool = Field(False, description="Refuse calls without valid credentials (401).")
    auth_api_keys_file: Path | None = Field(
        None, description="JSON of sha256(key) → subject and scopes; never plaintext keys."
    )
    auth_jwt_key_file: Path | None = Field(
        None, description="PEM public key (RS*/ES*/EdDSA) or shared secret (HS*) verifying JWTs."
    )
    auth_jwt_algorithms: str = Field("RS256", description="Comma-separated algorithms a JWT may use.")
    auth_jwt_audience: str | None = None
    auth_jwt_issuer: str | None = None
    auth_jwt_leeway_seconds: float = Field(30.0, ge=0, description="Clock skew allowed on exp/nbf/iat.")
    auth_certificates: bool = Field(
        True, description="A verified client certificate (mTLS) identifies the caller (CN, else SAN)."
    )
    auth_service_certificates: str = Field(
        "", description="Comma-separated certificate names granted the recsys:service scope."
    )
    rate_limit_per_second: float = Field(
        100.0, ge=0, description="Per authenticated caller and process, on average; 0: no limit."
    )
    rate_limit_burst: int = Field(200, ge=1, description="Calls a caller may make at once after idling.")
    rate_limit_callers: int = Field(10_000, ge=1, description="Callers tracked at most (idlest forgotten).")

    @model_validator(mode="after")
    def _auth(self) -> AuthSettings:
        for name in ("auth_api_keys_file", "auth_jwt_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if self.auth_jwt_key_file is not None:
            if not self.auth_jwt_audience or not self.auth_jwt_issuer:
                raise ValueError("auth_jwt_audience and auth_jwt_issuer must be set with auth_jwt_key_file")
            families = {name.strip()[:2] for name in self.auth_jwt_algorithms.split(",") if name.strip()}
            if not families:
                raise ValueError("auth_jwt_algorithms: name at least one algorithm")
            # A public key accepted as an HMAC secret lets anyone who has it sign tokens.
            if "HS" in families and len(families) > 1:
                raise ValueError("auth_jwt_algorithms: HS* (a shared secret) cannot mix with public-key ones")
        return self


class ServerSettings(TlsSettings):
    """What every gRPC server process needs. Subclasses set `env_prefix` and port defaults."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 or [::] in containers.")
    port: int = Field(50050, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        9100, ge=0, le=65535, description="Prometheus /metrics port; 0 picks one, unset disables."
    )
    # Unset: the service's own `host`, so that a service bound to loopback does not publish its
    # metrics (model versions, caller counts) on every interface.
    metrics_host: str | None = Field(None, description="Address of /metrics; unset: the same as host.")
    workers: int = Field(1, ge=1, le=64, description="Processes serving the one port (SO_REUSEPORT).")
    max_in_flight: int = Field(
        256, ge=1, description="The most calls in flight per process the adaptive limit may allow."
    )
    min_in_flight: int = Field(2, ge=1, description="The adaptive limit never falls below this.")
    initial_in_flight: int = Field(16, ge=1, description="The adaptive limit's value at start-up.")
    latency_target_ms: float = Field(
        50.0,
        gt=0,
        description="Admission: a window of calls whose p90 exceeds this lowers the concurrency limit.",
    )
    max_queue_ms: float = Field(
        1000.0,
        ge=0,
        description="Admission: the longest a call may expect to wait for a slot (never past its deadline).",
    )
    grace_seconds: float = Field(10.0, ge=0, description="How long in-flight calls may finish on shutdown.")
    # Between reporting NOT_SERVING and refusing calls. Callers that watch health (our own
    # channels) leave at once, but a load balancer or kube-proxy learns of a terminating pod
    # through the API server, a second or a few later; until then it still sends calls, which
    # a server that stopped at once would refuse. 5 s, as the manifests set, so that a service
    # run any other way is just as safe; `recsys up` shortens it (it stops the callers first).
    shutdown_delay_seconds: float = Field(
        5.0,
        ge=0,
        description="Time between reporting NOT_SERVING and refusing calls, for load balancers to notice.",
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_connection_age_seconds: float | None = Field(
        300.0,
        gt=0,
        description="Clients are asked to reconnect (GOAWAY) after this long, so that a Service's "
        "new pods get connections too; unset: connections live forever.",
    )
    local_model_dir: Path | None = Field(
        None,
        description="Copy each model version into this directory (node-local disk), verify and "
        "load it from there instead of memory-mapping the store; unset: load from the store.",
    )
    reflection: bool = True
    # Read once here, like every setting; the exporter itself is configured by the standard
    # OTEL_* variables (see services.common.tracing). Off: no tracing code runs at all.
    tracing: bool = Field(
        False, description="OpenTelemetry spans for every call and stage, exported as OTEL_* configure."
    )
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    use_uvloop: bool = True

    @model_validator(mode="after")
    def _limits(self) -> ServerSettings:
        if self.min_in_flight > self.max_in_flight:
            raise ValueError(
                f"min_in_flight ({self.min_in_flight}) must not exceed max_in_flight ({self.max_in_flight})"
            )
        return self

    def admission_policy(self) -> AdmissionPolicy:
        return AdmissionPolicy(
            initial_limit=min(max(self.initial_in_flight, self.min_in_flight), self.max_in_flight),
            min_limit=self.min_in_flight,
            max_limit=self.max_in_flight,
            latency_target=self.latency_target_ms / 1000,
            max_queue_seconds=self.max_queue_ms / 1000,
        )


class ClientSettings(BaseSettings):
    """How a service calls another service (see `services.common.channels`)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    tls: bool = Field(False, description="Call over TLS (system roots unless tls_ca_file is set).")
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = Field(None, description="This client's certificate, for mTLS.")
    tls_key_file: Path | None = None
    tls_server_name: str | None = Field(None, description="Override the name checked in the certificate.")
    keepalive_seconds: float = Field(30.0, gt=0)
    keepalive_timeout_seconds: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    retry_max_attempts: int = Field(3, ge=1, le=5)
    retry_initial_backoff_seconds: float = Field(0.01, gt=0)
    retry_max_backoff_seconds: float = Field(0.2, gt=0)
    # gRPC's own reconnect backoff starts at 1 s and grows to 120 s, so a dependency that was
    # down for a minute is called again only minutes after it is back. Internal peers are few
    # and near: retry the connection fast and never wait more than a second.
    reconnect_initial_backoff_seconds: float = Field(0.1, gt=0)
    reconnect_max_backoff_seconds: float = Field(1.0, gt=0)
    health_checking: bool = Field(
        True,
        description="Route calls only to peers whose health service says SERVING (a peer that is "
        "shutting down or still loading its model gets none).",
    )
    load_balancing: Literal["pick_first", "round_robin"] = Field(
        "round_robin",
        description="Over every address the target resolves to (e.g. dns:///recall-headless:50052).",
    )

    @model_validator(mode="after")
    def _pair(self) -> ClientSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.reconnect_initial_backoff_seconds > self.reconnect_max_backoff_seconds:
            raise ValueError(
                "reconnect_initial_backoff_seconds: must not exceed reconnect_max_backoff_seconds"
            )
        return self
