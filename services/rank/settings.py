"""Rank settings: `RECSYS_RANK_*` environment variables and `recsys serve rank` flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings


class RankSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_RANK_", frozen=True, extra="ignore")

    port: int = Field(50053, ge=0, le=65535)
    metrics_port: int | None = Field(9103, ge=0, le=65535)
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
    version_grace_seconds: float = Field(
        60.0, ge=0, description="How long the previous version stays servable."
    )
    scenes_file: Path | None = Field(
        None,
        description='Scenes JSON ({"scenes": {name: {"fusion": …}}}); rank reads each scene\'s fusion.',
    )
    max_candidates: int = Field(1000, ge=1, description="Most candidates one call may send.")
    feature_store_timeout_ms: float = Field(30.0, gt=0)
    batch_window_ms: float = Field(
        0.5, ge=0, le=1.0, description="How long a batch waits for calls already on their way."
    )
    max_batch_rows: int = Field(2048, ge=1, description="Rows one onnxruntime run scores at most.")
    inference_threads: int = Field(
        1, ge=1, le=8, description="Batches scored at once (one per core the process may use)."
    )

    @field_validator("scenes_file")
    @classmethod
    def _readable_scenes(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        if not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        from services.rank.scenes import SceneFusions  # the model code, only when a file is given

        SceneFusions.load(value)  # a bad file stops the start, naming the JSON field
        return value
