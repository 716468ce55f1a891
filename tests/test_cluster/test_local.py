"""`python -m cluster.local`: a real Ray head, two real worker nodes and a real `mlflow server` on
127.0.0.1, a grid across them, and a `down` that leaves none of their processes running; a member
killed is restarted by `up`, `status` answers in seconds against a hung cluster, the ports survive
`down` and `up`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from helpers import run_main
from mlflow.tracking import MlflowClient

from cluster import local
from tuning import names as N
from tuning.names import TAG_NODE_ID, TAG_RESUMED_FROM


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


@pytest.mark.e2e
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


@pytest.mark.e2e
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


def _group_pids(state) -> set[int]:
    """Every process now in a group `up` recorded, and the descendants of their leaders."""
    groups = {p.pid for p in state.processes}
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups:
                found.add(proc.pid)
        except (OSError, psutil.Error):
            continue
    for leader in groups:
        try:
            found |= {c.pid for c in psutil.Process(leader).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return {pid for pid in found if _alive(pid)}


# What the groups of `up` do on SIGTERM: a leader that goes at once and leaves its children (mlflow
# server's helpers), children that take a while to exit, one that ignores SIGTERM, one in a session
# of its own (as Ray's workers are, the raylet's children).
FAKE_GROUP = """
import signal, subprocess, sys, time
slow = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0))); print(1, flush=True); time.sleep(120)"
deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"
kids = [subprocess.Popen([sys.executable, "-c", c], stdout=subprocess.PIPE) for c in (slow, slow, deaf)]
kids.append(subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, start_new_session=True))
for k in kids:
    k.stdout.readline()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(120)
"""


def _state(folder, processes, address="127.0.0.1:1", uri="http://127.0.0.1:1"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "auth_token").write_text("0" * 64)
    state = local.ClusterState(str(folder), address, uri, str(folder / "tune"), str(folder / "auth_token"), 0, processes)
    state.write()
    return state


@pytest.mark.e2e  # a real process or the real data, seconds each: not in the -m 'not e2e' minute
def test_down_returns_once_every_process_of_its_groups_is_gone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(local, "STOP_TIMEOUT", 3.0)
    leader = subprocess.Popen([sys.executable, "-c", FAKE_GROUP], stdout=subprocess.PIPE, text=True, start_new_session=True)
    kids = [int(pid) for pid in leader.stdout.readline().split()]
    try:
        # Only the leader is recorded: the rest is found by its group id and as its descendants.
        started = local.Started("fake", leader.pid, [leader.pid], "", {str(leader.pid): psutil.Process(leader.pid).create_time()})
        _state(tmp_path / "c", [started])
        t = time.time()
        assert run_main(local.main, ["down", "--dir", tmp_path / "c"]) == 0
        took = time.time() - t
        assert not [pid for pid in [leader.pid, *kids] if _alive(pid)]
        out = capsys.readouterr().out
        assert "down: stopped 5 process(es) of 1 group(s)" in out and "(1 killed after 3 s of SIGTERM)" in out, out
        assert 3 <= took < 10  # the one that ignores SIGTERM is waited for, then killed
        assert local.ClusterState.read(tmp_path / "c") is None
    finally:
        for pid in [leader.pid, *kids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        leader.wait()


@pytest.mark.e2e
def test_status_answers_in_seconds_against_a_hung_head_and_server(tmp_path, capsys):
    """A head and a server that accept connections and never answer (a stopped process's socket
    does that), and a dead member: every probe has its timeout."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    with socket.socket() as head, socket.socket() as server:
        for s in (head, server):
            s.bind(("127.0.0.1", 0))
            s.listen()
        _state(tmp_path / "c", [local.Started("head", dead, [dead], "", {str(dead): 1.0})],
               f"127.0.0.1:{head.getsockname()[1]}", f"http://127.0.0.1:{server.getsockname()[1]}")
        t = time.time()
        assert run_main(local.main, ["status", "--dir", tmp_path / "c"]) == 1
        assert time.time() - t < local.PROBE_TIMEOUT + 5  # bounded: before, 2 min against a half-dead cluster
    out = capsys.readouterr().out
    assert f"head       pid {dead:<8} DEAD" in out
    assert f"no answer: the head did not answer within {local.PROBE_TIMEOUT:g} s" in out and "unreachable (timed out)" in out, out
    assert "dead: head. `python -m cluster.local up --dir" in out


def test_up_takes_the_ports_of_the_last_up_where_they_are_free(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        kept = s.getsockname()[1]
    assert local._choose_port("--mlflow-port", None, kept) == kept
    with socket.socket() as s:
        s.bind(("127.0.0.1", kept))
        s.listen()
        other = local._choose_port("--mlflow-port", None, kept)
        assert other != kept and f"mlflow-port: {kept}, the port of the last `up`, is in use" in capsys.readouterr().out
        with pytest.raises(Exception, match=f"--mlflow-port {kept} is in use"):
            local._choose_port("--mlflow-port", kept, None)


def _health(uri: str) -> int:
    with urllib.request.urlopen(uri + "/health", timeout=5) as r:
        return r.status


@pytest.mark.e2e
@pytest.mark.slow  # three cluster starts, a restart and three stops (~100 s); the fast tests above cover down, status and ports without Ray
def test_dead_members_are_restarted_and_the_ports_survive_down_and_up(tmp_path, capsys):
    folder = tmp_path / "c"
    assert run_main(local.main, ["up", "--workers", "1", "--dir", folder]) == 0
    state = local.ClusterState.read(folder)
    try:
        server = next(p for p in state.processes if p.role == "mlflow")
        os.kill(server.pid, signal.SIGKILL)  # the server alone: its helpers stay and hold its port
        while _alive(server.pid):  # the kernel's kill takes a moment
            time.sleep(0.1)
        capsys.readouterr()
        assert run_main(local.main, ["status", "--dir", folder]) == 1
        assert "dead: mlflow" in capsys.readouterr().out

        assert run_main(local.main, ["up", "--dir", folder]) == 0
        assert "dead: mlflow; restarting mlflow" in capsys.readouterr().out
        again = local.ClusterState.read(folder)
        assert again.tracking_uri == state.tracking_uri and _health(again.tracking_uri) == 200
        assert [p.pid for p in again.processes if p.role != "mlflow"] == [p.pid for p in state.processes if p.role != "mlflow"]
        assert next(p for p in again.processes if p.role == "mlflow").pid != server.pid
        assert run_main(local.main, ["status", "--dir", folder]) == 0
        assert "2 live node(s)" in capsys.readouterr().out

        # Half-dead: the head's GCS and the server stopped (SIGSTOP): they accept and never answer.
        gcs = [pid for pid in _group_pids(again) if psutil.Process(pid).name() == "gcs_server"]
        uvicorn = [pid for pid in _group_pids(again) if "uvicorn" in " ".join(psutil.Process(pid).cmdline())]
        assert gcs and uvicorn
        for pid in gcs + uvicorn:
            os.kill(pid, signal.SIGSTOP)
        try:
            t = time.time()
            assert run_main(local.main, ["status", "--dir", folder]) == 1
            # bounded by the probe's timeout (a client of a hung GCS alone retries for 40-60 s), not a speed figure
            assert time.time() - t < local.PROBE_TIMEOUT + 10
            out = capsys.readouterr().out
            assert "the head did not answer" in out and "unreachable" in out, out
        finally:
            for pid in gcs + uvicorn:
                os.kill(pid, signal.SIGCONT)

        # A dead head: its worker belongs to its GCS, so both start again, on the head's port.
        head = next(p for p in again.processes if p.role == "head")
        os.killpg(head.pid, signal.SIGKILL)
        while _alive(head.pid):
            time.sleep(0.1)
        assert run_main(local.main, ["up", "--dir", folder]) == 0
        assert "dead: head; restarting head, worker-1" in capsys.readouterr().out
        again = local.ClusterState.read(folder)
        assert again.ray_address == state.ray_address
        assert run_main(local.main, ["status", "--dir", folder]) == 0
        assert "2 live node(s)" in capsys.readouterr().out

        ours = _group_pids(again)
        assert run_main(local.main, ["down", "--dir", folder]) == 0
        assert not [pid for pid in ours if _alive(pid)] and not _group_pids(again)  # nothing still exiting

        assert run_main(local.main, ["up", "--workers", "1", "--dir", folder]) == 0
        third = local.ClusterState.read(folder)
        assert (third.ray_address, third.tracking_uri) == (state.ray_address, state.tracking_uri)
        assert _health(third.tracking_uri) == 200
    finally:
        if local.ClusterState.read(folder) is not None:
            final = local.ClusterState.read(folder)
            assert run_main(local.main, ["down", "--dir", folder]) == 0
            assert not _group_pids(final)
