"""Federated training: the configuration of one Flower run, the per-round record and the run's report.

:class:`FederationConfig` is the one model behind the Flower run config. The runner turns it into the flat
``{str: str | int | float | bool}`` mapping that ``flwr run --run-config`` takes
(:meth:`FederationConfig.to_run_config`); the ServerApp and every ClientApp parse it back with
:meth:`FederationConfig.from_run_config`, which refuses unknown keys, missing keys and a ``config_hash`` that
does not match the parsed values. Keys under :data:`RUNTIME_KEYS` carry where the ServerApp writes its outputs;
they are not part of the training configuration (nor of its hash).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Literal, Self

from pydantic import Field, ValidationError, model_validator

from schemas.base import FrozenModel, StageConfig

RunConfigValue = str | int | float | bool

#: Run-config keys that say where outputs go (set by the runner per run; not hashed).
RUNTIME_KEYS: tuple[str, ...] = ("metrics_path", "models_dir", "audit_path", "outcome_path", "initial_model")
#: Run-config key holding :meth:`FederationConfig.config_hash`.
HASH_KEY = "config_hash"


class StrategyName(StrEnum):
    """Server-side aggregation (Flower's ``flwr.serverapp.strategy`` classes)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"  # FedAvg aggregation; the proximal term is added by each client
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDMEDIAN = "fedmedian"  # coordinate-wise median (robust)
    FEDTRIMMEDAVG = "fedtrimmedavg"  # trimmed mean (robust)


#: Strategies that aggregate the mean of the updates, the only thing SecAgg+ reveals (tasks/federated/strategies.py
#: gives exactly these a SecAgg+ factory; a test holds the two together).
SECAGG_STRATEGIES: frozenset[StrategyName] = frozenset(
    {StrategyName.FEDAVG, StrategyName.FEDPROX, StrategyName.FEDADAM, StrategyName.FEDYOGI}
)
#: Strategies Flower's DP fixed-clipping wrappers are sound around (a FedAvg-style weighted mean).
DP_STRATEGIES: frozenset[StrategyName] = frozenset({StrategyName.FEDAVG, StrategyName.FEDPROX})


def _names(strategies: frozenset[StrategyName]) -> str:
    return ", ".join(s.value for s in StrategyName if s in strategies)


class DpMode(StrEnum):
    """Where the updates are clipped for differential privacy (noise is always added to the aggregate)."""

    OFF = "off"
    SERVER = "server"  # DifferentialPrivacyServerSideFixedClipping: the server clips each update
    CLIENT = "client"  # DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod: clients clip


class CompressionKind(StrEnum):
    """How a client encodes its update (the difference to the global model) for the uplink."""

    NONE = "none"
    FLOAT16 = "float16"  # half-precision deltas: 2 bytes per value
    TOPK = "topk"  # the largest |delta| entries (int32 index + float32 value), with error feedback


class FederatedTask(StrEnum):
    """What the model learns: from the surrogate slices (classify, segment), or from each site's own projections
    (enhance: the upstream reconstruction network of the enhance stage)."""

    CLASSIFY = "classify"  # per-slice lesion present / absent (labels)
    SEGMENT = "segment"  # per-pixel lesion mask (lesion_masks)
    ENHANCE = "enhance"  # HU slice -> cleaner HU slice, trained on pairs built at the site (tasks/enhance/pairs.py)


class EnhanceTarget(StrEnum):
    """Training pairs of the enhance task (tasks/enhance/training.py)."""

    NOISE2INVERSE = "noise2inverse"  # self-supervised: view-split FBPs, any projection scan
    THINNING = "thinning"  # binomial thinning of counts: scans that kept counts and I0


class FederationConfig(StageConfig):
    """One federated training run: rounds, strategy, local training, privacy, compression, dropout handling."""

    task: FederatedTask = Field(
        default=FederatedTask.CLASSIFY, description="Classification, segmentation, or the enhance network."
    )
    num_rounds: int = Field(default=5, ge=1, le=1000, description="Global rounds.")
    strategy: StrategyName = Field(default=StrategyName.FEDAVG, description="Server-side aggregation.")
    local_epochs: int = Field(default=2, ge=1, le=100, description="Epochs over the site's training slices per round.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="Client Adam learning rate.")
    batch_size: int = Field(default=16, ge=1, le=4096, description="Slices per client mini-batch.")
    proximal_mu: float = Field(
        default=0.0, ge=0, le=100.0, description="FedProx μ: weight of (μ/2)·‖w − w_global‖² in the client loss."
    )
    server_learning_rate: float = Field(
        default=1e-2, gt=0, le=10.0, description="η of FedAdam/FedYogi (server optimiser step)."
    )
    trimmed_fraction: float = Field(
        default=0.2, ge=0, lt=0.5, description="FedTrimmedAvg β: fraction cut at each end per coordinate."
    )
    fedbn: bool = Field(default=False, description="BatchNorm parameters and statistics stay at each site (FedBN).")
    local_bn_statistics: bool = Field(
        default=True,
        description="BatchNorm running statistics stay at each site (SiloBN; the learnt scale and shift are still "
        "averaged): before evaluating or fine-tuning a global model a site re-estimates them on its own training "
        "slices. For sites whose inputs differ in distribution, as with one FESF host per site (the default host "
        "policy): benchmarks/federated.py measured FedAvg 0.156 AUC below pooled training without it, +0.008 with it.",
    )
    base_channels: int = Field(default=8, ge=2, le=128, description="Width of the first convolution block.")
    # ---- secure aggregation ----------------------------------------------------------------------
    secagg: bool = Field(default=False, description="SecAgg+ (the server only sees the sum of the updates).")
    secagg_num_shares: int = Field(
        default=3, ge=2, le=1000, description="SecAgg+: shares of each client's secrets (neighbours incl. itself)."
    )
    secagg_reconstruction_threshold: int = Field(
        default=2, ge=2, le=1000, description="SecAgg+: shares needed to rebuild a dropped client's mask."
    )
    secagg_clipping_range: float = Field(
        default=8.0, gt=0, le=1e6, description="SecAgg+: model values are clipped to ±this before quantisation."
    )
    secagg_quantization_range: int = Field(
        default=4_194_304, ge=2, le=2**30, description="SecAgg+: quantisation levels over the clipping range."
    )
    # ---- differential privacy --------------------------------------------------------------------
    dp_mode: DpMode = Field(default=DpMode.OFF, description="Fixed-clipping DP on the server or on the clients.")
    dp_clipping_norm: float = Field(default=1.0, gt=0, le=1e6, description="L2 bound of one client's update.")
    dp_noise_multiplier: float = Field(
        default=0.1, ge=0, le=100.0, description="Gaussian noise std on the aggregate, in units of the clip norm."
    )
    # ---- communication ---------------------------------------------------------------------------
    compression: CompressionKind = Field(default=CompressionKind.NONE, description="Uplink update encoding.")
    topk_fraction: float = Field(
        default=0.1, gt=0, le=1.0, description="Top-k: fraction of the update's entries sent per round."
    )
    # ---- participation and dropout -----------------------------------------------------------------
    min_available_clients: int = Field(
        default=2,
        ge=1,
        le=10000,
        description="Nodes that must be connected before a round starts, and replies a round needs to count.",
    )
    fraction_train: float = Field(default=1.0, gt=0, le=1.0, description="Share of connected nodes asked per round.")
    round_timeout_s: float = Field(
        default=300.0, gt=0, le=86400.0, description="A round aggregates whatever replies arrived by then, s."
    )
    wait_for_nodes_s: float = Field(
        default=120.0, gt=0, le=86400.0, description="How long a round waits for min_available_clients nodes, s."
    )
    # ---- evaluation, personalisation, reproducibility ----------------------------------------------
    holdout_fraction: float = Field(
        default=0.25, gt=0, lt=1.0, description="Share of each site's slices kept for its local evaluation."
    )
    holdout_seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Seeds which scans each site holds out; apart from seed, so that runs with different training "
        "seeds train and evaluate on the same slices.",
    )
    personalisation_epochs: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Local fine-tuning epochs after the last round (0: none); the fine-tuned model stays at the site "
        "and its diagnose stage uses it.",
    )
    # ---- continual learning ------------------------------------------------------------------------
    warm_start: bool = Field(
        default=True,
        description="Start from the promoted model (when it has this task, size and architecture) instead of a "
        "fresh one; a run starts only when labelled scans arrived since that model was trained.",
    )
    promotion_margin: float = Field(
        default=0.01,
        ge=0,
        le=1.0,
        description="A new model is promoted unless its site-aggregated AUC is below the current model's by more "
        "than this.",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seeds model init, splits and shuffling.")
    # ---- the enhance task ----------------------------------------------------------------------------
    enhance_target: EnhanceTarget = Field(
        default=EnhanceTarget.NOISE2INVERSE, description="enhance: which training pairs each site builds."
    )
    enhance_grid_ny_px: int = Field(
        default=0,
        ge=0,
        le=8192,
        description="enhance: image rows of the slices the network is trained for (its checkpoint records this "
        "grid and the stage refuses another); 0 = not set (the federated-training flow sets it from the sites).",
    )
    enhance_grid_nx_px: int = Field(default=0, ge=0, le=8192, description="enhance: image columns (see rows).")
    enhance_batchnorm: bool = Field(
        default=False,
        description="enhance: BatchNorm in the network's blocks. With local_bn_statistics (SiloBN) their running "
        "statistics stay at each site, and the enhance stage re-estimates them on each scan it enhances (also the "
        "policy for a site that never trained); fedbn is refused (no global checkpoint holds a site's layers).",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.strategy is StrategyName.FEDPROX and self.proximal_mu <= 0:
            raise ValueError("strategy 'fedprox' needs proximal_mu > 0 (μ = 0 is plain FedAvg)")
        if self.secagg:
            if self.compression is not CompressionKind.NONE:
                raise ValueError("secagg quantises the updates itself: set compression to 'none'")
            if self.dp_mode is DpMode.SERVER:
                raise ValueError("server-side DP clips individual updates, which SecAgg+ hides: use dp_mode 'client'")
            if self.strategy not in SECAGG_STRATEGIES:
                raise ValueError(
                    f"strategy {self.strategy.value!r} needs individual updates, which SecAgg+ hides; with secagg use "
                    f"one of {_names(SECAGG_STRATEGIES)}"
                )
            if self.secagg_reconstruction_threshold > self.secagg_num_shares:
                raise ValueError("secagg_reconstruction_threshold must not exceed secagg_num_shares")
            if self.min_available_clients < 2:
                raise ValueError("secagg needs min_available_clients >= 2")
        if self.task is FederatedTask.ENHANCE and self.enhance_batchnorm and self.fedbn:
            raise ValueError(
                "task 'enhance' with enhance_batchnorm cannot use fedbn: each site would keep its own BatchNorm "
                "layers and no global checkpoint could hold them; use local_bn_statistics (SiloBN)"
            )
        if (self.enhance_grid_ny_px == 0) != (self.enhance_grid_nx_px == 0):
            raise ValueError("set both enhance_grid_ny_px and enhance_grid_nx_px, or neither")
        if self.dp_mode is not DpMode.OFF and self.strategy not in DP_STRATEGIES:
            raise ValueError(f"DP fixed clipping wraps a FedAvg-style strategy: use one of {_names(DP_STRATEGIES)}")
        if self.dp_mode is not DpMode.OFF and not (self.local_bn_statistics or self.fedbn):
            raise ValueError(
                "DP noise on shared BatchNorm running statistics drives variances negative and the model to NaN: "
                "with dp_mode keep local_bn_statistics (the default) or fedbn"
            )
        return self

    # ---- the Flower run config ---------------------------------------------------------------------
    def to_run_config(
        self,
        *,
        metrics_path: str = "",
        models_dir: str = "",
        audit_path: str = "",
        outcome_path: str = "",
        initial_model: str = "",
    ) -> dict[str, RunConfigValue]:
        """The flat run config of this configuration (enum values as strings), its hash and output paths.

        ``metrics_path``: JSON-lines file of :class:`RoundRecord`; ``models_dir``: root of
        ``<run_id>/round-<k>``; ``audit_path``: JSON-lines inventory (names, shapes, dtypes; never values) of
        every message the server receives; ``outcome_path``: the :class:`ServerOutcome` the ServerApp writes
        when it returns (the runner's sign that the rounds are over); ``initial_model``: a registry weights file
        the ServerApp starts from (warm start; empty: a fresh model). Empty paths: not written.
        """
        out: dict[str, RunConfigValue] = dict(self.model_dump(mode="json"))
        out[HASH_KEY] = self.config_hash()
        out["metrics_path"] = metrics_path
        out["models_dir"] = models_dir
        out["audit_path"] = audit_path
        out["outcome_path"] = outcome_path
        out["initial_model"] = initial_model
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, RunConfigValue]) -> Self:
        """Parse a Flower run config; refuses unknown or missing keys and a hash that does not match.

        Raises
        ------
        RunConfigMismatchError
            A key is unknown or missing, a value is invalid, or ``config_hash`` differs from the hash of the
            parsed values (the run config was edited, or server and client disagree on the schema).
        """
        fields = set(cls.model_fields)
        given = set(run_config)
        unknown = sorted(given - fields - set(RUNTIME_KEYS) - {HASH_KEY})
        if unknown:
            raise RunConfigMismatchError(f"run config has keys FederationConfig does not know: {unknown}")
        missing = sorted(fields - given)
        if missing:
            raise RunConfigMismatchError(f"run config lacks FederationConfig keys: {missing}")
        try:
            config = cls.model_validate({k: run_config[k] for k in fields})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RunConfigMismatchError(
                f"run config value {'.'.join(str(p) for p in first['loc'])!s}={first.get('input')!r} is invalid: "
                f"{first['msg']}"
            ) from exc
        expected = run_config.get(HASH_KEY)
        if expected not in (None, "") and expected != config.config_hash():
            raise RunConfigMismatchError(
                f"run config hash {expected!r} does not match its values (hash {config.config_hash()!r}): "
                "a key was overridden without the runner, or server and client run different fedscan versions"
            )
        return config


class RunConfigMismatchError(ValueError):
    """A Flower run config that is not exactly one :class:`FederationConfig` (schemas import no error classes)."""


class FailureReason(StrEnum):
    """Why a site's reply is missing from a round."""

    TIMEOUT = "timeout"  # no reply within round_timeout_s: the site is dropped from the round
    ERROR = "error"  # the ClientApp raised (Flower's error reply)
    REJECTED = "rejected"  # the server refused the update (non-finite, wrong keys or shapes)


#: The part of a run a site failed in (``roll-call``: the server's question for each node's site id).
FailurePhase = Literal["roll-call", "train", "evaluate", "personalise"]


class SiteFailure(FrozenModel):
    """One site that did not contribute to one phase of a round, and why."""

    site: str = Field(description="Site id the node reported at roll call; 'node-<id>' if it never answered.")
    node_id: int = Field(ge=0, description="Flower node id.")
    phase: FailurePhase
    reason: FailureReason
    detail: str = Field(default="", max_length=500, description="The error message, or the timeout in seconds.")


class RoundRecord(FrozenModel):
    """What one round did, as the ServerApp writes it (one JSON line per round)."""

    run_id: str = Field(description="Flower run id.")
    round: int = Field(ge=0, description="Round number, from 1; 0 for the personalisation phase.")
    phase: Literal["train", "personalise"] = "train"
    nodes_sampled: int = Field(ge=0, description="Nodes sent a train message.")
    replies_ok: int = Field(ge=0, description="Updates that were aggregated.")
    replies_failed: int = Field(ge=0, description="Replies with an error, or none before the timeout.")
    replies_rejected: int = Field(ge=0, description="Updates refused by the server (non-finite, wrong keys/shapes).")
    aggregated: bool = Field(description="False when too few updates arrived: the global model stayed as it was.")
    train_loss: float | None = Field(default=None, description="Mean client training loss (weighted by slices).")
    eval_loss: float | None = None
    eval_auc: float | None = Field(default=None, description="Mean of the sites' held-out AUC (weighted by slices).")
    eval_accuracy: float | None = None
    eval_dice: float | None = None
    eval_psnr_db: float | None = Field(
        default=None, description="enhance: mean held-out PSNR of the network's output against its target, dB."
    )
    eval_ssim: float | None = Field(default=None, description="enhance: mean held-out SSIM (scikit-image).")
    bytes_down: int = Field(
        ge=0, description="Serialized size (Flower's protobuf Message) of everything sent to the nodes this round."
    )
    bytes_up: int = Field(ge=0, description="Serialized size of every reply received from the nodes this round.")
    array_bytes_down: int = Field(
        default=0, ge=0, description="Of bytes_down: the array payloads only (parameter values, no metadata)."
    )
    array_bytes_up: int = Field(default=0, ge=0, description="Of bytes_up: the array payloads only.")
    seconds: float = Field(ge=0, description="Wall time of the round (train + evaluate), s.")
    model_dir: str | None = Field(default=None, description="Folder of the global model after this round.")
    failures: tuple[SiteFailure, ...] = Field(
        default=(), description="Every site that timed out, failed or was rejected in this round, with its reason."
    )
    site_metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Each site's held-out metrics of this round's global model, as the site computed them.",
    )


class ServerOutcome(FrozenModel):
    """What the ServerApp writes when it returns: its rounds are over, whatever the engine does next."""

    status: Literal["completed", "failed"]
    error: str = Field(default="", max_length=2000, description="Why the ServerApp failed (empty when completed).")
    rounds: int = Field(ge=0, description="Train rounds recorded.")


class FederationReport(FrozenModel):
    """What :func:`tasks.federated.runner.run_federation` returns."""

    run_id: str
    mode: Literal["simulation", "deployment"]
    status: str = Field(description="Flower's final status, e.g. 'finished:completed'.")
    config_hash: str
    rounds: tuple[RoundRecord, ...]
    final_model_dir: str | None = Field(description="Folder of the last aggregated global model.")
    wall_seconds: float = Field(ge=0)
    server_outcome: ServerOutcome | None = Field(
        default=None, description="What the ServerApp reported when it returned (None: it never did)."
    )
    skipped_sites: tuple[str, ...] = Field(
        default=(),
        description="Sites left out before the run, each with why (e.g. 'C: no projection scans'); the run's sites "
        "are the others.",
    )
    engine_stopped_s: float | None = Field(
        default=None,
        description="Set when the runner had to stop Flower after the ServerApp returned (a ClientApp still ran, "
        "e.g. a hung site in the Simulation Engine): seconds it waited first.",
    )
    model: dict[str, object] | None = Field(
        default=None,
        description="The registry's decision on this run's model (schemas.registry.Decision as JSON), or why no "
        "run was needed.",
    )

    @property
    def train_rounds(self) -> tuple[RoundRecord, ...]:
        return tuple(r for r in self.rounds if r.phase == "train")

    @property
    def failures(self) -> tuple[SiteFailure, ...]:
        """Every site failure of the run, round by round."""
        return tuple(f for r in self.rounds for f in r.failures)


__all__ = [
    "DP_STRATEGIES",
    "HASH_KEY",
    "RUNTIME_KEYS",
    "SECAGG_STRATEGIES",
    "CompressionKind",
    "DpMode",
    "EnhanceTarget",
    "FailurePhase",
    "FailureReason",
    "FederatedTask",
    "FederationConfig",
    "FederationReport",
    "RoundRecord",
    "RunConfigMismatchError",
    "ServerOutcome",
    "SiteFailure",
    "StrategyName",
]
