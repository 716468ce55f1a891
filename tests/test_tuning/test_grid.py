"""`python -m tuning.grid` end to end: real local Ray, real MLflow (sqlite, and a real server), read back
through MlflowClient only."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import artifact_names, run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from fer_model.config import CLASS_NAMES
from tuning import final, grid
from tuning import names as N

FAST = ["--epochs", 1, "--final-epochs", 2, "--batch-size", 64]
EVALUATION_FILES = {"confusion_matrix.png", "roc_curves.png", "classification_report.txt",
                    "classification_report.json", "learning_curves.png"}


def runs_of(client: MlflowClient, experiment: str = N.DEFAULT_EXPERIMENT):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=500)


def check_pipeline(client: MlflowClient, expected_trials: set[tuple[float, float]], epochs: int = 1) -> dict:
    runs = runs_of(client)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get(N.TAG_STAGE), []).append(r)
    assert len(by_stage[N.STAGE_GRID]) == 1
    parent = by_stage[N.STAGE_GRID][0]
    assert parent.info.status == "FINISHED"
    trials = by_stage[N.STAGE_TRIAL]
    assert {(float(t.data.params["dropout"]), float(t.data.params["lr"])) for t in trials} == expected_trials
    assert len(trials) == len(expected_trials)
    for t in trials:
        assert t.data.tags[N.TAG_PARENT] == parent.info.run_id
        assert t.data.tags[N.TAG_TRIAL_ID] and t.info.status == "FINISHED"
        assert t.data.tags[N.TAG_OUTCOME] == N.Outcome.COMPLETED
        assert t.data.params["batch_size"] == "64" and t.data.params["optimizer"] == "adam"
        for name in (M.TRAIN_LOSS, M.TRAIN_ACC, M.VAL_LOSS, M.VAL_ACC, M.EPOCH_SECONDS):
            assert [m.step for m in client.get_metric_history(t.info.run_id, name)] == list(range(1, epochs + 1))
        assert t.data.metrics[M.FINAL_VAL_ACC] == t.data.metrics[M.VAL_ACC]
    assert len({t.data.tags[N.TAG_TRIAL_ID] for t in trials}) == len(trials)
    assert artifact_names(client, parent.info.run_id) >= {"grid_results.csv", "val_acc_heatmap.png", "learning_curves.png"}
    assert parent.data.params["best.dropout"] and parent.data.tags[N.TAG_BEST_CONFIG]
    best_run = parent.data.tags[N.TAG_BEST_TRIAL_RUN]
    best_val = max(t.data.metrics[M.VAL_ACC] for t in trials)
    assert next(t for t in trials if t.info.run_id == best_run).data.metrics[M.VAL_ACC] == best_val

    (fin,) = by_stage[N.STAGE_FINAL]
    assert fin.data.tags[N.TAG_PARENT] == parent.info.run_id and fin.info.status == "FINISHED"
    for name in (M.TEST_ACC, M.TEST_MACRO_F1, M.TEST_PUBLIC_ACC, M.TEST_PRIVATE_ACC, M.test_f1_name("happy")):
        assert 0.0 <= fin.data.metrics[name] <= 1.0
    assert fin.data.metrics[M.TEST_ACC] > 0.3  # the tiny data is learnable: well above 1/7
    assert artifact_names(client, fin.info.run_id, "evaluation") >= EVALUATION_FILES
    versions = client.search_model_versions(f"name = '{N.DEFAULT_MODEL_NAME}'")
    assert len(versions) == 1
    v = versions[0]
    assert v.run_id == fin.info.run_id
    assert float(v.tags[M.TEST_ACC]) == pytest.approx(fin.data.metrics[M.TEST_ACC], abs=1e-4)
    assert v.tags[N.TAG_PARENT_RUN] == parent.info.run_id and v.tags[N.TAG_BEST_TRIAL_RUN] == best_run
    return {"parent": parent, "final": fin, "version": v}


@pytest.mark.e2e
def test_grid_end_to_end_on_sqlite(ray_session, workdir, tiny_folder, capsys):
    assert run_main(grid.main, ["--data", tiny_folder, *FAST, "--promote"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    got = check_pipeline(client, {(d, lr) for d in (0.3, 0.5, 0.7) for lr in (1e-3, 1e-2, 1e-4)})
    assert "dropout | lr 0.001" in out and "(57.30%)" in out  # the study's table, beside ours
    # The plan before it starts; Tune's folder gone once everything is in MLflow.
    assert "plan: grid 9 trials (dropout 0.3,0.5,0.7 x lr 0.001,0.01,0.0001) x 1 epochs" in out
    assert "then final retrain 2 epochs (--final-epochs)" in out and "results: MLflow sqlite:///" in out
    assert "removed Tune's folder" in out and not list((workdir / "ray_results").glob("grid-*"))
    assert f"registered: {N.DEFAULT_MODEL_NAME} version 1" in out and "mlflow ui --backend-store-uri sqlite:///" in out

    # Where the time went (benchmarks/pipeline.py reads these): the driver's phases on the stage runs,
    # each trial's on its own run. Ray was started by the test session, so no ray_start here.
    from tuning.trials import phases as P

    grid_metrics, final_metrics = got["parent"].data.metrics, got["final"].data.metrics
    assert {P.metric(P.DATA_LOAD), P.metric(P.TRIALS), P.metric(P.CONCLUDE)} <= set(grid_metrics)
    assert grid_metrics[P.metric(P.TRIALS)] > 0 and P.metric(P.RAY_START) not in grid_metrics
    assert {P.metric(P.FINAL_TRAIN), P.metric(P.FINAL_EVALUATE), P.metric(P.REGISTER)} <= set(final_metrics)
    trial_runs = [r for r in runs_of(client) if r.data.tags.get(N.TAG_STAGE) == N.STAGE_TRIAL]
    for r in trial_runs:
        phases = {k for k in r.data.metrics if k.startswith(P.PREFIX)}
        assert phases == {P.metric(p) for p in (P.TRIAL_OPEN, P.TRIAL_FIT, P.TRIAL_CHECKPOINT, P.TRIAL_MLFLOW_WAIT)}
        assert r.data.metrics[P.metric(P.TRIAL_FIT)] > 0

    # The registered model takes image bytes and gives emotions; --promote made it the champion.
    import mlflow.pyfunc
    import pandas as pd

    assert "promotion: version 1 test_acc" in out and "(the first champion)" in out
    assert str(client.get_model_version_by_alias(N.DEFAULT_MODEL_NAME, "champion").version) == "1"
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{N.DEFAULT_MODEL_NAME}@champion")
    png = next((tiny_folder / "test").rglob("*.png")).read_bytes()
    predicted = model.predict(pd.DataFrame({"image": [png, png]}))
    # a row per face: these 48x48 crops are one each, in input order, with the face columns before the emotion's
    from tuning.registry import pyfunc

    assert predicted["emotion"].tolist()[0] in CLASS_NAMES and predicted[pyfunc.ROW].tolist() == [0, 1]
    assert list(predicted.columns) == [pyfunc.ROW, pyfunc.FACE_FOUND, *pyfunc.BOX_COLUMNS, pyfunc.FACE_SCORE,
                                       pyfunc.LABEL, pyfunc.EMOTION, *pyfunc.PROB_COLUMNS]

    # `tuning.final` on the finished grid adds a new final run and version; earlier runs stay as they were.
    # With --ensemble 2 it reads the grid's trial runs back (their params, validation accuracy and outcome).
    before = {r.info.run_id: (r.info.status, r.data.metrics) for r in runs_of(client)}
    argv = ["--run-id", got["parent"].info.run_id, "--data", tiny_folder, "--final-epochs", 1, "--ensemble", 2]
    assert run_main(final.main, argv) == 0
    after = runs_of(client)
    assert len(after) == len(before) + 1
    for r in after:
        if r.info.run_id in before:
            assert (r.info.status, r.data.metrics) == before[r.info.run_id]
    versions = client.search_model_versions(f"name = '{N.DEFAULT_MODEL_NAME}'")
    assert len(versions) == 2
    v2 = next(v for v in versions if str(v.version) == "2")
    members = v2.tags[N.TAG_MEMBER_TRIAL_RUNS].split(",")
    assert v2.tags[M.ENSEMBLE_SIZE] == "2" and members[0] == got["version"].tags[N.TAG_BEST_TRIAL_RUN]
    trial_val = {r.info.run_id: r.data.metrics[M.VAL_ACC] for r in after if r.data.tags.get(N.TAG_STAGE) == N.STAGE_TRIAL}
    assert trial_val[members[1]] == sorted(trial_val.values())[-2]  # the second best by validation accuracy
    assert "ensemble of 2: test accuracy" in capsys.readouterr().out


@pytest.mark.e2e
@pytest.mark.slow  # grids against a real server also run in test_ui.py and test_faults.py
def test_grid_against_a_real_mlflow_server(ray_session, workdir, tiny_folder, mlflow_server):
    argv = ["--data", tiny_folder, "--dropouts", "0.3,0.5", "--lrs", "1e-3", *FAST, "--tracking-uri", mlflow_server]
    assert run_main(grid.main, argv) == 0
    assert not (workdir / "mlflow.db").exists()  # nothing went to the embedded default
    check_pipeline(MlflowClient(mlflow_server), {(0.3, 1e-3), (0.5, 1e-3)})


@pytest.mark.parametrize("argv, message", [
    (["--lrs", "0"], "lr must be a positive number"),
    (["--lrs", "1e-3,-1e-2"], "lr must be a positive number"),
    (["--dropouts", "1.0"], "dropout must be in [0, 1)"),
    (["--optimizer", "adagrad"], "optimizer must be one of"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--data", "/no/such/folder"], "does not exist"),
    (["--tracking-uri", "http://127.0.0.1:9"], "is unreachable"),
    (["--max-samples", "3"], "max_samples must be at least"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be within 0..1"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--tracking-uri", "mlruns"], "cannot be used"),
    (["--data-seed", "-1"], "data seed must be >= 0"),
    (["--resume", "--start-from", "x"], "unrecognized arguments: --start-from x"),
    (["--search-epochs", "3"], "--search-epochs only apply with --search-trials"),
    (["--grace-period", "1"], "--grace-period only apply with --scheduler asha"),
    (["--search-trials", "0"], "--search-trials must be >= 1"),
    (["--no-final", "--final-epochs", "3"], "--final-epochs need(s) the final stage"),
    (["--no-final", "--promote"], "--promote need(s) the final stage"),
    (["--no-final", "--ensemble", "3"], "--ensemble need(s) the final stage"),
    (["--ensemble", "1"], "--ensemble must be an integer >= 2 or auto, got '1'"),
])
def test_bad_flags_give_one_line_and_exit_2(workdir, capsys, argv, message):
    assert run_main(grid.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.e2e  # a real process or the real data, seconds each: not in the -m 'not e2e' minute
def test_cli_bad_flag_as_a_process(workdir):
    proc = subprocess.run([sys.executable, "-m", "tuning.grid", "--dropouts", "abc"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: expected comma-separated numbers, got 'abc'"]

