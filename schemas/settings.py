"""Process-wide settings from ``FEDSCAN_…`` environment variables (nested with ``__``), built lazily."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


#: glibc allocator settings for Dask worker processes: keep up to 128 MiB of freed memory per heap, and serve
#: allocations under 32 MiB from the heap. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` instead, which also
#: turns off glibc's adaptive mmap threshold, so every chunk-sized intermediate is mapped afresh and page-faulted
#: in again call after call (benchmarks/worker_env.py measures both).
WORKER_ALLOCATOR_ENVIRON: dict[str, str] = {
    "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}


class DaskSettings(BaseModel):
    """Where chunk parallelism runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str | None = Field(
        default=None, description="Scheduler address (tcp://host:8786); None starts a LocalCluster."
    )
    n_workers: int = Field(default=1, ge=1, le=1024, description="LocalCluster workers.")
    threads_per_worker: int | None = Field(default=None, ge=1, le=1024, description="None: all cores.")
    memory_limit: str = Field(default="auto", description="Per-worker memory limit of a LocalCluster.")
    connect_attempts: int = Field(
        default=4, ge=1, le=100, description="Tries to reach the scheduler at ``address`` before a run gives up."
    )
    connect_backoff_s: float = Field(
        default=15.0,
        ge=0,
        le=3600,
        description="Wait before the second try, seconds; doubled before each later one.",
    )
    tune_worker_allocator: bool = Field(
        default=True,
        description=(
            "Start a LocalCluster's worker processes with WORKER_ALLOCATOR_ENVIRON (glibc keeps freed memory up "
            "to 128 MiB per heap) instead of Dask's MALLOC_TRIM_THRESHOLD_=65536 (memory back to the system at "
            "once, at the cost of page faults on every chunk-sized allocation). No effect on in-process workers."
        ),
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description=(
            "torch intra-op threads while an in-process LocalCluster runs; None: cores divided by the Dask "
            "threads, so that chunk tasks running side by side do not oversubscribe the cores."
        ),
    )


class FlowerSettings(BaseModel):
    """Where federated rounds run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    superlink_address: str | None = Field(
        default=None, description="SuperLink Control API (host:port); None runs the Simulation Engine."
    )
    root_certificates: Path | None = Field(default=None, description="CA bundle for TLS to the SuperLink.")
    insecure: bool = Field(default=False, description="Plain-text gRPC; loopback tests only.")
    round_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=86400.0,
        description="The longest a federated round of this deployment waits for a site's reply, s: a run config "
        "asking for more (FederationConfig.round_timeout_s) is lowered to it; a site that has not answered by then "
        "is dropped from the round and named in its record.",
    )


class PrefectSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    work_pool: str = Field(default="fedscan-process", description="Work pool the deployments use.")
    api_key: SecretStr | None = Field(default=None, description="Prefect Cloud key, if any.")
    progress_after_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="A stage still writing after this many seconds gets a progress artifact in the UI, seconds.",
    )
    progress_every_s: float = Field(
        default=2.0, gt=0, le=3600, description="Least time between two updates of a progress artifact, seconds."
    )


class PrivacySettings(BaseModel):
    """What may leave the site (docs/privacy.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    share_images: bool = Field(
        default=False,
        description=(
            "Publish plaintext preview images (raw and stored reconstructions of a scan's central slice) as Prefect "
            "artifacts. Off: artifacts carry metrics and surrogate images only, and plaintext previews stay in the "
            "site's store and its report.html. Turn on only where the Prefect server is the site's own."
        ),
    )


class MlflowSettings(BaseModel):
    """Optional MLflow logging of registered models (needs the ``mlflow`` extra)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; set: every registered model is also logged to MLflow. Unset: the "
        "built-in registry under <data root>/models/registry only.",
    )


class FedscanSettings(BaseSettings):
    """Root settings. Every field can be set as ``FEDSCAN_<FIELD>`` or ``FEDSCAN_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="FEDSCAN_", env_nested_delimiter="__", extra="forbid", frozen=True)

    data_root: str = Field(
        default="./fedscan-data", description="Folder or fsspec URL that holds one <site>.zarr store per site."
    )
    incoming: str | None = Field(
        default=None,
        description="Local folder where scanner output lands (the one `fedscan watch` watches); a scan-arrived "
        "event's path must lie inside it. Unset: such events are refused.",
    )
    device: Device = Field(default=Device.AUTO, description="auto | cpu | cuda for torch kernels.")
    dask: DaskSettings = Field(default_factory=DaskSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)


@lru_cache(maxsize=1)
def get_settings() -> FedscanSettings:
    """The settings of this process, read from the environment on first use."""
    return FedscanSettings()
