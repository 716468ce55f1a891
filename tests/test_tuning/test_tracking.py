"""The one place a run's status is set (`tracked_run`), against a real sqlite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning import names as N
from tuning.tracking import create_run, ensure_experiment, tracked_run


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (KeyboardInterrupt, "KILLED"), (ValueError, "FAILED")])
def test_tracked_run_sets_the_status_by_how_the_block_ended(tmp_path, raised, status):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = create_run(client, ensure_experiment(client, "e"), "final", {N.TAG_STAGE: N.STAGE_FINAL})
    try:
        with tracked_run(client, run_id, heartbeat=None):
            assert client.get_run(run_id).info.status == "RUNNING"
            if raised:
                raise raised()
    except (KeyboardInterrupt, ValueError):
        pass
    run = client.get_run(run_id)
    assert run.info.status == status
    assert run.data.tags[N.TAG_DRIVER_PID] and run.data.tags[N.TAG_DRIVER_HOST]


# One command's first touch of the store: what a grid or search driver does before anything else.
FIRST_TOUCH = """
import sys
from tuning.tracking import client_for, create_run, ensure_experiment
client = client_for(sys.argv[1])
run_id = create_run(client, ensure_experiment(client, "race"), "run", {"who": sys.argv[2]})
client.set_terminated(run_id, "FINISHED")
"""


def test_two_commands_on_a_new_sqlite_store_both_start(tmp_path):
    """Without the lock beside the db, the slower of two processes creating the tables died in an
    alembic migration (seen in every one of 4 tries here); each pair gets a fresh file."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    for attempt in range(2):  # the race showed in every pair tried without the lock
        uri = f"sqlite:///{tmp_path / f'mlflow{attempt}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", FIRST_TOUCH, uri, str(k)], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
        results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
        for out, err, code in results:
            assert code == 0, err[-3000:]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
        assert sorted(r.data.tags["who"] for r in runs) == ["0", "1"]
        assert {r.info.status for r in runs} == {"FINISHED"}
