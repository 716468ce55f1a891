"""The one place a run's status is set (`tracked_run`), against a real sqlite store."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning import names as N
from tuning.tracking.store import create_run, ensure_experiment, tracked_run


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
from tuning.tracking.store import client_for, create_run, ensure_experiment
client = client_for(sys.argv[1])
run_id = create_run(client, ensure_experiment(client, "race"), "run", {"who": sys.argv[2]})
client.set_terminated(run_id, "FINISHED")
"""


@pytest.mark.e2e  # a real process or the real data, seconds each: not in the -m 'not e2e' minute
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


def _fail_once(monkeypatch, owner, attr: str, when=lambda *a, **k: True) -> list:
    """Make `owner.attr` raise ENOSPC the first time `when(*args)` holds; returns the list of calls that raised."""
    real, raised = getattr(owner, attr), []

    def failing(*args, **kwargs):
        if not raised and when(*args, **kwargs):
            raised.append(args)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)
    return raised


def _stamping(target: str):
    """True for alembic's stamp of migration `target`: its DDL has run, its version is not yet recorded."""
    return lambda maintainer, step, *a, **k: target in getattr(step, "to_revisions", ())


@pytest.mark.parametrize("where", ["mid-migration", "registry-touch"])
def test_a_new_store_whose_creation_fails_leaves_nothing_behind(tmp_path, monkeypatch, where):
    """A full disk mid-creation left a half-migrated file that failed every later open ("duplicate
    column name: db_payload_generation") until deleted by hand. Mid-migration is the failure seen:
    migration da6fb0208061 (batch DDL, committed) ran and the disk filled before alembic recorded it;
    later MLflow versions without it fail at their newest migration instead. Now the store is built
    in a temporary file and renamed into place: a failure leaves no store, and one clear line."""
    from alembic.runtime import migration
    from mlflow.store.db.utils import _get_latest_schema_revision
    from mlflow.store.db_migrations import versions

    from fer_model.errors import UserError
    from tuning.tracking import store as tracking

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    if where == "mid-migration":
        target = "da6fb0208061" if list(Path(versions.__file__).parent.glob("da6fb0208061_*.py")) \
            else _get_latest_schema_revision()
        raised = _fail_once(monkeypatch, migration.HeadMaintainer, "update_to_step", _stamping(target))
    else:
        raised = _fail_once(monkeypatch, MlflowClient, "search_registered_models")
    with pytest.raises(UserError) as err:
        tracking.client_for(uri)
    assert raised, "the failure was not injected"
    message = str(err.value)
    assert str(db) in message and "No space left on device" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db.lock"]  # no store, no temporary file

    monkeypatch.undo()  # space is freed: the next command creates a working store
    client = tracking.client_for(uri)
    run_id = create_run(client, ensure_experiment(client, "e"), "run", {})
    client.create_registered_model("m")
    client.create_model_version("m", f"runs:/{run_id}/model", run_id=run_id)
    assert MlflowClient(uri, registry_uri=uri).get_registered_model("m").name == "m"
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow.db" in p.name and p.suffix != ".lock") \
        in (["mlflow.db"], ["mlflow.db", "mlflow.db-shm", "mlflow.db-wal"])
    import sqlite3

    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
