"""Service settings, read from the environment (prefix ``OVERPARAM_``) and an optional ``.env``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OVERPARAM_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="where the embedded SQLite file lives")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means sqlite:///<data_dir>/overparam.db"
    )
    ray_address: str = Field(
        "", description="Ray cluster to join (e.g. 'ray-head:6379'); empty starts a local Ray"
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local Ray started when ray_address is empty"
    )
    checkpoint_dir: Path = Field(Path("data/checkpoints"), description="shared checkpoint storage")
    embedded_dispatcher: bool = Field(
        True, description="run the dispatcher inside the API process (the one-command default)"
    )
    run_cpus: float = Field(1.0, gt=0, description="CPUs a run requests unless its sweep says")
    run_gpus: float = Field(
        0.0, ge=0, description="GPUs a run requests unless its sweep says (fractions share a GPU)"
    )
    max_concurrent_runs: int = Field(
        0, ge=0, description="dispatcher cap on running runs; 0 means the cluster's CPUs / run_cpus"
    )
    poll_interval_s: float = Field(0.5, gt=0, description="dispatcher queue poll period")
    max_attempts: int = Field(
        3, ge=1, description="tries per run when its worker or node dies (resumes from checkpoint)"
    )

    # Who may do what (docs/deploy.md: a lab's service). "auto": off for `overparam serve` on
    # a loopback address (the laptop: a local user owns everything), required anywhere else.
    auth: Literal["auto", "off", "required"] = Field(
        "auto", description="API tokens: off (one local user) or required"
    )
    allowed_hosts: list[str] = Field(
        ["localhost", "127.0.0.1", "[::1]"],
        description="Host headers the API answers (against DNS rebinding); '*' for any",
    )
    cors_origins: list[str] = Field(
        [], description="origins whose web pages may call the API (none by default)"
    )
    rate_limit: str = Field("100/second", description="requests per token (limits' syntax)")
    quota_max_active_runs: int = Field(
        10_000, ge=0, description="a user's queued + running runs (0: no limit)"
    )
    quota_max_running_runs: int = Field(
        0, ge=0, description="a user's running runs (0: fair share only)"
    )
    quota_max_metric_points: int = Field(
        1_000_000_000, ge=0, description="metric points a user stores (0: no limit)"
    )
    quota_max_dataset_bytes: int = Field(
        1 << 30, ge=0, description="bytes of datasets a user stores (0: no limit)"
    )

    # Monitoring (docs/deploy.md: Prometheus, Grafana, logs).
    metrics_token: SecretStr | None = Field(
        None,
        description="bearer token Prometheus sends to GET /metrics; unset: /metrics is open "
        "while API tokens are off and closed while they are required",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line with a request id"
    )

    # Threads and connections of one API process (docs/deploy.md: the connection budget).
    api_threads: int = Field(40, gt=0, description="threads serving requests")
    commit_threads: int = Field(4, gt=0, description="threads that commit requests' sessions")
    db_pool_size: int = Field(20, gt=0, description="database connections kept open")
    db_max_overflow: int = Field(
        40, ge=0, description="connections opened beyond the pool under load (then closed)"
    )

    max_width: int = Field(65_536, gt=0)
    max_depth: int = Field(64, gt=0)
    max_n: int = Field(8_192, gt=0)
    max_steps: int = Field(1_000_000, gt=0)
    max_parameters: int = Field(200_000_000, gt=0)
    max_run_memory_mb: int = Field(
        65_536, gt=0, description="cap on a run's estimated memory (services/resources.py)"
    )
    max_runs_per_sweep: int = Field(1_000, gt=0)
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0)

    # The metric store (docs/api.md): batches, external runs, datasets, live streams.
    max_batch_points: int = Field(
        100_000, gt=0, description="points per POST /runs/{id}/metrics (MLflow allows 1,000)"
    )
    max_batch_metrics: int = Field(
        1_000, gt=0, description="distinct metric names per POST /runs/{id}/metrics"
    )
    max_config_bytes: int = Field(
        64 * 1024, gt=0, description="JSON size of an external run's config or final summary"
    )
    max_dataset_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="float64 bytes of a dataset's X and y (uploads also obey max_request_bytes)",
    )
    idempotency_ttl_s: float = Field(
        86_400, gt=0, description="how long an Idempotency-Key's answer is kept"
    )
    stream_poll_s: float = Field(0.5, gt=0, description="how often a live stream polls")
    stream_ping_s: float = Field(15.0, gt=0, description="keep-alive comment period of streams")

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'overparam.db'}"
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
