"""Optuna's own dashboard shows the search (issue 26): every Optuna trial of a search carries its MLflow
run id as a user attribute and its per-epoch validation accuracy as intermediate values (step = epoch)."""

from __future__ import annotations

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


@pytest.mark.e2e
def test_every_optuna_trial_links_its_run_and_draws_its_curve(ray_session, workdir, tiny_folder):
    argv = ["--data", tiny_folder, "--trials", 3, "--epochs", 2, "--scheduler", "none", "--study-name", "links",
            "--no-final"]
    assert run_main(search.main, argv) == 0

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], "tags.stage = 'search'")
    runs = {r.info.run_id: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`{N.TAG_PARENT}` = '{parent.info.run_id}' and tags.stage = 'trial'")}
    assert len(runs) == 3

    study = optuna.load_study(study_name="links", storage=f"sqlite:///{workdir / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    linked = []
    for t in complete:
        run_id = t.user_attrs.get(N.OPTUNA_RUN_ID_ATTR)
        assert run_id in runs, (t.number, t.user_attrs)
        linked.append(run_id)
        params = runs[run_id].data.params
        assert t.params and all(_same(v, params[k]) for k, v in t.params.items()), (t.params, params)
        history = {m.step: m.value for m in client.get_metric_history(run_id, M.VAL_ACC)}
        assert sorted(history) == [1, 2]
        assert t.intermediate_values == pytest.approx(history), (t.number, t.intermediate_values, history)
        assert t.value == pytest.approx(history[2])
    assert sorted(linked) == sorted(runs)  # one Optuna trial per run


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
