"""The grid stage: every (dropout, lr) pair of the study's grid as one Ray Tune trial."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fer_model.config import TrainConfig
from tuning import names as N
from tuning.options import SchedulerSettings
from tuning.reporting import report
from tuning.stages.context import StageContext, StageResult, conclude, data_params
from tuning.trials.runner import run_trials
from tuning.trials.trainable import TrialSetup


@dataclass(frozen=True)
class GridInputs:
    """The grid: fixed training values, the dropout and lr axes, and early stopping (none by default)."""

    fixed: dict[str, Any]
    dropouts: list[float]
    lrs: list[float]
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)

    def __post_init__(self) -> None:
        for d in self.dropouts:  # every grid point must be a valid config before Ray starts
            for lr in self.lrs:
                TrainConfig.from_dict({**self.fixed, "dropout": d, "lr": lr})

    @property
    def epochs(self) -> int:
        return TrainConfig.from_dict(self.fixed).epochs

    @property
    def size(self) -> int:
        """How many trials: every (dropout, lr) pair."""
        return len(self.dropouts) * len(self.lrs)

    def axes_text(self) -> tuple[str, str]:
        """The axes as their flags take them: ``("0.3,0.5,0.7", "0.001,0.01,0.0001")``."""
        return N.values_text(self.dropouts), N.values_text(self.lrs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tag `stage_inputs` of the grid run: what a --resume continues with)."""
        return {"fixed": dict(self.fixed), "dropouts": list(self.dropouts), "lrs": list(self.lrs),
                "scheduler": asdict(self.scheduler)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GridInputs":
        return cls(d["fixed"], d["dropouts"], d["lrs"], SchedulerSettings(**d["scheduler"]))


def params(ctx: StageContext, inputs: GridInputs) -> dict[str, Any]:
    """The grid run's params: the fixed values, the axes, the scheduler and the data."""
    dropouts, lrs = inputs.axes_text()
    return {**inputs.fixed, "dropouts": dropouts, "lrs": lrs, "scheduler": inputs.scheduler.kind, **data_params(ctx)}


def tune_name(parent_run_id: str) -> str:
    return f"grid-{parent_run_id[:8]}"


def tune_path(ctx: StageContext, parent_run_id: str) -> str:
    """Where Tune keeps this grid's state (a tag on its run, for --resume)."""
    return f"{ctx.cluster.storage.rstrip('/')}/{tune_name(parent_run_id)}"


def run(ctx: StageContext, parent_run_id: str, inputs: GridInputs, restore_path: str | None = None) -> StageResult:
    """Run the grid's trials under `parent_run_id` (or, given `restore_path`, continue them); print and
    log its table, heatmap and curves."""
    setup = TrialSetup(ctx.tracking.uri, ctx.experiment_id, parent_run_id, ctx.cluster.cpus_per_trial)
    rows = run_trials(ctx.cluster, ctx.data, setup, tune_name(parent_run_id), inputs.fixed,
                      grid={"dropout": inputs.dropouts, "lr": inputs.lrs}, name_keys=("dropout", "lr"),
                      scheduler=inputs.scheduler, max_epochs=inputs.epochs, restore_path=restore_path)
    result = conclude(ctx, N.STAGE_GRID, parent_run_id, rows, lambda d: [
        report.write_table(rows, d / "grid_results.csv"),
        report.plot_grid_heatmap(rows, inputs.dropouts, inputs.lrs, d / "val_acc_heatmap.png"),
        report.plot_all_learning_curves(rows, d / "learning_curves.png")])
    best = result.best
    # The study's accuracies are of the full data set: beside a --max-samples run they only mislead.
    full_data = ctx.data_config.max_samples is None
    print("\nvalidation accuracy after each trial" + (" (the study's test accuracy in brackets):" if full_data else ":"))
    print(report.grid_text(rows, inputs.dropouts, inputs.lrs, study=full_data))
    print(f"best: dropout {best.config['dropout']:g}, lr {best.config['lr']:g}: val {100 * best.val_acc:.2f}% "
          f"(trial {best.trial_id}, run {best.run_id})")
    if tie := report.tie_line(rows):
        print(tie)
    return result
