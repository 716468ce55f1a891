"""The pipeline's stages: each takes typed inputs and returns a typed result.

- `grid.run`   GridInputs   -> StageResult   (the study's dropout x lr grid)
- `search.run` SearchPlan   -> StageResult   (Optuna through Ray Tune, resumable)
- `final.run`  FinalInputs  -> FinalResult   (retrain the best configuration, evaluate on test)
- `register.register` FinalResult -> ModelVersion | None (log the model, register it with its tags)

Stages never import each other and never set a run's status: `tuning.pipeline` composes them and
owns every run (`tuning.tracking.store.tracked_run`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from fer_model.config import DataConfig
from fer_model.data import FerData
from tuning.options import ClusterOptions, TrackingOptions
from tuning.reporting import describe
from tuning.tracking.store import log_files, log_metrics, record_best
from tuning.trials import phases
from tuning.trials.rows import TrialRow, best_row


@dataclass(frozen=True)
class StageContext:
    """What every stage works with: the loaded data, the store, the cluster."""

    client: MlflowClient
    experiment_id: str
    tracking: TrackingOptions
    cluster: ClusterOptions
    data_config: DataConfig
    data: FerData


@dataclass(frozen=True)
class StageResult:
    """A finished trial stage: its run, its trials (one summary, built in `outcomes.summarize`), the best."""

    stage: str
    parent_run_id: str
    trials: list[TrialRow]
    best: TrialRow
    study_name: str | None = None


def data_params(ctx: StageContext) -> dict[str, Any]:
    """What decides the data a trial sees (a stage run's params; a resume must see the same)."""
    return {**ctx.data.sizes(), "data_fingerprint": ctx.data.fingerprint[:16],
            "val_fraction": ctx.data_config.val_fraction, "data_seed": ctx.data_config.seed,
            "max_samples": ctx.data_config.max_samples}


def conclude(ctx: StageContext, stage: str, parent_run_id: str, rows: list[TrialRow],
             artifacts: Callable[[Path], Sequence[Path]], study_name: str | None = None) -> StageResult:
    """The end every trial stage shares: pick the best, log the stage's files, record the best config."""
    with phases.DRIVER.time(phases.CONCLUDE):
        best = best_row(rows)
        with tempfile.TemporaryDirectory() as d:
            log_files(ctx.client, parent_run_id, artifacts(Path(d)))
        record_best(ctx.client, parent_run_id, best.config, best.run_id)
        describe.set_stage_description(ctx.client, parent_run_id, stage, rows, best, study_name,
                                       full_data=ctx.data_config.max_samples is None)
        log_metrics(ctx.client, parent_run_id, {M.VAL_ACC: best.val_acc})  # the runs table sorts parents too
        per_node = Counter(r.node for r in rows if r.node)
        if len(per_node) > 1:  # on a cluster: where the trials ran
            print("trials per node: " + ", ".join(f"{node}: {n}" for node, n in sorted(per_node.items())))
    # Where this command's time went so far (Ray's start and the data load go on the first stage's run).
    log_metrics(ctx.client, parent_run_id, phases.DRIVER.take())
    return StageResult(stage, parent_run_id, rows, best, study_name)
