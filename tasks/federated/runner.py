"""Launch a federated run through the ``flwr`` CLI, stream its rounds, and report.

* Simulation (the embedded default): a SuperLink in simulation mode is started on a free port for the run
  (:class:`~tasks.federated.services.SuperLink`) and stopped afterwards; its virtual nodes find their site
  stores through :data:`~tasks.federated.client_app.SIMULATION_STORES_ENV`.
* Deployment: the SuperLink (and one SuperNode per site, each with its own ``site-store`` node config) are
  already running; the runner only submits the run.

Either way the runner writes an explicit connection into a per-run ``FLWR_HOME`` (never the CLI's ``local``
default), submits ``flwr run APP CONNECTION --format json --run-config FILE``, follows the JSON-lines file
the ServerApp writes (one :class:`~schemas.federation.RoundRecord` per round, handed to ``on_round``), polls
``flwr list --run-id`` until the run finishes, and refuses a run that "completed" without aggregating.
The ServerApp writes the metrics file and the models, so ``output_dir`` must be on the SuperLink's host.

Liveness: every round waits at most ``round_timeout_s`` (capped by ``FEDSCAN_FLOWER__ROUND_TIMEOUT_S``); a site
that has not answered by then is dropped from the round and named, with its reason, in the round record. The
ServerApp writes a :class:`~schemas.federation.ServerOutcome` when it returns. Flower's Simulation Engine only
ends once every ClientApp call has returned, so a hung site would hold the run (and its Ray and
``flwr-simulation`` processes) until that call ends; when the outcome is written and Flower has not finished
``engine_grace_s`` later, the runner stops the run and the SuperLink with every process it started.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from schemas.federation import FederationConfig, FederationReport, RoundRecord, ServerOutcome
from tasks.errors import FedscanError, InvalidInputError
from tasks.federated.client_app import SIMULATION_STORES_ENV
from tasks.federated.rounds import describe_sites, log_failure
from tasks.federated.services import (
    SuperLink,
    SuperLinkUnreachableError,
    _bin,
    flower_env,
    wait_for_health,
)

#: The Flower App folder (its pyproject.toml names the ServerApp and ClientApp).
APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "fedscan"

RoundCallback = Callable[[RoundRecord], None]
LOG = logging.getLogger("fedscan.federated.runner")


class FederatedRunError(FedscanError, RuntimeError):
    """A run failed, timed out, or finished without a single aggregated round."""


@dataclass(frozen=True)
class SimulationTarget:
    """Run on the Simulation Engine of this machine, one virtual node per site store."""

    site_stores: Sequence[str | Path]
    cpus_per_client: int = 1


@dataclass(frozen=True)
class DeploymentTarget:
    """Submit to a running SuperLink (``host:port``); TLS when ``root_certificates`` is given."""

    superlink: str
    root_certificates: Path | None = None
    connect_timeout_s: float = 15.0


def cap_round_timeout(config: FederationConfig, cap_s: float | None = None) -> FederationConfig:
    """``config`` with ``round_timeout_s`` lowered to ``cap_s`` (default ``FEDSCAN_FLOWER__ROUND_TIMEOUT_S``,
    the deployment's longest round) where it asks for more."""
    if cap_s is None:
        from schemas.settings import get_settings

        cap_s = get_settings().flower.round_timeout_s
    if config.round_timeout_s <= cap_s:
        return config
    LOG.info("round_timeout_s %.0f s capped to the deployment's %.0f s", config.round_timeout_s, cap_s)
    return FederationConfig.model_validate({**config.model_dump(), "round_timeout_s": cap_s})


@dataclass
class _Follower:
    """Reads new complete lines of the metrics file; logs each site failure at WARNING."""

    path: Path
    on_round: RoundCallback | None = None
    offset: int = 0
    records: list[RoundRecord] = field(default_factory=list)

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in chunk[: end + 1].splitlines():
            if line.strip():
                rec = RoundRecord.model_validate_json(line)
                self.records.append(rec)
                for f in rec.failures:
                    log_failure(f, rec.round, logger=LOG)
                if self.on_round is not None:
                    self.on_round(rec)


def _flwr(args: Sequence[str], *, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run a ``flwr`` CLI command with ``--format json`` and return its JSON output."""
    try:
        out = subprocess.run(
            [_bin("flwr"), *args, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SuperLinkUnreachableError(f"`flwr {args[0]}` got no answer within {timeout_s:.0f} s") from exc
    text = out.stdout.strip()
    start = text.find("{")
    try:
        parsed: dict[str, Any] = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        parsed = {}
    if out.returncode != 0 or not parsed.get("success", False):
        message = parsed.get("error-message") or (out.stderr.strip() or text)[-800:]
        raise FederatedRunError(f"`flwr {' '.join(args[:1])}` failed: {message}")
    return parsed


def _write_connection(flwr_home: Path, address: str, *, root_certificates: Path | None) -> None:
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates)
    doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")


def run_federation(
    config: FederationConfig,
    *,
    target: SimulationTarget | DeploymentTarget,
    output_dir: str | Path,
    on_round: RoundCallback | None = None,
    timeout_s: float = 3600.0,
    audit: bool = False,
    poll_s: float = 2.0,
    round_timeout_cap_s: float | None = None,
    engine_grace_s: float = 30.0,
    initial_model: str = "",
) -> FederationReport:
    """Run ``config`` on ``target``; per-round records go to ``on_round`` as they appear.

    ``round_timeout_cap_s`` (default: ``FEDSCAN_FLOWER__ROUND_TIMEOUT_S``) caps ``config.round_timeout_s``;
    ``engine_grace_s`` is how long Flower may take to finish after the ServerApp returned before the runner
    stops it (a ClientApp still running, e.g. a hung site).
    ``initial_model``: a registry weights file (path or URL readable by the ServerApp) the rounds start from.

    Outputs under ``output_dir``: ``models/<run_id>/round-<k>/`` (global model + meta.json),
    ``runs/<nonce>/metrics.jsonl`` and, with ``audit``, ``runs/<nonce>/audit.jsonl`` (the inventory of every
    message the server received).

    Raises
    ------
    SuperLinkUnreachableError
        The deployment SuperLink did not answer within ``target.connect_timeout_s``.
    FederatedRunError
        Submission failed, the ServerApp failed, the run timed out (it is stopped), or no round aggregated;
        the message names every site that failed and why.
    """
    config = cap_round_timeout(config, round_timeout_cap_s)
    out = Path(output_dir).resolve()
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=_mkdir(out / "runs")))
    flwr_home = run_dir / "flwr-home"
    metrics_path = run_dir / "metrics.jsonl"
    audit_path = run_dir / "audit.jsonl" if audit else None
    outcome_path = run_dir / "outcome.json"
    run_config = config.to_run_config(
        metrics_path=str(metrics_path),
        models_dir=str(_mkdir(out / "models")),
        audit_path=str(audit_path or ""),
        outcome_path=str(outcome_path),
        initial_model=initial_model,
    )
    config_file = run_dir / "run-config.toml"
    config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
    link: SuperLink | None = None
    t0 = time.perf_counter()
    try:
        if isinstance(target, SimulationTarget):
            if len(target.site_stores) < 1:
                raise InvalidInputError("a simulation needs at least one site store")
            stores = [str(Path(s).resolve()) for s in target.site_stores]
            link = SuperLink(
                flwr_home=flwr_home,
                simulation=True,
                env={SIMULATION_STORES_ENV: json.dumps(stores), "OMP_NUM_THREADS": str(target.cpus_per_client)},
            ).start()
            _write_connection(flwr_home, link.address, root_certificates=None)
            federation = [
                "--federation-config",
                f"num-supernodes={len(stores)} client-resources-num-cpus={target.cpus_per_client}",
            ]
            mode = "simulation"
        else:
            wait_for_health(
                target.superlink,
                timeout_s=target.connect_timeout_s,
                tls=target.root_certificates is not None,
                verify=str(target.root_certificates) if target.root_certificates else True,
            )
            _write_connection(flwr_home, target.superlink, root_certificates=target.root_certificates)
            federation = []
            mode = "deployment"
        env = flower_env(flwr_home)
        submitted = _flwr(
            ["run", str(APP_DIR), CONNECTION, "--run-config", str(config_file), *federation], env=env, timeout_s=120
        )
        run_id = str(submitted["run-id"])
        follower = _Follower(metrics_path, on_round=on_round)
        status = _follow(
            run_id,
            env=env,
            metrics=follower,
            outcome_path=outcome_path,
            timeout_s=timeout_s,
            poll_s=poll_s,
            grace_s=engine_grace_s,
        )
    finally:
        if link is not None:
            link.stop()
    records = follower.records
    report = FederationReport(
        run_id=run_id,
        mode=mode,
        status=status.flower_status,
        config_hash=config.config_hash(),
        rounds=tuple(records),
        final_model_dir=next((r.model_dir for r in reversed(records) if r.model_dir), None),
        wall_seconds=time.perf_counter() - t0,
        server_outcome=_read_outcome(outcome_path),
        engine_stopped_s=status.engine_stopped_s,
    )
    _check(report, config, log_hint=link.log_path if link else None)
    shutil.rmtree(flwr_home / "apps", ignore_errors=True)
    return report


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class _FollowResult:
    flower_status: str
    engine_stopped_s: float | None = None


def _read_outcome(path: Path) -> ServerOutcome | None:
    try:
        return ServerOutcome.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None


def _follow(
    run_id: str,
    *,
    env: dict[str, str],
    metrics: _Follower,
    outcome_path: Path,
    timeout_s: float,
    poll_s: float,
    grace_s: float,
) -> _FollowResult:
    """Poll until Flower says the run finished, or until ``grace_s`` after the ServerApp wrote its outcome
    (then the run is stopped: a ClientApp call still holds the engine), or until ``timeout_s`` (an error)."""
    deadline = time.monotonic() + timeout_s
    status = "pending"
    next_list = 0.0
    server_done: float | None = None
    while True:
        metrics.poll()
        if server_done is None and outcome_path.exists():
            server_done = time.monotonic()
        if time.monotonic() >= next_list:
            listed = _flwr(["list", CONNECTION, "--run-id", run_id], env=env, timeout_s=60)
            runs = listed.get("runs", [])
            status = str(runs[0]["status"]) if runs else "unknown"
            next_list = time.monotonic() + max(poll_s, 3.0)
            if status.startswith("finished"):
                metrics.poll()
                return _FollowResult(status)
        if server_done is not None and time.monotonic() - server_done > grace_s:
            LOG.warning(
                "run %s: the ServerApp returned %.0f s ago but Flower still reports %r (a ClientApp call is still "
                "running); stopping the run",
                run_id,
                grace_s,
                status,
            )
            _stop_run(run_id, env=env)
            metrics.poll()
            return _FollowResult(_status(run_id, env=env, default=status), engine_stopped_s=grace_s)
        if time.monotonic() > deadline:
            _stop_run(run_id, env=env)
            raise FederatedRunError(f"run {run_id} did not finish within {timeout_s:.0f} s (stopped)")
        time.sleep(poll_s)


def _status(run_id: str, *, env: dict[str, str], default: str) -> str:
    """Flower's status of the run now (``default`` when the SuperLink does not say)."""
    try:
        runs = _flwr(["list", CONNECTION, "--run-id", run_id], env=env, timeout_s=60).get("runs", [])
    except FedscanError:
        return default
    return str(runs[0]["status"]) if runs else default


def _stop_run(run_id: str, *, env: dict[str, str]) -> None:
    """``flwr stop``; a failure to stop is logged (the SuperLink we started is stopped anyway)."""
    try:
        _flwr(["stop", run_id, CONNECTION], env=env, timeout_s=60)
    except FedscanError as exc:
        LOG.warning("run %s: flwr stop failed: %s", run_id, exc)


def _check(report: FederationReport, config: FederationConfig, *, log_hint: Path | None) -> None:
    hint = f"; SuperLink log: {log_hint}" if log_hint else ""
    failed = describe_sites(report.failures)
    sites = f"; failed sites: {failed}" if failed else ""
    outcome = report.server_outcome
    if outcome is not None and outcome.status == "failed":
        raise FederatedRunError(f"run {report.run_id}: the ServerApp failed: {outcome.error}{sites}{hint}")
    stopped_after_server = report.engine_stopped_s is not None and outcome is not None
    if report.status != "finished:completed" and not stopped_after_server:
        raise FederatedRunError(f"run {report.run_id} ended {report.status!r}{sites}{hint}")
    train = report.train_rounds
    if not any(r.aggregated for r in train):
        raise FederatedRunError(
            f"run {report.run_id} 'completed' but no round aggregated an update "
            f"({len(train)} of {config.num_rounds} rounds recorded){sites}{hint}"
        )
