"""Running a stage's trials on Ray Tune, and the one place their outcomes are settled.

Both stages (grid and search) call `run_trials`; after Tune returns, `reconcile` looks at every
trial once: errors, trials ASHA stopped (which never reach the end of their function) and
finished trials all get their outcome recorded and their MLflow run closed here.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
from ray import tune
from ray.tune.stopper import TimeoutStopper

from fer_model import metrics as M
from fer_model.errors import UserError
from tuning import names as N
from tuning.options import CommonOptions
from tuning.tracking import client_for, find_trial_run, log_metrics, set_tags
from tuning.trainable import EPOCH, TrialSetup, train_trial

log = logging.getLogger(__name__)
DEFAULT_GPU_SHARE = 0.25  # four trials per GPU: the study's CNN at batch 32 leaves a GPU mostly idle


@dataclass
class TrialRow:
    """One trial's outcome as the stages report it."""

    trial_id: str
    config: dict[str, Any]
    outcome: str
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None

    @property
    def val_acc(self) -> float:
        """Validation accuracy at the trial's last epoch (what selection uses)."""
        return self.history[-1][M.VAL_ACC] if self.history else float("nan")

    @property
    def epochs(self) -> int:
        return len(self.history)


def init_ray(address: str | None) -> bool:
    """Join `address` or start a local Ray; returns True when this call started it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or None, include_dashboard=False, configure_logging=True,
                 logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot join the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
    return True


def check_cluster_paths(opts: CommonOptions) -> None:
    """On a cluster of several nodes, trials on other nodes cannot reach this node's files."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    if opts.tracking_uri.startswith(("sqlite:", "file:")):
        raise UserError(f"{len(nodes)} Ray nodes but a local MLflow store ({opts.tracking_uri}): "
                        "start `mlflow server` and pass its --tracking-uri")
    if "://" not in opts.storage and not opts.storage_shared:
        raise UserError(f"{len(nodes)} Ray nodes but --storage {opts.storage} is a local folder: "
                        "pass a shared path (NFS) with --storage-shared, or a URI such as s3://bucket/path")


@contextmanager
def ray_session(opts: CommonOptions) -> Iterator[None]:
    """Ray for the length of a stage: joined or started, and shut down only if started here."""
    started = init_ray(opts.address)
    try:
        check_cluster_paths(opts)
        yield
    finally:
        if started:
            ray.shutdown()


def gpu_share(opts: CommonOptions) -> float:
    """--gpus-per-trial, else a fraction of a GPU where the cluster has GPUs, else 0."""
    if opts.gpus_per_trial is not None:
        return opts.gpus_per_trial
    return DEFAULT_GPU_SHARE if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def make_scheduler(kind: str, max_epochs: int, grace_period: int = 1, reduction_factor: float = 3.0):
    """ASHA on validation accuracy per epoch, or None for `kind` "none"."""
    if kind != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=EPOCH, max_t=max_epochs, grace_period=min(grace_period, max_epochs),
                         reduction_factor=reduction_factor)


def run_trials(opts: CommonOptions, data, setup: TrialSetup, name: str, param_space: dict[str, Any] | None,
               *, search_alg=None, scheduler=None, num_samples: int = 1, time_budget_s: float | None = None,
               restore_path: str | None = None) -> list[TrialRow]:
    """Run (or, given `restore_path`, resume) one Tune experiment and settle every trial."""
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=data, setup=setup),  # data: one object-store copy
        {"cpu": opts.cpus_per_trial, "gpu": gpu_share(opts)},
    )
    if restore_path:
        # Finished trials are kept; unfinished and errored ones continue from their last checkpoint.
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=M.SELECTION_METRIC, mode=M.SELECTION_MODE, search_alg=search_alg, scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=opts.max_concurrent),
            run_config=tune.RunConfig(
                name=name, storage_path=opts.storage,
                stop=BudgetStopper(time_budget_s) if time_budget_s else None,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest epoch is all a resume needs
                failure_config=tune.FailureConfig(max_failures=1),  # one retry from the last checkpoint
                verbose=1),
        )
    BudgetStopper.spent = False
    results = tuner.fit()
    budget_spent = BudgetStopper.spent
    # A search interrupted before it created all its trials has fewer results than samples.
    missing = num_samples - len(results) if search_alg is not None and not budget_spent else 0
    return reconcile(results, setup, budget_spent=budget_spent, missing=max(missing, 0))


class BudgetStopper(TimeoutStopper):
    """Tune's time budget, telling whether it ran out (trials it cut are then stopped early, not
    interrupted). It is saved with the experiment, so a resumed search gets what was left."""

    spent = False  # class-level: the controller and this flag both live in the driver process

    def stop_all(self) -> bool:
        if super().stop_all():
            BudgetStopper.spent = True
            return True
        return False


def reconcile(results, setup: TrialSetup, budget_spent: bool = False, missing: int = 0) -> list[TrialRow]:
    """Record every trial's outcome in MLflow and close the runs the trials could not close.

    A trial's own run carries `outcome` once its function returns (completed or diverged). Ray
    marks a trial's last result `done` when the function returns or a scheduler stops it (ASHA
    also stops trials that reach their last epoch). A trial with neither was cut off: by the
    --time-budget if it ran out (stopped early), else by Ctrl-C, and then the stage is
    interrupted. Ray keeps `done` in memory only, so trials restored by --resume rely on the tags
    written here the first time.
    """
    client = client_for(setup.tracking_uri)
    rows, cut = [], []
    for result in results:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or result.path.rstrip("/").split("/")[-1])
        config = dict(result.config or {})
        history = _history(result)
        run = find_trial_run(client, setup.experiment_id, setup.parent_run_id, trial_id)
        outcome = run.data.tags.get(N.TAG_OUTCOME) if run else None
        ran_to_end = bool(history) and len(history) >= int(config.get("epochs", 0))
        if result.error is not None:
            outcome = N.OUTCOME_ERROR
            log.warning("trial %s failed: %s", trial_id, str(result.error).splitlines()[0] if str(result.error) else result.error)
        elif outcome is None and history and not math.isfinite(history[-1][M.TRAIN_LOSS]):
            outcome = N.OUTCOME_DIVERGED  # stopped by the scheduler at the epoch it diverged
        elif outcome is None and (metrics.get("done") or budget_spent):
            outcome = N.OUTCOME_COMPLETED if ran_to_end else N.OUTCOME_STOPPED_EARLY
        if outcome is None:
            cut.append(run)
            continue
        if run is not None and run.info.status in ("RUNNING", "KILLED"):
            if history:
                log_metrics(client, run.info.run_id, {N.EPOCHS_COMPLETED: len(history),
                                                      N.FINAL_VAL_ACC: history[-1][M.VAL_ACC],
                                                      N.BEST_VAL_ACC: max(h[M.VAL_ACC] for h in history)},
                            step=len(history))
            set_tags(client, run.info.run_id, {N.TAG_OUTCOME: outcome,
                                               N.TAG_STOPPED_EARLY: str(outcome == N.OUTCOME_STOPPED_EARLY).lower()})
            client.set_terminated(run.info.run_id, "FAILED" if outcome == N.OUTCOME_ERROR else "FINISHED")
        rows.append(TrialRow(trial_id, config, outcome, history, run.info.run_id if run else None))
    if cut or missing:
        # Ctrl-C: Tune saved its state and returned as if done. Do not go on to pick a "best"
        # trial and retrain it; close the cut trials' runs until a resume reopens them.
        for run in cut:
            if run is not None and run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
        raise Interrupted(f"interrupted with {len(cut) + missing} trial(s) unfinished; the state is saved "
                          "(python -m tuning.search --resume continues a search)")
    return rows


class Interrupted(KeyboardInterrupt):
    """A stage stopped before all its trials finished (Ctrl-C); its state is saved."""


def _history(result) -> list[dict[str, float]]:
    df = result.metrics_dataframe
    if df is None or df.empty or EPOCH not in df:
        return []
    df = df.sort_values(EPOCH).drop_duplicates(EPOCH, keep="last")
    keep = [k for k in M.EPOCH_METRICS if k in df]
    return [{k: float(v) for k, v in row.items()} for row in df[keep].to_dict("records")]


def best_row(rows: list[TrialRow]) -> TrialRow:
    """The trial with the highest last-epoch validation accuracy; finished trials first.

    A trial ASHA stopped after one epoch is not compared with ten-epoch trials unless nothing
    ran to the end. Test data is never looked at here.
    """
    scored = [r for r in rows if r.history and math.isfinite(r.val_acc)]
    completed = [r for r in scored if r.outcome == N.OUTCOME_COMPLETED]
    pool = completed or scored
    if not pool:
        raise UserError("no trial produced a validation accuracy; see the errors above")
    return max(pool, key=lambda r: r.val_acc)

