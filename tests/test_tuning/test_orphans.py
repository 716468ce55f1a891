"""A RUNNING run whose driver died is settled by the next command; a live driver's run is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from tuning import names as N
from tuning.tracking.liveness import settle_orphans
from tuning.tracking.store import create_run, ensure_experiment, set_tags


def test_runs_of_a_dead_driver_are_settled_and_a_live_ones_are_not(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ensure_experiment(client, "e")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited

    def stage(pid: int, started: str) -> str:
        run_id = create_run(client, exp, "grid", {N.TAG_STAGE: N.STAGE_GRID})
        import socket

        set_tags(client, run_id, {N.TAG_DRIVER_HOST: socket.gethostname(), N.TAG_DRIVER_PID: pid,
                                  N.TAG_DRIVER_STARTED: started, N.TAG_HEARTBEAT: "0"})
        return run_id

    from tuning.tracking.liveness import process_start_time

    dead = stage(dead_pid, "1")
    live = stage(os.getpid(), f"{process_start_time(os.getpid()):.0f}")
    trial = create_run(client, exp, "d0.3", {N.TAG_STAGE: N.STAGE_TRIAL, N.TAG_PARENT: dead})
    live_trial = create_run(client, exp, "d0.5", {N.TAG_STAGE: N.STAGE_TRIAL, N.TAG_PARENT: live})

    assert set(settle_orphans(client, exp)) == {dead, trial}
    for run_id in (dead, trial):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags[N.TAG_OUTCOME] == N.Outcome.DRIVER_LOST
    for run_id in (live, live_trial):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert settle_orphans(client, exp) == []  # nothing left to settle
