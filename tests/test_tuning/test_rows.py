"""`tuning.trials.rows`: which trial is best, which tie, in what order they rank, which ones an ensemble
adds, and a finished stage's rows read back from its runs (a stand-in client: no MLflow store)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fer_model.errors import UserError
from tuning import names as N
from tuning.trials.rows import TrialRow, best_row, ensemble_candidates, ranked, ties_at_top, trial_rows

NAN = math.nan


def row(trial_id: str, *val_accs: float, outcome: str = N.Outcome.COMPLETED, dropout: float = 0.5, lr: float = 1e-3,
        run_id: str | None = None, run_name: str = "", error: str = "") -> TrialRow:
    return TrialRow(trial_id, {"dropout": dropout, "lr": lr}, outcome, [{"val_acc": v} for v in val_accs],
                    run_id=run_id or f"run-{trial_id}", run_name=run_name, error=error)


def ids(rows) -> list[str]:
    return [r.trial_id for r in rows]


def test_a_rows_accuracies_are_its_last_and_best_epochs():
    r = row("a", 0.30, 0.52, 0.47)
    assert (r.val_acc, r.best_val_acc, r.epochs) == (0.47, 0.52, 3)
    assert row("b", 0.30, NAN).best_val_acc == 0.30 and math.isnan(row("b", 0.30, NAN).val_acc)
    empty = row("c")
    assert empty.epochs == 0 and math.isnan(empty.val_acc) and math.isnan(empty.best_val_acc)


def test_completed_trials_rank_first_by_their_last_epoch():
    rows = [row("a", 0.50, 0.40),  # best epoch .50, but its last is what counts
            row("b", 0.45),
            row("c", 0.90, outcome=N.Outcome.STOPPED_EARLY),  # higher, but did not run to the end
            row("d", 0.48),
            row("e", 0.95, NAN, outcome=N.Outcome.DIVERGED)]
    assert ids(ranked(rows)) == ["d", "b", "a"]
    assert best_row(rows).trial_id == "d" and ids(ties_at_top(rows)) == ["d"]


def test_without_a_completed_trial_every_scored_one_ranks():
    rows = [row("a", 0.30, outcome=N.Outcome.STOPPED_EARLY), row("b", 0.20, NAN, outcome=N.Outcome.DIVERGED),
            row("c", 0.35, outcome=N.Outcome.STOPPED_EARLY), row("d", outcome=N.Outcome.ERROR, error="boom")]
    assert ids(ranked(rows)) == ["c", "a"] and best_row(rows).trial_id == "c"


def test_ties_keep_tune_s_trial_order_whatever_order_they_finished_in():
    rows = [row("t0", 0.40), row("t1", 0.6, 0.55), row("t2", 0.55), row("t3", 0.2, 0.55), row("t4", 0.54)]
    assert ids(ties_at_top(rows)) == ["t1", "t2", "t3"] and best_row(rows).trial_id == "t1"
    assert ids(ranked(rows)) == ["t1", "t2", "t3", "t4", "t0"]
    assert ids(ties_at_top(rows[2:])) == ["t2", "t3"]  # the first of the tie in the order given


def test_non_finite_accuracies_are_never_ranked():
    rows = [row("a", NAN), row("b", math.inf), row("c", -math.inf), row("d", 0.10), row("e")]
    assert ids(ranked(rows)) == ["d"] and best_row(rows).trial_id == "d"


def test_no_scored_trial_is_a_user_error_naming_a_failed_trials_error():
    rows = [row("t0", NAN, outcome=N.Outcome.DIVERGED),
            row("t1", outcome=N.Outcome.ERROR, run_name="d0.3 lr1e-3", error="OSError: [Errno 28] No space left on device"),
            row("t2", outcome=N.Outcome.ERROR, error="RuntimeError: later")]
    with pytest.raises(UserError) as info:
        best_row(rows)
    assert str(info.value) == ("no trial produced a validation accuracy (trial d0.3 lr1e-3: OSError: [Errno 28] No space "
                               "left on device); see the errors above")
    with pytest.raises(UserError, match=r"\(trial t2: RuntimeError: later\)"):  # unnamed: its trial id
        ties_at_top(rows[2:])
    with pytest.raises(UserError) as info:  # no error recorded: nothing to name
        best_row([row("t0", NAN)])
    assert "(trial" not in str(info.value)
    assert ranked(rows) == [] and ranked([]) == []


def test_ensemble_candidates_skip_the_best_run_and_configurations_already_taken():
    rows = [row("a", 0.40, dropout=0.1),
            row("b", 0.45, dropout=0.2),
            row("c", 0.48, dropout=0.3),  # the best
            row("d", 0.60, dropout=0.4, outcome=N.Outcome.STOPPED_EARLY),  # not ranked: completed trials exist
            row("f", 0.45, dropout=0.6),
            row("g", 0.47, dropout=0.3),  # c's configuration again (a search may try one twice)
            row("h", 0.44, dropout=0.2),  # b's configuration, ranked after b
            row("i", 0.30, dropout=0.7)]
    best = rows[2]
    assert ids(ensemble_candidates(rows, best.config, best.run_id, 4)) == ["b", "f", "a"]
    assert ids(ensemble_candidates(rows, best.config, best.run_id, 2)) == ["b"]
    assert ensemble_candidates(rows, best.config, best.run_id, 1) == []
    assert ids(ensemble_candidates(rows, best.config, best.run_id, 10)) == ["b", "f", "a", "i"]  # all there are
    # Without the best's run id, its configuration alone leaves it (and g) out.
    assert ids(ensemble_candidates(rows, best.config, None, 3)) == ["b", "f"]
    # The epochs do not make a configuration new: the final stage sets them.
    assert ids(ensemble_candidates(rows, {**best.config, "epochs": 40}, None, 2)) == ["b"]
    # The best picked some other way (here a trial that is not even ranked): every ranked trial may join.
    outsider = rows[3]
    assert ids(ensemble_candidates(rows, outsider.config, outsider.run_id, 3)) == ["c", "b"]


# --------------------------------------------------------------------------- trial_rows, from runs


def _run(run_id: str, trial_id: str | None, params: dict, outcome: str | None, status: str = "FINISHED",
         parent: str = "parent", metrics: dict | None = None) -> SimpleNamespace:
    tags = {N.TAG_PARENT: parent, N.TAG_STAGE: N.STAGE_TRIAL}
    tags.update({N.TAG_TRIAL_ID: trial_id} if trial_id else {})
    tags.update({N.TAG_OUTCOME: outcome} if outcome else {})
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=f"name {run_id}", status=status),
                           data=SimpleNamespace(tags=tags, params=params, metrics=metrics or {"val_acc": 0.5}))


class StandInClient:
    """The two calls `trial_rows` makes of an MlflowClient, answered from lists."""

    def __init__(self, runs, histories):
        self.runs, self.histories, self.queries = runs, histories, []

    def search_runs(self, experiment_ids, query, max_results=1000):
        self.queries.append((experiment_ids, query))
        return list(self.runs)

    def get_metric_history(self, run_id, key):
        history = self.histories.get(run_id, [])
        if isinstance(history, dict):  # {key: [(step, timestamp, value)]}
            history = history.get(key, [])
        else:
            assert key == "val_acc"
        return [SimpleNamespace(step=s, timestamp=t, value=v) for s, t, v in history]


def test_trial_rows_reads_settled_trials_in_trial_order():
    params = {"dropout": "0.3", "lr": "0.001", "batch_size": "64"}
    runs = [_run("r2", "abc_00002", {**params, "dropout": "0.7"}, N.Outcome.STOPPED_EARLY),
            _run("r0", "abc_00000", params, N.Outcome.COMPLETED),
            _run("r1", "abc_00001", params, None, status="KILLED"),  # cut by Ctrl-C: no outcome yet
            _run("r3", "abc_00003", params, N.Outcome.COMPLETED, status="RUNNING"),  # a resume reopened it
            _run("r4", None, params, N.Outcome.COMPLETED)]  # not a Tune trial's run
    histories = {"r0": [(2, 20, 0.5), (1, 10, 0.4), (2, 30, 0.55)],  # step 2 logged twice (a retry): the later counts
                 "r2": [(1, 10, 0.3)]}
    client = StandInClient(runs, histories)
    rows = trial_rows(client, "7", "parent")
    assert [(r.trial_id, r.run_id, r.outcome) for r in rows] == [("abc_00000", "r0", "completed"),
                                                                  ("abc_00002", "r2", "stopped_early")]
    first, second = rows
    assert first.history == [{"val_acc": 0.4}, {"val_acc": 0.55}] and first.val_acc == 0.55
    assert first.run_name == "name r0" and first.config["dropout"] == 0.3 and first.config["batch_size"] == 64
    assert second.config["dropout"] == 0.7 and second.epochs == 1
    ((experiments, query),) = client.queries
    assert experiments == ["7"] and "'parent'" in query and f"'{N.STAGE_TRIAL}'" in query


def test_trial_rows_names_a_run_whose_params_are_not_a_configuration():
    client = StandInClient([_run("r9", "abc_00000", {"dropout": "0.3", "momentum": "0.9"}, N.Outcome.COMPLETED)], {})
    with pytest.raises(UserError, match="trial run r9: its params are not a configuration this version reads: .*momentum"):
        trial_rows(client, "7", "parent")


def test_an_averaging_trial_ranks_by_the_weights_it_keeps():
    # b's raw weights end at .50 (below a's .52), its moving average at .56 (finite loss): b is kept at .56.
    a = row("a", 0.40, 0.52)
    b = TrialRow("b", {"dropout": 0.3, "lr": 1e-3, "ema": 0.999}, N.Outcome.COMPLETED,
                 [{"val_acc": 0.45, "val_acc_ema": 0.44, "val_loss_ema": 1.2},
                  {"val_acc": 0.50, "val_acc_ema": 0.56, "val_loss_ema": 1.1}], run_id="run-b")
    assert (b.val_acc, b.best_val_acc) == (0.56, 0.56) and ids(ranked([a, b])) == ["b", "a"]
    nan_loss = TrialRow("c", {}, N.Outcome.COMPLETED, [{"val_acc": 0.50, "val_acc_ema": 0.9, "val_loss_ema": NAN}])
    assert nan_loss.val_acc == 0.50  # an average with a non-finite loss is never kept


def test_trial_rows_reads_an_averaging_trials_average_back():
    params = {"dropout": "0.3", "lr": "0.001", "ema": "0.999"}
    runs = [_run("r0", "abc_00000", params, N.Outcome.COMPLETED, metrics={"val_acc": 0.5, "val_acc_ema": 0.6})]
    histories = {"r0": {"val_acc": [(1, 10, 0.4), (2, 20, 0.5)], "val_acc_ema": [(1, 10, 0.3), (2, 20, 0.6)],
                        "val_loss_ema": [(1, 10, 1.5), (2, 20, 1.2)]}}
    (r,) = trial_rows(StandInClient(runs, histories), "7", "parent")
    assert r.history[1] == {"val_acc": 0.5, "val_acc_ema": 0.6, "val_loss_ema": 1.2} and r.val_acc == 0.6
    assert r.best_val_acc == 0.6 and r.epochs == 2
