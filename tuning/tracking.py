"""MLflow: stage (parent) runs, one child run per Tune trial id, artifacts, and the registry.

Everything goes through an explicit `MlflowClient(tracking_uri)` and run ids, never the fluent
"active run" state, so a trial on another machine logs to the same store by URI alone.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import names as N

log = logging.getLogger(__name__)
_BATCH = 900  # log_batch accepts at most 1,000 metrics per call


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if needed (local stores keep artifacts beside the db)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    uri = client.tracking_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        _sqlite_wal(Path(uri[len("sqlite:///"):]))
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _sqlite_wal(db: Path) -> None:
    """Write-ahead logging: concurrent trial processes (and `mlflow ui`) then block each other far less.

    The mode is stored in the database file, so setting it once in the driver covers every trial.
    """
    import sqlite3

    with sqlite3.connect(db, timeout=30) as con:
        con.execute("PRAGMA journal_mode=WAL")


def start_run(client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, str],
              params: Mapping[str, Any] | None = None) -> str:
    run = client.create_run(experiment_id, run_name=name, tags=dict(tags))
    if params:
        log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i:i + _BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str):
    query = (f"tags.`{N.TAG_PARENT}` = '{parent_run_id}' and tags.`{N.TAG_TRIAL_ID}` = '{trial_id}'")
    runs = client.search_runs([experiment_id], query, max_results=2)
    return runs[0] if runs else None


class TrialTracker:
    """The MLflow child run of one Tune trial: opened (or reopened on resume) by the trial itself."""

    def __init__(self, client: MlflowClient, run_id: str, last_step: int):
        self.client, self.run_id, self.last_step = client, run_id, last_step

    @classmethod
    def open(cls, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str,
             params: Mapping[str, Any], run_id: str | None = None) -> "TrialTracker":
        """Continue this trial's run when it has one (a retry or resume), else create it.

        Looking the run up by trial id, not only trusting the checkpoint, means a trial that
        failed before its first checkpoint still gets exactly one run.
        """
        client = client_for(uri)
        run = client.get_run(run_id) if run_id else find_trial_run(client, experiment_id, parent_run_id, trial_id)
        if run is None:
            tags = {N.TAG_PARENT: parent_run_id, N.TAG_STAGE: N.STAGE_TRIAL, N.TAG_TRIAL_ID: trial_id}
            new_id = start_run(client, experiment_id, trial_name, tags, params)
            return cls(client, new_id, 0)
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        for tag in (N.TAG_OUTCOME, N.TAG_STOPPED_EARLY):  # the earlier attempt's verdict no longer holds
            if tag in run.data.tags:
                client.delete_tag(run.info.run_id, tag)
        history = client.get_metric_history(run.info.run_id, M.VAL_ACC)
        return cls(client, run.info.run_id, max((m.step for m in history), default=0))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        # A retried epoch that was already logged (crash after logging, before the checkpoint)
        # gives the same numbers on the same device: skip it rather than log the step twice.
        if epoch <= self.last_step:
            return
        # A busy sqlite file or a server blip must not cost the trial its training: retry, then
        # warn and go on (the epoch is still reported to Tune and kept in its results).
        for attempt in range(4):
            try:
                log_metrics(self.client, self.run_id, metrics, step=epoch)
                self.last_step = epoch
                return
            except Exception as exc:  # noqa: BLE001 - MlflowException, database locked, connection reset
                if attempt == 3:
                    log.warning("MLflow: epoch %d of run %s not logged: %s", epoch, self.run_id, exc)
                    return
                time.sleep(0.5 * 2 ** attempt)

    def finish(self, history: list[dict[str, float]], outcome: str) -> None:
        summary = {N.EPOCHS_COMPLETED: len(history)}
        if history:
            summary[N.FINAL_VAL_ACC] = history[-1][M.VAL_ACC]
            summary[N.BEST_VAL_ACC] = max(h[M.VAL_ACC] for h in history)
        log_metrics(self.client, self.run_id, summary, step=len(history))
        set_tags(self.client, self.run_id, {N.TAG_OUTCOME: outcome, N.TAG_STOPPED_EARLY: "false"})
        self.client.set_terminated(self.run_id, "FINISHED")


def log_files(client: MlflowClient, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path)


def record_best(client: MlflowClient, parent_run_id: str, config: Mapping[str, Any], trial_run_id: str | None) -> None:
    """The best configuration on its stage run: ``best.*`` params, and the tag the final stage reads."""
    log_params(client, parent_run_id, {f"{N.BEST_PARAM_PREFIX}{k}": v for k, v in config.items()})
    set_tags(client, parent_run_id, {N.TAG_BEST_CONFIG: json.dumps(dict(config), sort_keys=True),
                                     N.TAG_BEST_TRIAL_RUN: trial_run_id or ""})


def read_best_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    from fer_model.errors import UserError

    run = client.get_run(run_id)
    raw = run.data.tags.get(N.TAG_BEST_CONFIG)
    if not raw:
        raise UserError(f"run {run_id} has no {N.TAG_BEST_CONFIG} tag: it is not a finished grid or search run")
    return json.loads(raw)


@contextmanager
def stage_run(client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, str],
              params: Mapping[str, Any] | None = None, run_id: str | None = None) -> Iterator[str]:
    """A stage's parent run: created (or reopened, given `run_id`), closed FINISHED, FAILED or KILLED."""
    if run_id is None:
        run_id = start_run(client, experiment_id, name, tags, params)
    else:
        client.update_run(run_id, status="RUNNING")
    try:
        yield run_id
    except KeyboardInterrupt:
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
