"""The final stage: retrain the best configuration for longer, evaluate it on test, log the evidence.

It returns the trained, evaluated model; registering it is the next step (`stages.register`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

from fer_model import metrics as M
from fer_model.config import TrainConfig
from fer_model.evaluate import Evaluation, evaluate, save_evaluation
from fer_model.training import STATUS_DIVERGED, fit
from tuning import describe
from tuning import names as N
from tuning.stages import StageContext
from tuning.tracking import log_files, log_metrics, set_tags

EVALUATION_DIR = "evaluation"


@dataclass(frozen=True)
class FinalInputs:
    """What to retrain, for how long, where; and the stage run whose best it is."""

    config: TrainConfig  # the best trial's, with the final stage's epochs
    source_run_id: str  # the grid or search run
    best_trial_run_id: str | None = None
    device: str | None = None

    @classmethod
    def of(cls, best_config: dict[str, Any], epochs: int, source_run_id: str, best_trial_run_id: str | None,
           device: str | None) -> "FinalInputs":
        return cls(TrainConfig.from_dict({**best_config, "epochs": epochs}), source_run_id, best_trial_run_id, device)

    @property
    def run_name(self) -> str:
        """The final run's name: the configuration it retrains (``final adam b32 lr1e-3 d0.3 (15 epochs)``)."""
        return describe.final_run_name(self.config.to_dict())

    def tags(self) -> dict[str, str]:
        tags = {N.TAG_PARENT: self.source_run_id, N.TAG_STAGE: N.STAGE_FINAL}
        if self.best_trial_run_id:
            tags[N.TAG_BEST_TRIAL_RUN] = self.best_trial_run_id
        return tags


@dataclass
class FinalResult:
    """A trained, evaluated model and the run that holds its evidence."""

    run_id: str
    inputs: FinalInputs
    model: Any  # torch.nn.Module
    history: list[dict[str, float]]
    evaluation: Evaluation
    status: str  # fer_model.training STATUS_*
    train_seconds: float

    @property
    def diverged(self) -> bool:
        return self.status == STATUS_DIVERGED


def run(ctx: StageContext, run_id: str, inputs: FinalInputs) -> FinalResult:
    """Retrain, log each epoch, evaluate on test, log the metrics and the evaluation files."""
    import torch

    device = torch.device(inputs.device) if inputs.device else None
    t0 = time.perf_counter()
    result = fit(inputs.config, ctx.data, device=device,
                 on_epoch=lambda r: log_metrics(ctx.client, run_id, r.metrics, step=r.epoch))
    train_seconds = time.perf_counter() - t0
    ev = evaluate(result.model, inputs.config.model, ctx.data.test, device)
    log_metrics(ctx.client, run_id, {**ev.metrics, **M.summary(result.history), "train_seconds": train_seconds})
    with tempfile.TemporaryDirectory() as d:
        log_files(ctx.client, run_id, save_evaluation(ev, d, result.history, title="(final)"), EVALUATION_DIR)
    note = describe.final_description(
        inputs.config.to_dict(), ev.metrics, source_run_id=inputs.source_run_id, best_trial_run_id=inputs.best_trial_run_id,
        status=result.status, train_seconds=train_seconds, test_size=len(ctx.data.test), fingerprint=ctx.data.fingerprint,
        full_data=ctx.data_config.max_samples is None, epochs_run=len(result.history))
    set_tags(ctx.client, run_id, {N.TAG_OUTCOME: result.status, N.TAG_NOTE: note})
    return FinalResult(run_id, inputs, result.model, result.history, ev, result.status, train_seconds)
