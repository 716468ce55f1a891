"""The trials of a stage as rows: what the stages rank, report and retrain (no Ray, no MLflow client).

`tuning.trials.callbacks.summarize` builds a running stage's rows from Tune's results; `trial_rows`
reads a finished stage's back from MLflow. Only validation accuracy ranks them; test data is never
looked at here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from fer_model import metrics as M
from fer_model.config import TrainConfig
from fer_model.errors import ConfigError, UserError
from tuning import names as N
from tuning.tracking.store import trial_runs


@dataclass(frozen=True)
class TrialRow:
    """One trial as the stages report it."""

    trial_id: str
    config: dict[str, Any]
    outcome: str
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None
    run_name: str = ""
    node: str = ""  # the Ray node it finished on: "<node id, 8 chars> <ip>"
    error: str = ""  # a failed trial's error, its last line (tag `error`)

    @property
    def val_acc(self) -> float:
        """Validation accuracy at the trial's last epoch (what selection uses)."""
        return M.last_val_acc(self.history)

    @property
    def best_val_acc(self) -> float:
        return M.best_val_acc(self.history)

    @property
    def epochs(self) -> int:
        return len(self.history)


def best_row(rows: list[TrialRow]) -> TrialRow:
    """The trial with the highest last-epoch validation accuracy; finished trials first.

    A trial ASHA stopped after one epoch is not compared with ten-epoch trials unless nothing
    ran to the end. Ties go to the trial that started first (Tune's trial order), so the choice
    does not depend on which trial happened to finish first; `ties_at_top` lists them. Test data
    is never looked at here.
    """
    return ties_at_top(rows)[0]


def ties_at_top(rows: list[TrialRow]) -> list[TrialRow]:
    """The trials `best_row` chooses among: those with the top last-epoch validation accuracy, among
    the trials that ran to the end (among all scored trials if none did), in Tune's trial order.

    The first is the one picked; more than one means a tie, which the stages print. Accuracies tie
    when exactly equal: on one validation set they are counts over the same denominator.
    """

    pool = ranked(rows)
    if not pool:
        failed = next((r for r in rows if r.error), None)  # e.g. every trial's checkpoint hit a full disk
        why = f" (trial {failed.run_name or failed.trial_id}: {failed.error})" if failed else ""
        raise UserError(f"no trial produced a validation accuracy{why}; see the errors above")
    return [r for r in pool if r.val_acc == pool[0].val_acc]


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """The trials `best_row` chooses among (those that ran to the end, else all scored ones), best
    first by last-epoch validation accuracy, ties in Tune's trial order: ``ranked(rows)[0]`` is the
    best row. Only validation accuracy ranks them; test data is never looked at."""
    scored = [r for r in rows if r.history and math.isfinite(r.val_acc)]
    completed = [r for r in scored if r.outcome == N.Outcome.COMPLETED]
    return sorted(completed or scored, key=lambda r: -r.val_acc)  # stable: ties keep the trial order


def ensemble_candidates(rows: list[TrialRow], best_config: Mapping[str, Any], best_run_id: str | None,
                        count: int) -> list[TrialRow]:
    """The trials an ensemble adds to the best one (`best_config`, member 1, whichever way it was
    picked): the next `count - 1` of `ranked(rows)`, leaving out the best trial's run and any
    configuration already taken (a search may try one twice: retraining it again adds nothing)."""
    taken, chosen = [TrainConfig.from_dict(best_config).replace(epochs=1)], []
    for row in ranked(rows):
        if len(chosen) >= count - 1:
            break
        config = TrainConfig.from_dict(row.config).replace(epochs=1)  # the final stage sets the epochs
        if (best_run_id and row.run_id == best_run_id) or config in taken:
            continue
        taken.append(config)
        chosen.append(row)
    return chosen


def trial_rows(client, experiment_id: str, parent_run_id: str) -> list[TrialRow]:
    """A finished stage's trials as rows, from its trial runs in MLflow (where `summarize` had Tune's
    results): the configuration from the run's params (`TrainConfig.from_params`), the outcome its
    driver settled, and the validation accuracy of each epoch (the only metric the histories hold).
    Runs without an outcome (cut by Ctrl-C) are left out; rows come in Tune's trial order."""
    rows = []
    for trial_id, run in sorted(trial_runs(client, experiment_id, parent_run_id).items()):  # ids end in Tune's index
        outcome = run.data.tags.get(N.TAG_OUTCOME)
        if outcome is None or run.info.status in (N.RunStatus.RUNNING, N.RunStatus.KILLED):
            continue
        try:
            config = TrainConfig.from_params(run.data.params).to_dict()
        except ConfigError as exc:
            raise UserError(f"trial run {run.info.run_id}: its params are not a configuration this version reads: "
                            f"{exc}") from None
        # The averaged weights' accuracy too where the trial kept an average: the rows rank on the weights kept.
        keys = [M.VAL_ACC] + ([M.VAL_ACC_EMA, M.VAL_LOSS_EMA] if M.VAL_ACC_EMA in run.data.metrics else [])
        by_epoch: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp)):
                by_epoch.setdefault(m.step, {})[key] = m.value
        rows.append(TrialRow(trial_id, config, outcome, [by_epoch[e] for e in sorted(by_epoch) if M.VAL_ACC in by_epoch[e]],
                             run.info.run_id, run.info.run_name))
    return rows
