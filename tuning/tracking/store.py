"""MLflow: experiments, stage runs whose status the driver owns, one child run per Tune trial id, artifacts.

Everything goes through an explicit `MlflowClient(tracking_uri)` and run ids, never the fluent
"active run" state, so a trial on another machine logs to the same store by URI alone.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fer_model.cli import on_stop
from fer_model.errors import UserError, first_line
from tuning import names as N
from tuning.names import EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING
from tuning.tracking.liveness import HEARTBEAT_SECONDS, Heartbeat, driver_tags
from tuning.tracking.uri import TrackingError, sqlite_path

log = logging.getLogger(__name__)
_BATCH = 900  # log_batch accepts at most 1,000 metrics per call


_READY: set[Path] = set()  # sqlite stores this process has seen created (or created itself)
_READY_LOCK = threading.Lock()


def client_for(uri: str) -> MlflowClient:
    """A client for `uri`, its registry included (else MLflow would use the process-wide registry URI).

    A new sqlite store is created (its tables migrated) under a file lock, see `_sqlite_first_use`,
    and atomically, see `_create_sqlite_store`.
    """
    db = sqlite_path(uri)
    with _sqlite_first_use(db) if db is not None else nullcontext(False) as first:
        if first and db is not None:
            if db.exists():
                _sqlite_wal(db)  # a store made before WAL mode was ours, or by another tool
            else:
                _create_sqlite_store(db)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store already
        if first:  # an existing store's pending migrations (a newer MLflow) run now, while the lock is held
            _open_stores(client)
    return client


def _open_stores(client: MlflowClient) -> None:
    """Open every store MLflow opens lazily (the registry's only on first use): each migrates then."""
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)


@contextmanager
def _sqlite_first_use(db: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``<db>.lock`` while this process first opens the sqlite store `db`
    (yields True then; False once it has, or when no lock file can be made).

    MLflow creates a store's tables by running its alembic migrations when a client first opens it,
    with no lock of its own: two commands started together on a new file both migrate, and the
    slower one dies ("Online migration expected to match one row ... in 'alembic_version'; 0 found").
    With the lock the second waits, then finds the tables made. The lock file stays: deleting it
    would let a waiter hold a lock on a file nobody else opens.
    """
    key = db.resolve()
    with _READY_LOCK:  # one thread of this process does it; the others wait here
        if key in _READY:
            yield False
            return
        with file_lock(Path(f"{key}.lock")) as held:
            yield held
        if held:
            _READY.add(key)


@contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if needed, and left: deleting it would let a waiter
    hold a lock on a file nobody else opens); yields False, holding nothing, when the file cannot be
    made (a missing or read-only folder: the store's own error will say so)."""
    import fcntl

    try:
        lock = open(path, "a")
    except OSError as exc:
        log.debug("no lock file %s: %s", path, exc)
        yield False
        return
    with lock:  # closing the file releases the flock
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield True


def _create_sqlite_store(db: Path) -> None:
    """Create the sqlite store `db` whole or not at all: migrated in a temporary file beside it, then
    renamed into place.

    MLflow's migrations are not one transaction on sqlite (a batch migration commits its DDL before
    alembic records it): a full disk mid-way left a file every later open failed on ("duplicate column
    name: db_payload_generation") until someone deleted it. A failure here leaves no store, and one
    line naming it (`TrackingError`, a user error), so the next command, once space is freed, starts over.
    """
    import tempfile

    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".creating", dir=db.parent)
        os.close(fd)
        tmp = Path(name)
        _sqlite_wal(tmp)  # before the tables: the file is in WAL mode from its first write
        tmp_uri = f"sqlite:///{tmp}"
        try:
            _open_stores(MlflowClient(tracking_uri=tmp_uri, registry_uri=tmp_uri))
        finally:
            _close_engines(tmp_uri)
        _sqlite_settle(tmp)
        try:  # a hard link is atomic and, unlike a rename, never replaces a store another tool made meanwhile
            os.link(tmp, db)
        except FileExistsError:
            log.info("MLflow store %s was created meanwhile by another process: that one is used", db)
        except OSError:  # a filesystem without hard links: a rename, unless a store appeared meanwhile
            if not db.exists():
                os.rename(tmp, db)
                tmp = None
    except Exception as exc:  # noqa: BLE001 - whatever failed (ENOSPC, sqlite's "disk is full"), nothing is left
        raise TrackingError(f"the MLflow store {db} could not be created (nothing was left behind): "
                            f"{first_line(exc)}") from None
    finally:  # the temporary name goes either way (after a link the store lives on under `db`)
        if tmp is not None:
            for leftover in (tmp, *(Path(f"{tmp}{s}") for s in ("-wal", "-shm", "-journal"))):
                leftover.unlink(missing_ok=True)


def _close_engines(db_uri: str) -> None:
    """Close MLflow's pooled connections to `db_uri` and forget them (MLflow caches one engine per URI
    and store kind): a connection left open on the temporary file would keep its ``-wal`` file alive."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store in (TrackingStore, RegistryStore):
        engines = getattr(store, "_engine_map", {})
        for key in [k for k in engines if k == db_uri]:
            engines.pop(key).dispose()


def _sqlite_settle(db: Path) -> None:
    """Fold `db`'s write-ahead log into the file and flush it to disk, so that the file alone is the
    store when it is renamed (the last connection closing deletes the ``-wal`` and ``-shm`` files)."""
    import sqlite3

    con = sqlite3.connect(db, timeout=30)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    with open(db, "rb+") as f:
        os.fsync(f.fileno())


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if needed (local stores keep artifacts beside the db).

    It is marked a training experiment (MLflow 3's experiment kind, `N.EXPERIMENT_KIND_TAG`)
    when created, and when reused without a kind; a kind someone chose stays.
    """
    db = sqlite_path(client.tracking_uri)
    if db is not None:
        _sqlite_wal(db)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (db.parent / "mlartifacts").as_uri() if db else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING})
        except Exception:  # noqa: BLE001 - created concurrently by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    if exp is not None and not exp.tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)
    return experiment_id


def _sqlite_wal(db: Path) -> None:
    """Write-ahead logging: concurrent trial processes (and `mlflow ui`) then block each other far less.

    The mode is stored in the database file, so setting it once in the driver covers every trial.
    """
    import sqlite3

    with sqlite3.connect(db, timeout=30) as con:
        con.execute("PRAGMA journal_mode=WAL")


def create_run(client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, Any],
               params: Mapping[str, Any] | None = None) -> str:
    run = client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()})
    if params:
        log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i:i + _BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_files(client: MlflowClient, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path)


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The trial runs of a stage run, by Tune trial id (one query)."""
    query = f"tags.`{N.TAG_PARENT}` = '{parent_run_id}' and tags.`{N.TAG_STAGE}` = '{N.STAGE_TRIAL}'"
    runs = client.search_runs([experiment_id], query, max_results=5000)
    return {r.data.tags[N.TAG_TRIAL_ID]: r for r in runs if N.TAG_TRIAL_ID in r.data.tags}


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str):
    query = f"tags.`{N.TAG_PARENT}` = '{parent_run_id}' and tags.`{N.TAG_TRIAL_ID}` = '{trial_id}'"
    runs = client.search_runs([experiment_id], query, max_results=2)
    return runs[0] if runs else None


def versions_of_run(client: MlflowClient, run_id: str, name: str | None = None) -> list:
    """The registered model versions made from run `run_id` (of model `name` only, if given)."""
    return [v for v in client.search_model_versions(f"run_id = '{run_id}'") if name is None or v.name == name]


def latest_stage_run(client: MlflowClient, experiment_id: str, stage: str, extra: str = "", statuses=()):
    """The newest run of `stage` (with an extra filter, in one of `statuses`), or None."""
    query = f"tags.`{N.TAG_STAGE}` = '{stage}'" + (f" and {extra}" if extra else "")
    for run in client.search_runs([experiment_id], query, max_results=50, order_by=["attributes.start_time DESC"]):
        if not statuses or run.info.status in statuses:
            return run
    return None


# --------------------------------------------------------------------------- runs the driver owns


# MLflow's HTTP client retries a dead server itself, ~4 minutes a call (7 retries, backoff doubling from
# 2 s), in which the driver says nothing and a stop waits. The driver's own calls retry for ~30 s
# (2 + 4 + 8 + 16 s; 20 s a request), through a server's restart (`cluster.local up`: ~10-20 s here),
# then fail in one line; a trial's epoch writes keep retrying in their queue. Trials keep MLflow's
# defaults: their Ray workers were started before the driver sets these. After SIGTERM, one try.
DRIVER_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
STOPPING_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}  # after SIGTERM: one try


@contextmanager
def bound_driver_retries() -> Iterator[None]:
    """For the length of a command, this process's MLflow calls give up on a dead server in ~30 s
    (`DRIVER_HTTP`, unless set already); after SIGTERM (`fer_model.cli.on_stop`) they try once. The
    environment is put back after, so a later command in the same process (the tests) starts its own
    local Ray with MLflow's defaults for its trials."""
    before = {key: os.environ.get(key) for key in DRIVER_HTTP}
    for key, value in DRIVER_HTTP.items():
        os.environ.setdefault(key, value)
    on_stop(_fail_fast, _retry_again)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_BEFORE_STOP: dict[str, str | None] = {}


def _fail_fast() -> None:
    for key, value in STOPPING_HTTP.items():
        _BEFORE_STOP.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _retry_again() -> None:
    for key, value in _BEFORE_STOP.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _BEFORE_STOP.clear()


def unreachable(exc: BaseException) -> str | None:
    """One line when `exc` is MLflow's client giving up on a server that does not answer (refused, reset,
    timed out); None for any other error."""
    text = str(exc)
    if "API request to" in text and ("failed with exception" in text or "timeout exception" in text):
        return first_line(exc)[:300]
    return None


@contextmanager
def tracked_run(client: MlflowClient, run_id: str, heartbeat: float | None = HEARTBEAT_SECONDS) -> Iterator[str]:
    """The one place a stage or final run's status is set: RUNNING inside (with this driver's tags and
    a heartbeat), then FINISHED on success, KILLED on Ctrl-C, FAILED on an error."""
    set_tags(client, run_id, driver_tags())
    client.update_run(run_id, status=N.RunStatus.RUNNING)
    beat = Heartbeat(client, run_id, heartbeat) if heartbeat else None
    if beat:
        beat.start()
    status = N.RunStatus.FAILED
    try:
        yield run_id
        status = N.RunStatus.FINISHED
    except KeyboardInterrupt:
        status = N.RunStatus.KILLED
        raise
    finally:
        if beat:
            beat.stopped.set()
        try:
            client.set_terminated(run_id, status)
        except Exception as exc:  # noqa: BLE001 - the store may be what failed; the next command settles it
            log.warning("run %s could not be marked %s: %s", run_id, status, exc)


# --------------------------------------------------------------------------- a stage's best configuration


def record_best(client: MlflowClient, parent_run_id: str, config: Mapping[str, Any], trial_run_id: str | None) -> None:
    """The best configuration on its stage run: ``best.*`` params, and the tag the final stage reads."""
    log_params(client, parent_run_id, {f"{N.BEST_PARAM_PREFIX}{k}": v for k, v in config.items()})
    set_tags(client, parent_run_id, {N.TAG_BEST_CONFIG: json.dumps(dict(config), sort_keys=True),
                                     N.TAG_BEST_TRIAL_RUN: trial_run_id or ""})


def read_best_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    raw = client.get_run(run_id).data.tags.get(N.TAG_BEST_CONFIG)
    if not raw:
        raise UserError(f"run {run_id} has no {N.TAG_BEST_CONFIG} tag: it is not a finished grid or search run")
    return json.loads(raw)
