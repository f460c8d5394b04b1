"""Recall settings: `RECSYS_RECALL_*` environment variables and `recsys serve recall` flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from recsys.serving_model import ALL_CHANNELS
from services.common.settings import ServerSettings


class RecallSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_RECALL_", frozen=True, extra="ignore")

    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int | None = Field(9102, ge=0, le=65535)
    # Looser than the gateway's (60 ms): the gateway, the entry point, is where calls should
    # queue; this limit protects the service from callers that do not limit themselves.
    latency_target_ms: float = Field(
        100.0, gt=0, description="Admission: p90 latency above which the concurrency limit falls."
    )
    initial_in_flight: int = Field(64, ge=1, description="The adaptive limit's value at start-up.")
    min_in_flight: int = Field(16, ge=1, description="The adaptive limit never falls below this.")
    store: str = Field("./store", description="Model store PATH or file://PATH.")
    redis: str | None = Field(None, description="redis://… for the shared feature store; unset: in-process.")
    redis_prefix: str = "recsys"
    blocklist_file: Path | None = Field(
        None, description="Item ids never to recall, one per line; re-read when it changes."
    )
    blocklist_reload_seconds: float = Field(5.0, gt=0, description="How often the blocklist file is checked.")
    repush_lost_features: bool = Field(
        True,
        description="Push the current version's features again when they vanish from Redis "
        "(one process of the tier does, under a lock in Redis).",
    )
    poll_seconds: float = Field(5.0, gt=0, description="How often the store's CURRENT is checked.")
    catalogue_poll_seconds: float = Field(
        2.0,
        gt=0,
        description="How often the live catalogue (items upserted or withdrawn while serving) is "
        "checked in the feature store: a change is served within this long.",
    )
    new_items_quota: int = Field(
        50, ge=0, description="Candidates of the new_items channel unless the scene sets its quota."
    )
    look_alike_quota: int = Field(
        50, ge=0, description="Candidates of the look_alike channel unless the scene sets its quota."
    )
    look_alike_poll_seconds: float = Field(
        2.0,
        gt=0,
        description="How often the new items' engagers (recorded by the gateway) are checked; "
        "a change rebuilds the look-alike vectors off the request path.",
    )
    look_alike_engagers: int = Field(
        50, ge=1, le=1000, description="How many first engagers make a new item's look-alike vector."
    )
    version_grace_seconds: float = Field(
        60.0, ge=0, description="How long the previous version stays servable."
    )
    channel_timeout_ms: float = Field(
        50.0, gt=0, description="Each channel's deadline unless it has its own."
    )
    channel_timeouts_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Per-channel deadlines, e.g. RECSYS_RECALL_CHANNEL_TIMEOUTS_MS='{\"two_tower\": 30}'.",
    )
    feature_store_timeout_ms: float = Field(30.0, gt=0)
    default_deadline_ms: float = Field(200.0, gt=0)
    max_quota: int = Field(1000, ge=1)
    max_candidates: int = Field(1000, ge=1)
    default_candidates: int = Field(500, ge=1)
    channel_threads: int = Field(
        4, ge=1, le=64, description="Threads running channel work off the event loop."
    )
    channel_workers: int = Field(
        2, ge=1, le=8, description="Threads one request's channels share (a slow channel holds up one)."
    )

    @field_validator("channel_timeouts_ms")
    @classmethod
    def _known_channels(cls, value: dict[str, float]) -> dict[str, float]:
        for name, milliseconds in value.items():
            if name not in ALL_CHANNELS:
                raise ValueError(f"unknown channel {name!r} (known: {', '.join(ALL_CHANNELS)})")
            if milliseconds <= 0:
                raise ValueError(f"{name}: expected a positive number of milliseconds, got {milliseconds}")
        return value
