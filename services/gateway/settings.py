"""Gateway settings: `RECSYS_GATEWAY_*` environment variables and `recsys serve gateway` flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import AuthSettings, ClientSettings, ServerSettings


class GatewaySettings(ServerSettings, AuthSettings):
    """The gateway is the public edge: it alone takes `auth_*` and `rate_limit_*` (recall and
    rank are reached only by the gateway, over mTLS where that matters)."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_GATEWAY_", frozen=True, extra="ignore")

    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(9101, ge=0, le=65535)
    latency_target_ms: float = Field(
        60.0, gt=0, description="Admission: p90 latency above which the concurrency limit falls."
    )
    http_port: int | None = Field(8080, ge=0, le=65535, description="HTTP/JSON port; unset: no HTTP.")
    store: str = Field("./store", description="Model store PATH or file://PATH.")
    recall_addr: str = Field("127.0.0.1:50052", description="host:port of the recall service.")
    rank_addr: str = Field("127.0.0.1:50053", description="host:port of the rank service.")
    redis: str | None = Field(None, description="redis://… for the shared feature store; unset: in-process.")
    redis_prefix: str = "recsys"
    event_log: Path = Field(
        Path("events.csv"), description="The durable event log file without Redis (a stream with Redis)."
    )
    event_log_max_bytes: int = Field(
        2 * 1024**3,
        ge=1,
        description="Cap of the event log in bytes (the file rotates, the stream is trimmed).",
    )
    http_max_body_bytes: int = Field(
        1024**2, ge=1024, description="Largest HTTP request body accepted (413)."
    )
    http_read_timeout_ms: float = Field(
        5000.0, gt=0, description="Time a client has to send its HTTP body (408 past it)."
    )
    http_idle_timeout_ms: float = Field(
        30_000.0, gt=0, description="HTTP connections idle or with unfinished headers this long are closed."
    )
    http_ui: bool = Field(
        False,
        description="Serve the demo page at /ui and GET /v1/users/{id}/history on the HTTP port. Off by "
        "default: the history discloses what a user did (`recsys up` and `make demo` turn it on).",
    )
    http_history_max_entries: int = Field(
        100, ge=1, le=1000, description="Most entries one GET /v1/users/{id}/history returns."
    )
    scenes_file: Path | None = Field(None, description="JSON file declaring scenes; unset: `default` only.")
    experiments_file: Path | None = Field(None, description="JSON file declaring experiments and arms.")
    blocklist_file: Path | None = Field(None, description="Item ids never to show, one per line.")
    poll_seconds: float = Field(5.0, gt=0)
    version_grace_seconds: float = Field(60.0, ge=0)
    catalogue_poll_seconds: float = Field(
        2.0,
        gt=0,
        description="How often the live catalogue (items upserted or withdrawn while serving) is "
        "checked in the feature store: a change is served within this long.",
    )
    max_catalogue_items: int = Field(
        1000, ge=1, le=10_000, description="Most items (or ids) one UpsertItems (WithdrawItems) may carry."
    )
    default_deadline_ms: float = Field(300.0, gt=0, description="When the caller sets no deadline.")
    recall_timeout_ms: float = Field(120.0, gt=0, description="At most this for the recall call.")
    rank_timeout_ms: float = Field(120.0, gt=0, description="At most this for the rank call.")
    margin_ms: float = Field(10.0, ge=0, description="Kept back from each downstream call's budget.")
    max_count: int = Field(100, ge=1, description="Most items one Recommend may ask for.")
    max_events: int = Field(1000, ge=1, description="Most events one ReportEvents may carry.")
    event_dedupe_seconds: int = Field(7 * 86_400, ge=1, description="How long an event id is remembered.")
    event_write_retry_ms: float = Field(
        1000.0,
        gt=0,
        description="How long one ReportEvents may retry its feature-store writes after the errors "
        "a Redis failover gives (at most the caller's deadline): a planned failover holds writes "
        "back for longer than one write's budget.",
    )
    look_alike_engagers: int = Field(
        50,
        ge=1,
        le=1000,
        description="The look-alike channel: how many first users who engaged with a new item "
        "are remembered for it (its vector is their mean user embedding).",
    )
    fallback_items: int = Field(500, ge=10, description="Size of the local popular list used without recall.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failures that open a circuit breaker.")
    breaker_open_seconds: float = Field(2.0, gt=0, description="How long an open breaker refuses calls.")
    cache_items: int = Field(100, ge=0, description="Ranked but unshown items stored for the cache channel.")
    side_effect_queue: int = Field(
        2000, ge=1, description="Answers whose exposure/cache writes may wait; more are dropped and counted."
    )
    side_effect_writers: int = Field(4, ge=1, description="Tasks writing exposures and cache entries.")
    # The recall and rank channels: RECSYS_GATEWAY_CLIENT='{"tls": true, "tls_ca_file": …}'
    # or the --downstream-tls-* flags (internal mTLS).
    client: ClientSettings = Field(default_factory=ClientSettings)

    @model_validator(mode="after")
    def _credentials(self) -> GatewaySettings:
        if self.auth_required and not (
            self.auth_api_keys_file
            or self.auth_jwt_key_file
            or (self.auth_certificates and self.tls_client_ca_file)
        ):
            raise ValueError(
                "auth_required: set auth_api_keys_file, auth_jwt_key_file or tls_client_ca_file "
                "(no caller could authenticate otherwise)"
            )
        return self
