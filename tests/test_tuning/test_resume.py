"""`tuning.grid --resume`: a grid chain whose driver was SIGKILLed continues where it stopped.

Real processes: the grid driver is a subprocess on the test session's Ray, killed with SIGKILL
(no cleanup: as an OOM kill or a closed laptop); the resume runs in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import artifact_names, run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import grid
from tuning import names as N

pytestmark = pytest.mark.e2e  # every test here starts Ray (see pyproject's markers)


def _runs(client, query: str = ""):
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    return client.search_runs([exp.experiment_id], query, max_results=1000) if exp else []


def _start_and_kill(workdir, argv, ready, sig: int = signal.SIGKILL) -> tuple[int, str, float]:
    """Start `tuning.grid argv` as a process; send it `sig` once `ready(client)` holds.
    Returns its exit code, its output, and the seconds it took to exit after the signal."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.grid", *map(str, argv)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready(client):
                break
        except Exception:  # noqa: BLE001 - the store is being created
            pass
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate(timeout=30)[0].decode()[-3000:]
    t0 = time.time()
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0].decode()
    return proc.returncode, out, time.time() - t0


def _epochs_logged(client, stage_run_query: str) -> int:
    """The most epochs any trial under the matching stage run has logged."""
    parents = [r.info.run_id for r in _runs(client, stage_run_query)]
    counts = [len(client.get_metric_history(t.info.run_id, M.VAL_ACC))
              for p in parents for t in _runs(client, f"tags.`{N.TAG_PARENT}` = '{p}' and tags.stage = 'trial'")]
    return max(counts, default=0)


def _check_trials(client, parent_id: str, n: int, epochs: int) -> None:
    trials = _runs(client, f"tags.`{N.TAG_PARENT}` = '{parent_id}' and tags.stage = 'trial'")
    assert len(trials) == n and len({t.data.tags[N.TAG_TRIAL_ID] for t in trials}) == n
    for t in trials:
        steps = [m.step for m in client.get_metric_history(t.info.run_id, M.VAL_ACC)]
        assert sorted(steps) == list(range(1, epochs + 1)), f"{t.info.run_name}: epochs {steps}"  # each once
        assert t.info.status == "FINISHED" and t.data.tags[N.TAG_OUTCOME] == N.Outcome.COMPLETED


def test_grid_driver_killed_then_resumed(ray_session, workdir, tiny_folder, capsys):
    argv = ["--data", tiny_folder, "--dropouts", "0.3,0.5", "--lrs", "1e-3", "--epochs", 2, "--max-concurrent", 1,
            "--final-epochs", 1, "--address", ray_session]
    _start_and_kill(workdir, argv, lambda c: _epochs_logged(c, "tags.stage = 'grid'") >= 1)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (killed,) = _runs(client, "tags.stage = 'grid'")
    assert killed.info.status == "RUNNING"  # nobody was left to say otherwise

    # A value other than the one it started with is refused, both named; nothing is touched.
    assert run_main(grid.main, [*argv, "--epochs", 3, "--resume"]) == 2
    assert "--epochs was 2, now 3" in capsys.readouterr().err
    # The command as first typed, plus --resume: the same values are accepted.
    assert run_main(grid.main, [*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming grid run {killed.info.run_id}" in out

    (parent,) = _runs(client, "tags.stage = 'grid'")  # the same grid run, continued
    assert parent.info.run_id == killed.info.run_id and parent.info.status == "FINISHED"
    _check_trials(client, parent.info.run_id, 2, 2)
    with open(client.download_artifacts(parent.info.run_id, "grid_results.csv")) as f:  # Tune's results
        assert len(f.read().strip().splitlines()) == 1 + 2
    (fin,) = _runs(client, "tags.stage = 'final'")
    assert fin.info.status == "FINISHED" and fin.data.tags[N.TAG_PARENT] == parent.info.run_id
    assert not _runs(client, "attributes.status = 'RUNNING'")
    assert len(client.search_model_versions(f"name = '{N.DEFAULT_MODEL_NAME}'")) == 1

    # Nothing left to resume: one line, exit 2.
    assert run_main(grid.main, [*argv, "--resume"]) == 2
    assert "no interrupted grid" in capsys.readouterr().err


def test_chain_killed_in_its_search_resumes_at_the_search(ray_session, workdir, tiny_folder):
    argv = ["--data", tiny_folder, "--dropouts", "0.3", "--lrs", "1e-3", "--epochs", 1, "--search-trials", 2,
            "--search-epochs", 2, "--search-scheduler", "none", "--max-concurrent", 1, "--final-epochs", 1,
            "--address", ray_session]
    _start_and_kill(workdir, argv, lambda c: _epochs_logged(c, "tags.stage = 'search'") >= 1)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (grid_run,) = _runs(client, "tags.stage = 'grid'")
    assert grid_run.info.status == "FINISHED" and N.TAG_CHAIN_DONE not in grid_run.data.tags

    assert run_main(grid.main, ["--data", tiny_folder, "--resume", "--address", ray_session]) == 0
    (grid_after,) = _runs(client, "tags.stage = 'grid'")
    _check_trials(client, grid_after.info.run_id, 1, 1)  # the grid was not run again
    (search_run,) = _runs(client, "tags.stage = 'search'")
    assert search_run.data.tags[N.TAG_CHAINED_FROM] == grid_run.info.run_id and search_run.info.status == "FINISHED"
    _check_trials(client, search_run.info.run_id, 2, 2)
    (fin,) = _runs(client, "tags.stage = 'final'")
    assert fin.data.tags[N.TAG_PARENT] == search_run.info.run_id and fin.info.status == "FINISHED"
    assert "search_trials.csv" in artifact_names(client, search_run.info.run_id)
    assert grid_after.data.tags[N.TAG_CHAIN_DONE] == "true"
    assert not _runs(client, "attributes.status = 'RUNNING'")


def test_sigterm_is_a_ctrl_c_that_says_how_to_resume(ray_session, workdir, tiny_folder):
    argv = ["--data", tiny_folder, "--dropouts", "0.3", "--lrs", "1e-3", "--epochs", 5, "--no-final",
            "--address", ray_session]
    code, out, seconds = _start_and_kill(workdir, argv, lambda c: _epochs_logged(c, "tags.stage = 'grid'") >= 1,
                                         signal.SIGTERM)
    assert code == 130 and seconds < 15, (code, seconds, out[-2000:])
    assert "continue with: python -m tuning.grid --data" in out and "--resume" in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = _runs(client, "tags.stage = 'grid'")
    assert run.info.status == "KILLED"  # settled by the driver itself, not left RUNNING
