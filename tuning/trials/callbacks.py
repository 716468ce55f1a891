"""How each trial ended, settled once, in the driver; and the trials of a stage as one summary.

`TrialOutcomes` is a Tune callback, as Ray's own MLflow integration closes runs in `log_trial_end`:
- a trial whose function returned, or that a scheduler (ASHA) stopped: `on_trial_complete`;
- a trial that failed after its retries: `on_trial_error`;
- trials still running when the experiment ends: `on_experiment_end`. Tune ends them so for two
  reasons only: the --time-budget ran out (they are stopped early), or Ctrl-C (they stay
  unsettled, their runs KILLED, until --resume continues them).
The outcome is one tag; the summary metrics are written beside it, and the run is closed. The same
callback is the console's progress: one line per trial as it ends (Tune's own tables are off).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ray.tune import Callback
from ray.tune.stopper import TimeoutStopper

from fer_model import metrics as M
from fer_model.cli import STOPPING
from fer_model.errors import UserError, first_line
from tuning import names as N
from tuning.names import DIVERGED, EPOCH, RUN_ID, TAG_NODE_ID, TAG_NODE_IP
from tuning.tracking.store import client_for, find_trial_run, log_metrics, set_tags, trial_runs
from tuning.trials.rows import TrialRow
from tuning.trials.trainable import TrialSetup, run_name

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 60.0  # between trial ends, at most one "still running" line a minute


def outcome_of(last_result: Mapping[str, Any], epochs: int) -> N.Outcome:
    """The outcome of a trial that ended normally, from its last reported result: diverged when `fit`
    said so (reported with the epoch), else completed or stopped early by its epochs."""
    if last_result.get(DIVERGED):
        return N.Outcome.DIVERGED
    return N.Outcome.COMPLETED if int(last_result.get(EPOCH, 0)) >= epochs else N.Outcome.STOPPED_EARLY


@dataclass
class _Stage:
    """What this command knows of one stage run's Tune experiment."""

    setup: TrialSetup
    ended: set[str] = field(default_factory=set)  # trials that ended (their function returned, or failed)
    unsettled: dict[str, str] = field(default_factory=dict)  # trial id -> why its outcome was not written
    # Trials Tune holds as ended when this command's Tune loop first stepped (ended in an earlier command);
    # None until then. Tune marks the trials it stops on Ctrl-C TERMINATED too, so "TERMINATED" at the end
    # of an experiment alone does not mean a trial ran to its end.
    ended_at_start: set[str] | None = None


# The stages this driver runs, by stage run id. Tune pickles its callbacks and stopper with the experiment
# and a --resume gets those pickles back: they keep only the stage run's id and find this command's setup
# (tracking URI included) here, so nothing connection-bound comes back from an earlier command.
_STAGES: dict[str, _Stage] = {}


def bind(setup: TrialSetup) -> None:
    """Make `setup` (this command's: its tracking URI) the one the stage run `setup.parent_run_id`'s
    callbacks use, whether Tune made them now or restored them from an earlier command's pickle."""
    _STAGES[setup.parent_run_id] = _Stage(setup)


def _stage(parent_run_id: str) -> _Stage:
    try:
        return _STAGES[parent_run_id]
    except KeyError:  # a callback restored without `bind`: a programming error, not a user's
        raise RuntimeError(f"stage run {parent_run_id}: tuning.trials.callbacks.bind(setup) was not called before Tune ran") from None


def error_line(trial) -> str:
    """A failed trial's error, first line, through Ray's public API (Ray 2.60's Trial has no error_msg):
    the trial's local error file (written before the error callbacks run), else the copy in its storage."""
    error = None
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            error = Path(trial.error_file).read_text(errors="replace")
        else:
            error = trial.get_error()  # a TuneError holding the trace, once synced to the storage path
    except Exception:  # noqa: BLE001 - unreadable storage: say so rather than fail the settling
        pass
    lines = [line.strip() for line in str(error or "").strip().splitlines() if line.strip()]
    # A trace ends with the exception itself ("DataError: cannot read checkpoint ..."): what a person reads first.
    return lines[-1][:500] if lines else "no error recorded"


SETTLE_RETRY_S = 60.0  # retry a failed outcome write this long: through a server's restart (cluster.local up)


class TrialOutcomes(Callback):
    """Records every trial's outcome in MLflow when Tune is done with it, and closes its run; prints a
    line per ended trial (named as its run, e.g. ``d0.3 lr1e-3``) and, in between, at most one
    progress line a minute."""

    # Defaults on the class: Tune saves this callback with its experiment, and one saved before these
    # attributes existed comes back from a --resume without them.
    name_keys: tuple[str, ...] = ()
    total: int | None = None
    _ended: frozenset = frozenset()
    _last_line: float = 0.0

    def __init__(self, setup: TrialSetup, name_keys: tuple[str, ...] = (), total: int | None = None):
        self.parent_run_id = setup.parent_run_id
        self.name_keys, self.total = tuple(name_keys), total
        self._ended, self._last_line = frozenset(), time.time()

    @property
    def stage(self) -> TrialSetup:
        """This command's setup of the stage (see `bind`)."""
        return _stage(self.parent_run_id).setup

    def __setstate__(self, state: dict) -> None:
        if "stage" in state:  # pickled before `bind`: it held the first command's setup, URI and all
            state["parent_run_id"] = state.pop("stage").parent_run_id
        self.__dict__.update(state)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        if time.time() - self._last_line < PROGRESS_EVERY_S or int(result.get(EPOCH, 0)) >= int(trial.config.get("epochs", 0)):
            return  # printed a minute ago, or the trial's last epoch: its end line follows at once
        val = f"val {100 * result[M.VAL_ACC]:.2f}%" if M.VAL_ACC in result else "no validation accuracy yet"
        running = sum(t.status == "RUNNING" for t in trials)  # Tune's trial status, not an MLflow run's
        self._print(f"  trial {self._name(trial)}: epoch {result.get(EPOCH, '?')}/{trial.config.get('epochs', '?')}, "
                    f"{val} [{self._count(trials)} done, {running} running]")

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        stage = _stage(self.parent_run_id)
        if stage.ended_at_start is None:
            stage.ended_at_start = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        _stage(self.parent_run_id).ended.add(trial.trial_id)
        outcome = outcome_of(trial.last_result or {}, int(trial.config.get("epochs", 0)))
        self._settle(trial, outcome)
        self._announce(trial, trials, outcome)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        _stage(self.parent_run_id).ended.add(trial.trial_id)
        why = error_line(trial)
        log.warning("trial %s failed: %s", self._name(trial), why)
        self._settle(trial, N.Outcome.ERROR, {N.TAG_ERROR: why})
        self._announce(trial, trials, N.Outcome.ERROR)

    def _name(self, trial) -> str:
        return run_name(trial.config, list(self.name_keys)) if self.name_keys else trial.trial_id

    def _count(self, trials: list) -> str:
        """``3/9``: the trials that ended (this session or before a --resume) out of all there will be."""
        ended = self._ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        return f"{len(ended)}/{max(self.total or 0, len(trials))}"

    def _announce(self, trial, trials: list, outcome: str) -> None:
        """One line for a trial that ended, e.g. ``trial d0.3 lr1e-3: val 43.20% after 2 epochs (completed) [3/9 done]``."""
        result = trial.last_result or {}
        self._ended = self._ended | {trial.trial_id}
        val = f"val {100 * result[M.VAL_ACC]:.2f}%" if M.VAL_ACC in result else "no validation accuracy"
        epochs = int(result.get(EPOCH, 0))
        self._print(f"trial {self._name(trial)}: {val} after {epochs} epoch{'s' if epochs != 1 else ''} "
                    f"({outcome.replace('_', ' ')}) [{self._count(trials)} done]")

    def _print(self, line: str) -> None:
        print(line, flush=True)  # the driver's stdout, between Ray's forwarded worker lines
        self._last_line = time.time()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Settle, from Tune's state and the store's, every trial whose run is not settled yet: in this
        session and at every --resume, so a trial whose outcome write failed earlier (a full disk, a
        server down) is settled as soon as the store takes writes, however many commands later."""
        stage = _stage(self.parent_run_id)
        before = stage.ended_at_start
        if before is None:  # Tune never stepped: every trial had ended in an earlier command
            before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        stage.ended |= before
        ended = [t for t in trials if t.trial_id in stage.ended]
        try:
            client = client_for(self.stage.tracking_uri)
            budget_spent = client.get_run(self.parent_run_id).data.tags.get(N.TAG_STOPPED_BY) == N.STOPPED_BY_BUDGET
            runs = trial_runs(client, self.stage.experiment_id, self.parent_run_id)
        except Exception as exc:  # noqa: BLE001 - the store is unreachable: `summarize` says so, in one line
            for trial in ended:
                stage.unsettled.setdefault(trial.trial_id, first_line(exc))
            return
        for trial in trials:
            run = runs.get(trial.trial_id)
            if run is None or settled(run):
                continue  # never started, or settled (now or in an earlier command)
            if trial.trial_id in stage.ended and trial.status == "TERMINATED":  # ended; an outcome write failed
                outcome = outcome_of(trial.last_result or {}, int(trial.config.get("epochs", 0)))
                if self._settle(trial, outcome) and trial.trial_id not in self._ended:
                    self._announce(trial, trials, outcome)
            elif trial.trial_id in stage.ended and trial.status == "ERROR":
                self._settle(trial, N.Outcome.ERROR, {N.TAG_ERROR: error_line(trial)})
            elif budget_spent:
                self._settle(trial, N.Outcome.STOPPED_EARLY)
                self._announce(trial, trials, N.Outcome.STOPPED_EARLY)
            elif run.info.status == N.RunStatus.RUNNING:  # Ctrl-C: Tune saved its state; --resume reopens this run
                try:
                    client.set_terminated(run.info.run_id, N.RunStatus.KILLED)
                except Exception as exc:  # noqa: BLE001 - the next command settles it (tuning.tracking.liveness)
                    log.warning("MLflow: run %s not marked KILLED: %s", run.info.run_id, first_line(exc))

    def _settle(self, trial, outcome: str, tags: Mapping[str, str] | None = None) -> bool:
        """Write `outcome` (and the summary metrics) on the trial's run and close it; a failed write is
        retried for `SETTLE_RETRY_S` (once only if it failed so in this command already), then
        remembered for `summarize`. True once written."""
        stage = _stage(self.parent_run_id)
        result = trial.last_result or {}
        summary = {M.EPOCHS_COMPLETED: int(result.get(EPOCH, 0))}
        if M.VAL_ACC in result:
            summary[M.FINAL_VAL_ACC] = result[M.VAL_ACC]
        retry_s = 0.0 if trial.trial_id in stage.unsettled else SETTLE_RETRY_S
        deadline, wait = time.monotonic() + retry_s, 1.0
        while True:
            try:
                client = client_for(self.stage.tracking_uri)
                run_id = result.get(RUN_ID)
                if not run_id:
                    run = find_trial_run(client, self.stage.experiment_id, self.parent_run_id, trial.trial_id)
                    run_id = run.info.run_id if run else None
                if run_id is None:
                    return True  # failed before it could open its run: the summary still lists it
                log_metrics(client, run_id, summary, step=summary[M.EPOCHS_COMPLETED])
                set_tags(client, run_id, {N.TAG_OUTCOME: outcome, **(tags or {})})
                client.set_terminated(run_id, N.RunStatus.FAILED if outcome == N.Outcome.ERROR else N.RunStatus.FINISHED)
                stage.unsettled.pop(trial.trial_id, None)
                return True
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not end the experiment
                if time.monotonic() + wait > deadline or STOPPING.is_set():  # SIGTERM: stop in seconds
                    stage.unsettled[trial.trial_id] = first_line(exc)
                    log.warning("MLflow %s: outcome of trial %s not recorded: %s", self.stage.tracking_uri,
                                trial.trial_id, first_line(exc))
                    return False
                _sleep_unless_stopping(wait)
                wait *= 2


def _sleep_unless_stopping(seconds: float) -> None:
    """Sleep `seconds` in short slices, ending early once SIGTERM set `STOPPING` (a plain sleep resumes
    after the signal's handler has run, so a stop would wait out the whole backoff)."""
    end = time.monotonic() + seconds
    while not STOPPING.is_set() and time.monotonic() < end:
        time.sleep(0.1)


def settled(run) -> bool:
    """Whether a trial run's outcome is recorded and the run closed (KILLED runs are not: --resume reopens them)."""
    return run.info.status in (N.RunStatus.FINISHED, N.RunStatus.FAILED) and N.TAG_OUTCOME in run.data.tags


class BudgetStopper(TimeoutStopper):
    """Tune's time budget, which also marks its stage run when it runs out.

    Tune saves the stopper with the experiment (a resumed search gets what was left); the mark in
    MLflow is how `TrialOutcomes` tells a spent budget from Ctrl-C, in this session or a resumed one.
    Like `TrialOutcomes` it keeps only the stage run's id: the tracking URI is this command's (`bind`).
    """

    def __init__(self, seconds: float, parent_run_id: str):
        super().__init__(seconds)
        self.parent_run_id = parent_run_id

    def __setstate__(self, state: dict) -> None:
        state.pop("tracking_uri", None)  # pickled before `bind`: the first command's URI
        super().__setstate__(state)  # Tune's: the budget counts from now, not from the pickle's time

    def stop_all(self) -> bool:
        if not super().stop_all():
            return False
        set_tags(client_for(_stage(self.parent_run_id).setup.tracking_uri), self.parent_run_id,
                 {N.TAG_STOPPED_BY: N.STOPPED_BY_BUDGET})
        return True


class Interrupted(KeyboardInterrupt):
    """A stage stopped before all its trials finished (Ctrl-C); its state is saved."""


class StoreUnavailable(UserError):
    """Trials ended but the tracking store did not take their outcomes: nothing was interrupted, and
    the same command with --resume settles them once the store takes writes again."""



def summarize(results, setup: TrialSetup, expected: int | None = None) -> list[TrialRow]:
    """The stage's trials, from Tune's results and the outcomes in MLflow (the one place a running
    stage's rows are built; `trial_rows` reads a finished stage's back from MLflow).

    Raises `StoreUnavailable` when trials Tune ended have no outcome because the store refused it,
    `Interrupted` when a trial has no outcome because it was cut (Ctrl-C), or when a search created
    fewer trials than asked without its time budget running out.
    """
    stage = _STAGES.get(setup.parent_run_id) or _Stage(setup)
    try:
        client = client_for(setup.tracking_uri)
        runs = trial_runs(client, setup.experiment_id, setup.parent_run_id)
        budget_spent = client.get_run(setup.parent_run_id).data.tags.get(N.TAG_STOPPED_BY) == N.STOPPED_BY_BUDGET
    except Exception as exc:  # noqa: BLE001 - unreachable, full, or refusing reads
        raise StoreUnavailable(f"the MLflow store {setup.tracking_uri} cannot be read ({first_line(exc)}); "
                               "the trials' state is saved") from None
    rows, cut, unsettled, never_started = [], 0, [], 0
    for result in results:
        trial_id = str((result.metrics or {}).get("trial_id") or result.path.rstrip("/").split("/")[-1])
        run = runs.get(trial_id)
        outcome = run.data.tags.get(N.TAG_OUTCOME) if run else (N.Outcome.ERROR if result.error else None)
        if outcome is None or (run is not None and run.info.status in (N.RunStatus.RUNNING, N.RunStatus.KILLED)):
            if budget_spent and run is None and EPOCH not in (result.metrics or {}) and not result.error:
                # Queued for a free CPU when the budget ran out (Tune's result holds only its trial_id):
                # it never ran, so nothing of it is lost
                # (a 60-minute laptop search ended with exit 130 on one such trial before this).
                never_started += 1
            elif trial_id in stage.ended:
                unsettled.append(trial_id)  # it ended; only its outcome is missing
            else:
                cut += 1
            continue
        rows.append(TrialRow(trial_id, dict(result.config or {}), outcome, _history(result),
                             run.info.run_id if run else None, run.info.run_name if run else "",
                             f"{run.data.tags.get(TAG_NODE_ID, '')[:8]} {run.data.tags.get(TAG_NODE_IP, '')}".strip() if run else "",
                             (run.data.tags.get(N.TAG_ERROR, "") if run else "") or (first_line(result.error) if result.error else "")))
    if unsettled and not cut:  # with trials cut too, it was an interruption: Interrupted below says so
        why = next((stage.unsettled[t] for t in unsettled if t in stage.unsettled), "its outcome was not written")
        raise StoreUnavailable(f"the MLflow store {setup.tracking_uri} did not record the outcome of {len(unsettled)} "
                               f"finished trial(s) ({why}); nothing was interrupted and no training is lost")
    if never_started:
        print(f"{never_started} trial(s) had not started when the time budget ran out", flush=True)
    missing = 0 if expected is None or budget_spent else max(expected - len(results), 0)
    if cut or missing:
        raise Interrupted(f"interrupted with {cut + missing + len(unsettled)} trial(s) unfinished; the state is saved")
    return rows


def _history(result) -> list[dict[str, float]]:
    df = result.metrics_dataframe
    if df is None or df.empty or EPOCH not in df:
        return []
    df = df.sort_values(EPOCH).drop_duplicates(EPOCH, keep="last")
    keep = [k for k in (*M.EPOCH_METRICS, M.VAL_LOSS_EMA, M.VAL_ACC_EMA) if k in df]  # the averaged weights' too: rows rank on the weights kept
    return [{k: float(v) for k, v in row.items()} for row in df[keep].to_dict("records")]
