"""`python -m cluster.local`: a real Ray head, two real worker nodes and a real `mlflow server` on
127.0.0.1, a grid across them, and a `down` that leaves none of their processes running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest
from helpers import run_main
from mlflow.tracking import MlflowClient

from cluster import local
from tuning import names as N
from tuning.trainable import TAG_NODE_ID, TAG_RESUMED_FROM


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module (starting one costs ~20 s): a head, two workers, a server.

    Its teardown is a test too: `down` stops every recorded process, keeps the data, and a second
    `down` says so."""
    from fer_model.cli import run_cli

    folder = tmp_path_factory.mktemp("cluster") / "c"
    assert run_cli(local.main, ["up", "--workers", "2", "--dir", str(folder)]) == 0
    state = local.ClusterState.read(folder)
    yield folder, state
    assert run_cli(local.main, ["down", "--dir", str(folder)]) == 0
    assert not [pid for p in state.processes for pid in p.pids if _alive(pid)]
    assert local.ClusterState.read(folder) is None and (folder / "mlflow.db").exists()
    assert run_cli(local.main, ["down", "--dir", str(folder)]) == 0


@pytest.mark.slow  # a multi-node cluster: ~2 min with its fixture; cluster.local's CLI errors stay in the default run
def test_a_grid_spreads_over_the_workers(cluster, tmp_path, tiny_folder, capsys):
    folder, state = cluster
    assert run_main(local.main, ["up", "--dir", folder]) == 0  # already up: nothing changes
    assert "already up" in capsys.readouterr().out and local.ClusterState.read(folder).processes == state.processes
    assert run_main(local.main, ["status", "--dir", folder]) == 0
    assert "3 live node(s)" in capsys.readouterr().out

    env = {**os.environ, **local.cluster_env(state), "PYTHONUNBUFFERED": "1"}
    argv = ["--data", tiny_folder, "--dropouts", "0.3,0.5", "--lrs", "1e-3,2e-3", "--epochs", "1",
            "--final-epochs", "1", "--batch-size", "64", "--experiment", "spread", "--model-name", "spread"]
    proc = subprocess.run([sys.executable, "-m", "tuning.grid", *map(str, argv)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trials per node:" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()

    # The server unreachable when a stage starts: one line, exit 2, before any training.
    dead = {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "tuning.grid", *map(str, argv)], env=dead, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: MLflow tracking server http://127.0.0.1:9 is unreachable ([Errno 111] Connection refused)"]

    client = MlflowClient(state.tracking_uri)
    exp = client.get_experiment_by_name("spread")
    trials = client.search_runs([exp.experiment_id], f"tags.{N.TAG_STAGE} = '{N.STAGE_TRIAL}'")
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    assert len({t.data.tags[TAG_NODE_ID] for t in trials}) >= 2  # both workers took trials
    (grid,) = client.search_runs([exp.experiment_id], f"tags.{N.TAG_STAGE} = '{N.STAGE_GRID}'")
    assert grid.data.params["ray_nodes"] == "3" and float(grid.data.params["ray_cpus"]) == 2
    (fin,) = client.search_runs([exp.experiment_id], f"tags.{N.TAG_STAGE} = '{N.STAGE_FINAL}'")
    assert {f.path for f in client.list_artifacts(fin.info.run_id)} >= {"evaluation", "model"}
    assert len(client.search_model_versions("name = 'spread'")) == 1


def test_a_port_in_use_is_one_line_and_nothing_starts(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert run_main(local.main, ["up", "--ray-port", port, "--dir", tmp_path / "c"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: --ray-port {port} is in use on 127.0.0.1"]
    assert local.ClusterState.read(tmp_path / "c") is None


def _raylet_node_ids(state) -> dict[str, int]:
    """Node id -> raylet pid, for the worker nodes `up` started (from the raylets' own command lines)."""
    out = {}
    for p in state.processes:
        if not p.role.startswith("worker"):
            continue
        for pid in p.pids:
            try:
                proc = psutil.Process(pid)
                if proc.name() == "raylet":
                    node = next(a.split("=", 1)[1] for a in proc.cmdline() if a.startswith("--node_id="))
                    out[node] = pid
            except (psutil.NoSuchProcess, StopIteration):
                continue
    return out


@pytest.mark.slow  # a lost node: a trial restored from its checkpoint is also tested by test_faults.py's worker SIGKILL
def test_a_lost_worker_node_costs_its_trials_no_epochs(cluster, tmp_path, tiny_folder):
    """SIGKILL the raylet of a node running a trial: the trial continues from its checkpoint on the
    other worker, in the same MLflow run, and the stage finishes. (Last in the module: it costs a node.)"""
    import time

    folder, state = cluster
    raylets = _raylet_node_ids(state)
    assert len(raylets) == 2
    env = {**os.environ, **local.cluster_env(state), "PYTHONUNBUFFERED": "1"}
    epochs = 4
    argv = ["--data", tiny_folder, "--dropouts", "0.3,0.5", "--lrs", "1e-3", "--epochs", epochs,
            "--final-epochs", "1", "--batch-size", "16", "--experiment", "loss", "--model-name", "loss"]
    grid_proc = subprocess.Popen([sys.executable, "-m", "tuning.grid", *map(str, argv)], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(state.tracking_uri)
    killed, deadline = None, time.time() + 300
    while killed is None and time.time() < deadline and grid_proc.poll() is None:
        exp = client.get_experiment_by_name("loss")
        runs = client.search_runs([exp.experiment_id], f"tags.{N.TAG_STAGE} = '{N.STAGE_TRIAL}'") if exp else []
        for run in runs:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
            node = run.data.tags.get(TAG_NODE_ID)
            if steps and max(steps) < epochs and node in raylets:
                os.kill(raylets[node], 9)  # the node is lost mid-trial
                killed = (run.info.run_id, node, max(steps))
                break
        time.sleep(0.5)
    out = grid_proc.communicate(timeout=600)[0]
    assert killed is not None, out[-3000:]
    assert grid_proc.returncode == 0, out[-3000:]

    exp = client.get_experiment_by_name("loss")
    trials = client.search_runs([exp.experiment_id], f"tags.{N.TAG_STAGE} = '{N.STAGE_TRIAL}'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)  # one run per trial
    moved = next(t for t in trials if t.info.run_id == killed[0])
    assert moved.data.tags[TAG_NODE_ID] != killed[1]  # finished on the surviving worker
    assert int(moved.data.tags[TAG_RESUMED_FROM]) >= killed[2]  # from its checkpoint, not epoch 1
    for t in trials:
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val_acc")] == list(range(1, epochs + 1))
    assert len(client.search_model_versions("name = 'loss'")) == 1
