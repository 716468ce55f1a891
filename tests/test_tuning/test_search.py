"""`python -m tuning.search`: OptunaSearch + ASHA on real Ray, real sqlite MLflow, a real Optuna storage."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import artifact_names, run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import grid, search
from tuning import names as N
from tuning.spaces import DEFAULT_SEARCH_SPACE
from tuning.stages.search import starting_point


def _children(client, parent_id):
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    return client.search_runs([exp.experiment_id], f"tags.`{N.TAG_PARENT}` = '{parent_id}' and tags.stage = 'trial'")


def _search_run(client):
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'search'")
    return run


@pytest.mark.e2e
def test_search_seeded_by_the_grid_with_asha(ray_session, workdir, tiny_folder):
    # A finished grid in the same experiment: its best configuration is the search's first trial.
    assert run_main(grid.main, ["--data", tiny_folder, "--dropouts", "0.5", "--lrs", "2e-3", "--epochs", 1,
                                "--batch-size", 64, "--no-final"]) == 0
    argv = ["--data", tiny_folder, "--trials", 5, "--epochs", 3, "--grace-period", 1, "--reduction-factor", 2,
            "--study-name", "s1", "--final-epochs", 1, "--start-from", "latest-grid"]
    assert run_main(search.main, argv) == 0

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = _search_run(client)
    assert parent.info.status == "FINISHED" and parent.data.tags[N.TAG_STUDY] == "s1"
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 5
    first = trials[0].params
    assert first["dropout"] == 0.5 and first["lr"] == 2e-3 and first["batch_size"] == 64 and first["optimizer"] == "adam"
    for t in trials:
        assert t.params["batch_size"] in (32, 64, 128, 256) and t.params["optimizer"] in ("adam", "adamw", "sgd", "rmsprop")
        assert 1e-4 <= t.params["lr"] <= 1e-2 or t.number == 0
        assert 0.2 <= t.params["dropout"] <= 0.7 and 1e-6 <= t.params["weight_decay"] <= 1e-3

    children = _children(client, parent.info.run_id)
    assert len(children) == 5
    stopped = [c for c in children if c.data.tags[N.TAG_OUTCOME] == N.Outcome.STOPPED_EARLY]
    for c in children:
        epochs = len(client.get_metric_history(c.info.run_id, M.VAL_ACC))
        assert c.info.status == "FINISHED"
        assert (c.data.tags[N.TAG_OUTCOME] == N.Outcome.STOPPED_EARLY) == (epochs < 3)
    assert stopped, "ASHA with reduction factor 2 stops some of 5 trials"
    names = artifact_names(client, parent.info.run_id)
    assert {"search_trials.csv", "optimization_history.png", "parallel_coordinate.png",
            "slice_batch_size_optimizer.png", "param_importances.png"} <= names
    finals = client.search_runs([parent.info.experiment_id], f"tags.stage = 'final' and tags.`{N.TAG_PARENT}` = '{parent.info.run_id}'")
    assert len(finals) == 1 and len(client.search_model_versions(f"name = '{N.DEFAULT_MODEL_NAME}'")) == 1


@pytest.mark.e2e
@pytest.mark.slow  # the resume path also runs in test_resume.py's chain test; Ctrl-C in test_sigterm_...
def test_interrupted_search_resumes_without_repeating_trials(ray_session, workdir, tiny_folder, capsys):
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    argv = ["--data", tiny_folder, "--trials", 4, "--epochs", 2, "--scheduler", "none", "--max-concurrent", 1,
            "--study-name", "r1", "--no-final", "--address", ray_session]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.search", *map(str, argv)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = sum(t.state.is_finished() for t in optuna.load_study(study_name="r1", storage=storage).trials)
        except Exception:  # noqa: BLE001 - the study is not created yet
            done = 0
        if done >= 2:
            break
        time.sleep(1)
    assert done >= 2, proc.communicate(timeout=30)[0].decode()[-3000:] if proc.poll() is not None else "no progress"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user interrupts it
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode != 0, out[-2000:]
    assert re.search(r"continue with: python -m tuning\.search --data \S+ .*--resume", out), out[-2000:]
    interrupted = len(optuna.load_study(study_name="r1", storage=storage).trials)
    assert interrupted < 4, "the search was interrupted before finishing"

    # A changed value is refused with both values named; the command as first typed, plus --resume, runs.
    assert run_main(search.main, [*argv, "--trials", 5, "--resume"]) == 2
    assert "--trials was 4, now 5" in capsys.readouterr().err
    assert run_main(search.main, [*argv, "--resume"]) == 0
    study = optuna.load_study(study_name="r1", storage=storage)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = _search_run(client)  # one search run, continued
    children = _children(client, parent.info.run_id)
    assert len(children) == 4 and len({c.data.tags[N.TAG_TRIAL_ID] for c in children}) == 4
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)


@pytest.mark.parametrize("text, message", [
    ("batch_size: {choice: [32, 64]}\nlearning_rate: {loguniform: [1e-4, 1e-2]}\n", "unknown key 'learning_rate'"),
    ("lr: {loguniform: [1e-2, 1e-4]}\n", "is empty"),
    ("lr: {loguniform: [0, 1e-2]}\n", "loguniform needs low > 0"),
    ("dropout: {uniform: [0.2, 1.5]}\n", "dropout: value 1.5 is not allowed"),
    ("optimizer: {choice: [adam, lbfgs]}\n", "optimizer: value 'lbfgs' is not allowed"),
    ("lr: [1, 2\n", "not valid YAML"),
    ("batch_size: {loguniform: [16, 256]}\n", "batch_size takes integers: use choice or randint"),
    ("hidden: {choice: [100]}\n", "hidden: value 100 is not allowed"),
    ("dropout: {randint: [0, 1]}\n", "dropout: randint does not fit it"),
    ("hidden: {randint: [64, 129]}\n", "hidden: randint does not fit it; use choice"),
    ("epochs: 20\n", "epochs is not searched: set it with --epochs"),
    ("arch: {choice: [cnn, resnet]}\nwidth: {uniform: [0.5, 1.0]}\n", "width: value 0.5 is not allowed with arch cnn"),
])
def test_bad_space_file_gives_one_line_and_exit_2(workdir, capsys, text, message):
    (workdir / "space.yaml").write_text(text)
    assert run_main(search.main, ["--space", "space.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "space.yaml" in err


def test_starting_point_is_moved_inside_the_space():
    point = starting_point({"dropout": 0.3, "lr": 1e-3, "batch_size": 32, "optimizer": "adam",
                                   "weight_decay": 0.0, "epochs": 10}, DEFAULT_SEARCH_SPACE)
    assert point == {"dropout": 0.3, "lr": 1e-3, "batch_size": 32, "optimizer": "adam", "weight_decay": 1e-6}


def test_space_file_yaml_and_json_give_the_same_space(workdir):
    from tuning.spaces import load_space

    (workdir / "s.yaml").write_text("lr: {loguniform: [1e-4, 1e-2]}\nbatch_size: {choice: [32, 64]}\noptimizer: sgd\n")
    (workdir / "s.json").write_text('{"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [32, 64]}, "optimizer": "sgd"}')
    assert load_space(workdir / "s.yaml") == load_space(workdir / "s.json") == {
        "lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [32, 64]}, "optimizer": "sgd"}


@pytest.mark.e2e
@pytest.mark.parametrize("queued", [False, True])
def test_time_budget_ends_the_search_as_finished_not_interrupted(ray_session, workdir, tiny_folder, capsys, queued):
    # queued: two trials at once of 2 CPUs each on Ray's 2, so the second waits for a CPU the budget never
    # frees: a trial that never started is no interruption (the 60-minute laptop search exited 130 on one).
    at_once = ["--max-concurrent", 2, "--cpus-per-trial", 2] if queued else ["--max-concurrent", 1]
    argv = ["--data", tiny_folder, "--trials", 6, "--epochs", 40, "--scheduler", "none", *at_once,
            "--time-budget", 30, "--study-name", "tb", "--no-final"]
    assert run_main(search.main, argv) == 0
    assert ("had not started when the time budget ran out" in capsys.readouterr().out) == queued
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = _search_run(client)
    assert parent.info.status == "FINISHED"
    children = _children(client, parent.info.run_id)
    assert children and all(c.info.status == "FINISHED" for c in children)
    assert any(c.data.tags[N.TAG_OUTCOME] == N.Outcome.STOPPED_EARLY for c in children)


def test_resume_keeps_its_start(workdir, capsys):
    assert run_main(search.main, ["--resume", "--start-from", "latest-grid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--start-from does not apply with --resume" in err


def test_strong_space_brings_its_epochs_and_grace_period_and_flags_override(workdir):
    from tuning import options as flags
    from tuning.spaces import STRONG_SEARCH_SPACE

    def options(*argv):
        return flags.search_options(search.build_parser().parse_args(list(argv)), f"sqlite:///{workdir / 'm.db'}")

    strong = options("--space", "strong")
    assert strong.space == STRONG_SEARCH_SPACE and strong.epochs == 30 and strong.scheduler.grace_period == 5
    given = options("--space", "strong", "--epochs", "8", "--grace-period", "3")
    assert given.epochs == 8 and given.scheduler.grace_period == 3
    default = options()
    assert default.space == DEFAULT_SEARCH_SPACE and default.epochs == 15 and default.scheduler.grace_period == 2
    # the final stage follows the named space's trial length (1.5x), unless --final-epochs says
    args = search.build_parser().parse_args(["--space", "strong"])
    assert flags.common_options(args, trial_epochs=flags.search_epochs(args)).final.epochs == 45


@pytest.mark.e2e
@pytest.mark.slow  # ~60 s (a vgg of 40M parameters among them); the space itself is checked in CI above
def test_strong_space_trials_train_every_sampled_architecture(ray_session, workdir, tiny_folder):
    argv = ["--data", tiny_folder, "--space", "strong", "--trials", 3, "--epochs", 2, "--study-name", "strong",
            "--no-final", "--search-seed", 1]
    assert run_main(search.main, argv) == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    children = _children(client, _search_run(client).info.run_id)
    assert len(children) == 3
    for c in children:
        p = c.data.params
        assert c.info.status == "FINISHED" and c.data.tags[N.TAG_OUTCOME] == N.Outcome.COMPLETED
        assert p["arch"] in ("resnet", "vgg") and p["flip"] == "True" and p["schedule"] in ("cosine", "onecycle", "plateau")
        assert len(client.get_metric_history(c.info.run_id, M.VAL_ACC)) in (1, 2)  # ASHA may stop one at its grace period
