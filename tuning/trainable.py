"""The one trainable: shared data in, `fit()` with a callback, `tune.report` + MLflow out."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from fer_model.data import FerData
from fer_model.training import STATUS_DIVERGED, EpochResult, TrainConfig, fit, load_checkpoint, save_checkpoint
from tuning import names as N
from tuning.tracking import TrialTracker

STATE_FILE = "state.pt"
META_FILE = "meta.json"
EPOCH = "epoch"  # reported beside the metrics; ASHA's time attribute


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one stage run needs besides its config and the data."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus_per_trial: float = 1.0


def train_trial(config: dict[str, Any], data: FerData, setup: TrialSetup) -> None:
    """Train one Tune trial. `data` arrives once through the object store (tune.with_parameters)."""
    cfg = TrainConfig.from_dict(config)  # the one conversion from Tune's dict; unknown keys fail
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    # Only a trial Ray gave a GPU share uses one: Ray 2.x leaves CUDA_VISIBLE_DEVICES alone for
    # zero-GPU trials, so torch.cuda.is_available() would put "CPU" trials on GPU 0 unscheduled.
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    ctx = tune.get_context()

    resume, run_id = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a restored experiment
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(Path(d) / STATE_FILE)
            run_id = json.loads((Path(d) / META_FILE).read_text()).get("mlflow_run_id")

    tracker = TrialTracker.open(setup.tracking_uri, setup.experiment_id, setup.parent_run_id,
                                ctx.get_trial_id(), ctx.get_trial_name(), cfg.to_dict(), run_id)

    def on_epoch(r: EpochResult) -> None:
        tracker.log_epoch(r.epoch, r.metrics)
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(r.checkpoint(), Path(d) / STATE_FILE)
            (Path(d) / META_FILE).write_text(json.dumps({"mlflow_run_id": tracker.run_id, "epoch": r.epoch}))
            # Persisted by Ray before report returns, so the temporary folder can go.
            tune.report({**r.metrics, EPOCH: r.epoch}, checkpoint=tune.Checkpoint.from_directory(d))

    result = fit(cfg, data, on_epoch=on_epoch, device=device, resume=resume)
    # A trial ASHA stops never gets here: the driver records those (see runner.reconcile).
    outcome = N.OUTCOME_DIVERGED if result.status == STATUS_DIVERGED else N.OUTCOME_COMPLETED
    tracker.finish(result.history, outcome)
