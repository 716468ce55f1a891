"""What a user sees: one line per trial and the results on stdout, no library chatter on stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from tuning.reporting import report
from tuning.trials.rows import TrialRow, best_row, ties_at_top


def _row(trial_id: str, dropout: float, val: float, outcome: str = "completed") -> TrialRow:
    return TrialRow(trial_id, {"dropout": dropout, "lr": 1e-3}, outcome, [{"val_acc": 0.1}, {"val_acc": val}],
                    run_name=f"d{dropout:g} lr1e-3")


def test_a_tie_at_the_top_is_named_and_the_first_in_trial_order_picked():
    rows = [_row("a", 0.3, 0.20), _row("b", 0.5, 0.2533), _row("c", 0.7, 0.2533),
            _row("d", 0.9, 0.40, outcome="stopped_early")]  # higher, but did not run to the end
    assert [r.trial_id for r in ties_at_top(rows)] == ["b", "c"] and best_row(rows).trial_id == "b"
    assert report.tie_line(rows) == ("2 trials tie at 25.33% validation accuracy; picked the first in trial order "
                                     "(d0.5 lr1e-3, d0.7 lr1e-3)")
    assert report.tie_line(rows[:2]) is None  # one leader: nothing to say


def test_the_studys_numbers_only_beside_a_full_data_grid():
    rows = [_row("a", 0.3, 0.25)]
    assert "(57.30%)" in report.grid_text(rows, [0.3], [1e-3])
    text = report.grid_text(rows, [0.3], [1e-3], study=False)
    assert "25.00%" in text and "57.30" not in text and "study" not in text


def test_tunes_tables_only_when_verbose(monkeypatch):
    from tuning.trials.runner import VERBOSE_ENV, TablesWhenVerbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not TablesWhenVerbose().should_report([], done=True)
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert TablesWhenVerbose().should_report([], done=True)


@pytest.mark.e2e
def test_the_token_notice_is_dropped_and_the_disabled_warning_kept(ray_session):
    from ray._private.authentication import authentication_token_setup as auth

    from tuning.options import ClusterOptions
    from tuning.trials.runner import init_ray

    assert init_ray(ClusterOptions()) is False  # the session's Ray: joined, not started; the filter is set
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(auth.__name__)
    logger.addHandler(handler)
    try:
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("Token authentication is disabled")


@pytest.mark.e2e
def test_a_grid_prints_a_line_per_trial_and_no_library_chatter(ray_session, workdir, tiny_folder):
    argv = ["--data", tiny_folder, "--max-samples", 200, "--dropouts", "0.3,0.5", "--lrs", "1e-3", "--epochs", 2,
            "--final-epochs", 1, "--address", ray_session]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FER_TUNE_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-m", "tuning.grid", *map(str, argv)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    for chatter in ("snapshotting", "Traceback", "tensorboard", "Checkpoint successfully created", "CloudPickle",
                    "MLflow database tables"):
        assert chatter not in err and chatter not in out, f"{chatter!r} on the console:\n{err[-3000:]}"
    # Tune's tables are off; each trial ends in one line of ours, counted.
    assert "Trial status:" not in out and "Configuration for experiment" not in out
    assert "running Tune experiment grid-" in out and "(2 trials)" in out
    ends = [line for line in out.splitlines() if line.startswith("trial d")]
    assert len(ends) == 2, out
    assert {line.split(":")[0] for line in ends} == {"trial d0.3 lr1e-3", "trial d0.5 lr1e-3"}
    assert all(" after 2 epochs (completed) [" in line for line in ends) and ends[-1].endswith("[2/2 done]")
    # A subset of the data (--max-samples): the study's full-data accuracies are not put beside ours.
    assert "dropout | lr 0.001" in out and "(57.30%)" not in out and "study test" not in out
    assert "best: dropout " in out
