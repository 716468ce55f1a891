"""Optuna's own dashboard shows the search (issue 26): every Optuna trial of a search carries its MLflow
run id as a user attribute and its per-epoch validation accuracy as intermediate values (step = epoch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import run_main
from mlflow.tracking import MlflowClient
from ray import tune

from fer_model import metrics as M
from tuning import names as N
from tuning import search
from tuning.trials.runner import LinkedOptunaSearch, OptunaStudy, optuna_searcher


def _same(optuna_value, mlflow_param: str) -> bool:
    if isinstance(optuna_value, (int, float)) and not isinstance(optuna_value, bool):
        return float(mlflow_param) == pytest.approx(float(optuna_value), rel=1e-12)
    return mlflow_param == str(optuna_value)


def check_links(workdir, study_name: str, trials: int, epochs: int) -> None:
    """Every COMPLETE Optuna trial of the study names one of the search's MLflow trial runs (whose params
    are its params), its intermediate values are that run's val_acc history by epoch; one trial per run."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], "tags.stage = 'search'")
    runs = {r.info.run_id: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`{N.TAG_PARENT}` = '{parent.info.run_id}' and tags.stage = 'trial'")}
    assert len(runs) == trials

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == trials
    linked = []
    for t in complete:
        run_id = t.user_attrs.get(N.OPTUNA_RUN_ID_ATTR)
        assert run_id in runs, (t.number, t.user_attrs)
        linked.append(run_id)
        params = runs[run_id].data.params
        assert t.params and all(_same(v, params[k]) for k, v in t.params.items()), (t.params, params)
        history = {m.step: m.value for m in client.get_metric_history(run_id, M.VAL_ACC)}  # a step logged again: its last
        assert sorted(history) == list(range(1, epochs + 1))
        assert t.intermediate_values == pytest.approx(history), (t.number, t.intermediate_values, history)
        assert t.value == pytest.approx(history[epochs])
    assert sorted(linked) == sorted(runs)  # one Optuna trial per run


@pytest.mark.e2e
def test_every_optuna_trial_links_its_run_and_draws_its_curve(ray_session, workdir, tiny_folder):
    argv = ["--data", tiny_folder, "--trials", 3, "--epochs", 2, "--scheduler", "none", "--study-name", "links",
            "--no-final"]
    assert run_main(search.main, argv) == 0
    check_links(workdir, "links", trials=3, epochs=2)


@pytest.mark.e2e
@pytest.mark.slow  # an interrupted search and its --resume (~1 min)
def test_the_links_survive_an_interrupted_search_and_its_resume(ray_session, workdir, tiny_folder):
    """The searcher Tune saved is the one --resume continues with: trials finished before the Ctrl-C and
    those run (or continued from their checkpoint) after it are all linked and drawn."""
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    argv = ["--data", tiny_folder, "--trials", 3, "--epochs", 2, "--scheduler", "none", "--max-concurrent", 1,
            "--study-name", "r-links", "--no-final", "--address", ray_session]
    proc = subprocess.Popen([sys.executable, "-m", "tuning.search", *map(str, argv)], cwd=workdir,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and proc.poll() is None and done < 1:
        try:
            done = sum(t.state.is_finished() for t in optuna.load_study(study_name="r-links", storage=storage).trials)
        except Exception:  # noqa: BLE001 - the study is not created yet
            done = 0
        time.sleep(0.5)
    assert done >= 1, proc.communicate(timeout=30)[0].decode()[-3000:] if proc.poll() is not None else "no progress"
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, out[-2000:]
    assert len(optuna.load_study(study_name="r-links", storage=storage).get_trials(
        states=[optuna.trial.TrialState.COMPLETE])) < 3, "interrupted before the end"
    assert run_main(search.main, [*argv, "--resume"]) == 0
    check_links(workdir, "r-links", trials=3, epochs=2)


def _searcher(folder) -> LinkedOptunaSearch:
    folder.mkdir(exist_ok=True)
    searcher = optuna_searcher(OptunaStudy("unit", f"sqlite:///{folder / 'optuna.db'}", seed=1))
    assert searcher.set_search_properties(M.VAL_ACC, "max", {"lr": tune.loguniform(1e-4, 1e-2)})
    return searcher


def test_results_report_by_epoch_once_and_survive_save_and_restore(tmp_path):
    """What Tune calls on the searcher, without Ray running: results at step = epoch (not Tune's
    training_iteration), the run id set once, an epoch gone over again (a retry) not reported twice,
    and all of it kept through `save`/`restore` (what --resume does with the searcher)."""
    searcher = _searcher(tmp_path)
    assert "lr" in searcher.suggest("t1")
    searcher.on_trial_result("t1", {M.VAL_ACC: 0.30, N.EPOCH: 1, N.RUN_ID: "run-a", "training_iteration": 5})
    searcher.save(str(tmp_path / "searcher.pkl"))

    restored = _searcher(tmp_path / "fresh")  # a fresh searcher, as Tune builds before restoring its state
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert isinstance(restored, LinkedOptunaSearch)
    restored.on_trial_result("t1", {M.VAL_ACC: 0.99, N.EPOCH: 1, N.RUN_ID: "run-a"})  # the retry's epoch 1
    restored.on_trial_result("t1", {M.VAL_ACC: 0.40, N.EPOCH: 2, N.RUN_ID: "run-a"})
    restored.on_trial_complete("t1", {M.VAL_ACC: 0.40, N.EPOCH: 2})

    (trial,) = optuna.load_study(study_name="unit", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.40
    assert trial.intermediate_values == {1: 0.30, 2: 0.40}
    assert trial.user_attrs == {N.OPTUNA_RUN_ID_ATTR: "run-a"}


def test_a_searcher_saved_before_the_links_restores(tmp_path):
    """A --resume of a search whose searcher was pickled without `_reported_epochs` still reports."""
    searcher = _searcher(tmp_path)
    searcher.suggest("t1")
    del searcher._reported_epochs
    searcher.on_trial_result("t1", {M.VAL_ACC: 0.25, N.EPOCH: 1, N.RUN_ID: "run-b"})
    searcher.on_trial_result("t1", {M.VAL_ACC: 0.50})  # no epoch: nothing to draw
    searcher.on_trial_complete("t1", {M.VAL_ACC: 0.25})
    (trial,) = optuna.load_study(study_name="unit", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trial.intermediate_values == {1: 0.25} and trial.user_attrs[N.OPTUNA_RUN_ID_ATTR] == "run-b"
