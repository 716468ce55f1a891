"""The one place a run's status is set (`tracked_run`), against a real sqlite store."""

from __future__ import annotations

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
