"""Ray for the length of a run, and one Tune experiment per stage: its trials run, settled, summarized."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import optuna
import ray
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from fer_model import metrics as M
from fer_model.cli import drop_log_messages, sigterm_as_ctrl_c
from fer_model.errors import UserError, first_line, storage_error
from tuning.names import EPOCH, OPTUNA_RUN_ID_ATTR, RUN_ID
from tuning.options import ClusterOptions, SchedulerSettings
from tuning.tracking.liveness import pid_namespace, process_start_time
from tuning.trials import phases
from tuning.trials.callbacks import BudgetStopper, StoreUnavailable, TrialOutcomes, bind, summarize
from tuning.trials.gpu_shares import default_share, probe_gpu_memory_mb
from tuning.trials.rows import TrialRow
from tuning.trials.trainable import TrialSetup, train_trial

log = logging.getLogger(__name__)
# "1": Ray Tune's own progress tables on the console besides our one line per trial (--verbose sets it).
VERBOSE_ENV = "FER_TUNE_VERBOSE"


def init_ray(cluster: ClusterOptions) -> bool:
    """Join `cluster.address` or start a local Ray; returns True when this call started it.

    First it stops what a dead driver's local Ray left running (`reap_dead_drivers_ray`); a local
    Ray it starts is recorded for the next command to do the same (`record_local_ray`).
    """
    # A new local Ray turns on token authentication and says so ("Token authentication is enabled for
    # this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out") at every start: the safe default
    # announced, nothing to do. Its warning that authentication is *disabled* still shows.
    drop_log_messages("ray._private.authentication.authentication_token_setup",
                      "Token authentication is enabled for this Ray cluster")
    if ray.is_initialized():
        return False
    reap_dead_drivers_ray()  # before ray.init: a dead driver's agents still hold ports and memory
    before = _descendants()
    try:
        # "local": a new Ray of our own, never a cluster someone else started with `ray start` on this
        # machine (which a plain ray.init() would join silently).
        with phases.DRIVER.time(phases.RAY_START):
            context = ray.init(address=cluster.address or "local", include_dashboard=cluster.dashboard,
                               dashboard_host="127.0.0.1", configure_logging=True, logging_level=logging.WARNING,
                               log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot join the Ray cluster at {cluster.address!r}: {first_line(exc)}") from None
    if not cluster.address:
        try:
            record_local_ray(before)
        except OSError as exc:  # a read-only home: the stage runs all the same, unrecorded
            log.warning("could not record the local Ray's processes in %s: %s", ray_records_dir(), exc)
    sigterm_as_ctrl_c()  # ray.init installed its own, which aborts mid-Tune
    if cluster.dashboard:
        print(f"Ray dashboard: http://{context.dashboard_url}")
    return True


# A SIGKILLed driver's local Ray does not all die with it. Its direct children (gcs_server, raylet,
# dashboard, monitors) get SIGKILL from the kernel when it dies (Ray's fate sharing), but the
# raylet's agents, ray::DashboardAgent and ray::RuntimeEnvAgent, see their raylet gone and then hang
# in exit for about a minute, holding ports and memory (ray-project/ray#52385; seen in 4 of 4 kills).
# So a driver records the Ray it started, and the next driver stops what a dead one left.


def ray_records_dir() -> Path:
    """Where drivers record the local Ray they started: $XDG_CACHE_HOME/fer-tune/ray, else ~/.cache/fer-tune/ray.

    One file per driver, ``ray-<driver pid>.json``: the driver's pid, start time, host and pid
    namespace, and each Ray process's pid and start time. A later `init_ray` removes it once its
    driver is gone, after stopping what is left of that Ray.
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fer-tune" / "ray"


def _same_process(pid: int, started: float) -> bool:
    """Whether `pid` still runs and is the process recorded (its start time), not a reuse of the id."""
    return abs(process_start_time(pid) - started) < 1


def _descendants() -> dict[int, tuple[float, str]]:
    """This process's descendants now: pid -> (start time, name)."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            found[child.pid] = (child.create_time(), child.name())
        except psutil.NoSuchProcess:
            continue
    return found


def record_local_ray(before: dict[int, tuple[float, str]], folder: Path | None = None) -> Path:
    """Record in `folder` the processes this driver has now and had not `before` ray.init: its local Ray.

    A driver that starts Ray again (ray.shutdown, then init_ray) adds to its record.
    """
    import psutil

    folder = folder or ray_records_dir()
    me = psutil.Process()
    procs = [{"pid": pid, "started": started, "name": name} for pid, (started, name) in _descendants().items()
             if pid not in before or before[pid][0] != started]
    path = folder / f"ray-{me.pid}.json"
    record = {"driver_pid": me.pid, "driver_started": me.create_time(), "host": socket.gethostname(),
              "pid_ns": pid_namespace(), "processes": procs}
    try:
        old = json.loads(path.read_text())
        if old.get("driver_started") == record["driver_started"]:
            record["processes"] = old["processes"] + procs
    except (OSError, ValueError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # whole or not at all: a reaper never reads half a record
    return path


def reap_dead_drivers_ray(folder: Path | None = None, timeout: float = 5.0) -> list[int]:
    """Stop what is left of the local Ray of every recorded driver that is gone; returns their pids.

    Only records of this host and pid namespace are judged (a home folder can be shared by machines
    and containers). A process is stopped only if its pid and start time are those recorded: a pid
    reused since is someone else's. SIGTERM, then SIGKILL after `timeout` seconds; a record is
    removed once nothing of it runs.
    """
    import psutil

    from cluster.local import (  # psutil's wait for a set of processes, shared with `cluster.local down`
        process_running,
        stop_and_wait,
    )

    folder = folder or ray_records_dir()
    stopped: list[int] = []
    for path in sorted(folder.glob("ray-*.json")):
        victims = []
        try:
            record = json.loads(path.read_text())
            if record["host"] != socket.gethostname() or record["pid_ns"] != pid_namespace():
                continue
            if _same_process(record["driver_pid"], record["driver_started"]):
                continue  # its driver runs: its Ray is in use
            for entry in record["processes"]:
                if _same_process(entry["pid"], entry["started"]):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        victims.append(psutil.Process(entry["pid"]))
            victims = [p for p in victims if process_running(p)]  # a zombie has exited already
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not a record of ours (records are written whole): removed below
        left: list[int] = []
        if victims:
            _, _, left = stop_and_wait(lambda: {p.pid: p for p in victims}, timeout=timeout)
            log.warning("stopped %d Ray process(es) left by a dead driver (%s)%s", len(victims) - len(left),
                        path.name, f"; still running: {left}" if left else "")
        stopped += [p.pid for p in victims if p.pid not in left]
        if not left:
            with contextlib.suppress(OSError):  # another command's reaper was first, or not ours to remove
                path.unlink(missing_ok=True)
    return stopped


def check_cluster_paths(cluster: ClusterOptions, tracking_uri: str) -> None:
    """On a cluster of several nodes, trials on other nodes cannot reach this node's files."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    if tracking_uri.startswith(("sqlite:", "file:")):
        raise UserError(f"{len(nodes)} Ray nodes but a local MLflow store ({tracking_uri}): "
                        "start `mlflow server` and pass its --tracking-uri")
    if "://" not in cluster.storage and not cluster.storage_shared:
        raise UserError(f"{len(nodes)} Ray nodes but --storage {cluster.storage} is a local folder: "
                        "pass a shared path (NFS) with --storage-shared, or a URI such as s3://bucket/path")


def check_gpu_request(cluster: ClusterOptions) -> None:
    """--gpus-per-trial > 0 on a cluster without a GPU: refused (Tune would wait for one forever)."""
    if cluster.gpus_per_trial and not ray.cluster_resources().get("GPU", 0):
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "this machine's Ray"
        raise UserError(f"--gpus-per-trial {cluster.gpus_per_trial:g} but {where} has no GPU: drop the flag "
                        "(trials train on CPUs), or use a cluster with GPUs")


@contextmanager
def ray_session(cluster: ClusterOptions, tracking_uri: str) -> Iterator[None]:
    """Ray for the length of a run: joined or started, and shut down only if started here."""
    if cluster.verbose:  # read at each progress report, by a reporter a --resume may have unpickled
        os.environ[VERBOSE_ENV] = "1"
    started = init_ray(cluster)
    try:
        check_cluster_paths(cluster, tracking_uri)
        check_gpu_request(cluster)
        gpu_share(cluster)  # a default share is chosen (and said) now, before any stage run
        yield
    finally:
        if started:
            ray.shutdown()


def cluster_params() -> dict[str, Any]:
    """The cluster a stage ran on, for its run's params."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {"ray_nodes": len(nodes), "ray_cpus": total.get("CPU", 0), "ray_gpus": total.get("GPU", 0)}


# The default share chosen for each Ray cluster this process joined (by its GCS address): the
# probe of the GPU's memory runs once, and the plan line and the trials see the same share.
_DEFAULT_SHARES: dict[str, float] = {}


def gpu_share(cluster: ClusterOptions) -> float:
    """--gpus-per-trial, else the share chosen from a GPU's memory where the cluster has GPUs
    (`tuning.trials.gpu_shares.default_share`, said once on the console), else 0."""
    if cluster.gpus_per_trial is not None:
        return cluster.gpus_per_trial
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        return 0.0
    key = f"{ray.get_runtime_context().gcs_address} {gpus:g}"
    if key not in _DEFAULT_SHARES:
        share, why = default_share(gpus, probe_gpu_memory_mb())
        print(f"GPU share per trial: {share:g} ({why}; --gpus-per-trial sets it)", flush=True)
        _DEFAULT_SHARES[key] = share
    return _DEFAULT_SHARES[key]


def tune_verbose() -> bool:
    """Whether Ray Tune's own progress tables are wanted (FER_TUNE_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


class TablesWhenVerbose(CLIReporter):
    """Tune's status tables, printed only while FER_TUNE_VERBOSE=1.

    The choice is made at every report, not when the experiment is created: Tune saves its reporter
    with the experiment, and a --resume (with or without --verbose) gets the saved one back.
    """

    def should_report(self, trials, done: bool = False) -> bool:
        return tune_verbose() and super().should_report(trials, done)


@contextmanager
def legacy_tune_output() -> Iterator[None]:
    """Tune's classic console engine for the length of a fit (RAY_AIR_NEW_OUTPUT=0), then as it was.

    Tune's default engine prints its configuration table and a `tensorboard --logdir` hint even at
    verbose=0 and ignores a passed reporter; the classic one prints only what its reporter
    (`TablesWhenVerbose`) lets through. Tune reads the variable when fit() starts.
    """
    was = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = was


FULL_BELOW_BYTES = 16 * 2**20  # less free than this under Tune's storage: one checkpoint does not fit


def full_storage(storage: str) -> str | None:
    """``"<path>: N bytes free (No space left on device)"`` when the local folder `storage` (or the
    nearest folder above it that exists) has under `FULL_BELOW_BYTES` free; None otherwise or for a URI."""
    import shutil

    if "://" in storage:
        return None
    path = Path(storage).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    return f"{storage}: {free:,} bytes free (No space left on device)" if free < FULL_BELOW_BYTES else None


@dataclass(frozen=True)
class OptunaStudy:
    """The Optuna study a search samples from (TPE, through Ray Tune's OptunaSearch)."""

    name: str
    storage_url: str
    seed: int = 0
    start_points: tuple[dict[str, Any], ...] = ()  # evaluated first, in order (`points_to_evaluate`)


def tune_space(fixed: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None = None,
               searched: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tune's param space: `fixed` values, `grid` axes (every combination), and `searched` ranges in the
    spaces' format (``{"choice": [...]}``, ``{"loguniform": [lo, hi]}``: `tuning.spaces`)."""
    space = dict(fixed)
    for key, values in (grid or {}).items():
        space[key] = tune.grid_search(list(values))
    for key, spec in (searched or {}).items():
        kind, values = next(iter(spec.items()))
        space[key] = tune.choice(values) if kind == "choice" else getattr(tune, kind)(*values)
    return space


def scheduler_for(settings: SchedulerSettings, max_epochs: int):
    """Tune's scheduler for `settings` (None: every trial runs to the end)."""
    if settings.kind != "asha":
        return None
    return ASHAScheduler(time_attr=EPOCH, max_t=max_epochs, grace_period=min(settings.grace_period, max_epochs),
                         reduction_factor=settings.reduction_factor)


class LinkedOptunaSearch(OptunaSearch):
    """OptunaSearch whose Optuna trials link to their MLflow runs and draw learning curves.

    On each result a trial reports (each epoch, through `tune.report`), its Optuna trial gets the
    validation accuracy as the intermediate value at step = epoch (Ray's own OptunaSearch reports
    at Tune's training_iteration), and once, the user attribute ``mlflow_run_id``
    (`OPTUNA_RUN_ID_ATTR`): optuna-dashboard then shows a curve per trial and the run it came from.
    An epoch already reported (a retry or a --resume going over it again) is not reported twice.

    Its state is OptunaSearch's (`save` pickles ``__dict__``, `restore` updates it), plus the last
    epoch reported per trial; a searcher saved by plain OptunaSearch restores without it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reported_epochs: dict[str, int] = {}  # Tune's trial id -> the last epoch reported to Optuna

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return  # multi-objective (no intermediate values), or a result after the trial was told
        ot_trial = self._ot_trials[trial_id]
        run_id = result.get(RUN_ID)
        if run_id and ot_trial.user_attrs.get(OPTUNA_RUN_ID_ATTR) != run_id:  # user_attrs: Optuna's cached copy
            ot_trial.set_user_attr(OPTUNA_RUN_ID_ATTR, run_id)
        epoch, value = result.get(EPOCH), result.get(self.metric)
        reported = getattr(self, "_reported_epochs", None)
        if reported is None:  # restored from a searcher saved before this class
            reported = self._reported_epochs = {}
        if epoch is None or value is None or int(epoch) <= reported.get(trial_id, 0):
            return
        ot_trial.report(float(value), int(epoch))
        reported[trial_id] = int(epoch)


def optuna_searcher(study: OptunaStudy):
    """Ray Tune's OptunaSearch over `study` (its storage keeps every trial: --resume, optuna-dashboard),
    with each trial's MLflow run id and per-epoch validation accuracy on its Optuna trial."""
    storage = optuna.storages.RDBStorage(study.storage_url)
    return LinkedOptunaSearch(points_to_evaluate=list(study.start_points) or None,
                              sampler=optuna.samplers.TPESampler(seed=study.seed), study_name=study.name, storage=storage)


def can_restore(path: str) -> bool:
    """Whether Tune can continue the experiment kept at `path`."""
    return tune.Tuner.can_restore(path)


def cluster_resources() -> dict[str, float]:
    """What the joined or started Ray has in all (CPU, GPU, ...)."""
    return ray.cluster_resources()


def gcs_address() -> str:
    """The joined cluster's GCS address (what `tuning.trials.head_watch` watches)."""
    return ray.get_runtime_context().gcs_address


def run_trials(cluster: ClusterOptions, data, setup: TrialSetup, name: str, fixed: Mapping[str, Any], *,
               grid: Mapping[str, Sequence[Any]] | None = None, searched: Mapping[str, Any] | None = None,
               study: OptunaStudy | None = None, scheduler: SchedulerSettings = SchedulerSettings(), max_epochs: int = 1,
               name_keys: Sequence[str] = (), num_samples: int = 1, time_budget_s: float | None = None,
               restore_path: str | None = None) -> list[TrialRow]:
    """Run (or, given `restore_path`, resume) one Tune experiment; every trial is settled by `TrialOutcomes`."""
    # Keeping one checkpoint per trial (bounded disk) makes Tune snapshot its state at every
    # checkpoint, i.e. every epoch, which is what lets a resume continue from the latest epoch; on a
    # local or shared folder a snapshot takes milliseconds. Tune warns about it every epoch
    # ("snapshotting has been triggered multiple times"): noise that hid the progress table.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # On Ctrl-C Tune advises "Resume experiment with: Tuner.restore(...)", Python a user of these
    # commands never writes; the stage's own message names the command with --resume.
    drop_log_messages("ray.tune.tune", "Experiment has been interrupted")
    with phases.DRIVER.time(phases.SHIP_DATA):
        trainable = tune.with_resources(
            # data: one object-store copy shared by every trial
            tune.with_parameters(train_trial, data=data, setup=setup, name_keys=tuple(name_keys)),
            {"cpu": cluster.cpus_per_trial, "gpu": gpu_share(cluster)},
        )
    total = math.prod(len(v) for v in (grid or {}).values()) * num_samples  # the trials Tune will make
    search_alg = optuna_searcher(study) if study else None
    bind(setup)  # this command's tracking URI for the callbacks, also those a restore unpickles
    if restore_path:
        # Finished trials are kept; unfinished and errored ones continue from their last checkpoint.
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(fixed, grid, searched),
            tune_config=tune.TuneConfig(
                metric=M.SELECTION_METRIC, mode=M.SELECTION_MODE, search_alg=search_alg, scheduler=scheduler_for(scheduler, max_epochs),
                num_samples=num_samples, max_concurrent_trials=cluster.max_concurrent,
                # A new trial runs in the process the last one finished in: a fresh worker first imports
                # torch, Ray Tune and MLflow (~7 s on 2 idle cores, ~12 s beside a training trial) and
                # opens its MLflow store again (benchmarks/pipeline.py; RESULTS.md).
                reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=cluster.storage,
                stop=BudgetStopper(time_budget_s, setup.parent_run_id) if time_budget_s else None,
                callbacks=[TrialOutcomes(setup, name_keys=tuple(name_keys), total=total)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest epoch is all a resume needs
                failure_config=tune.FailureConfig(max_failures=1),  # one retry from the last checkpoint
                # The console gets one line per finished trial from TrialOutcomes; Tune's tables,
                # which repeat every trial's config and metrics at each change, only with FER_TUNE_VERBOSE=1.
                verbose=1, progress_reporter=TablesWhenVerbose()),
        )
    print(f"{'continuing' if restore_path else 'running'} Tune experiment {name}"
          f"{f' ({total} trials)' if total else ''}: a line as each trial ends"
          + ("" if tune_verbose() else "; Ray's own progress tables with --verbose"), flush=True)
    # Tune's SIGINT handler stays installed after fit() unless a signal came: a Ctrl-C (or SIGTERM) in the
    # final stage would then only print Tune's "Stop signal received" and be ignored.
    sigint = signal.getsignal(signal.SIGINT)
    with legacy_tune_output(), phases.DRIVER.time(phases.TRIALS):
        try:
            results = tuner.fit()
        except Exception as exc:  # Tune reads its own files back at the end: a full disk left them cut short
            refused = storage_error(exc) or full_storage(cluster.storage)
            if refused is None:
                raise
            raise StoreUnavailable(f"Tune's storage refused a write ({refused}); the trials' state is saved") from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint)
    with phases.DRIVER.time(phases.CONCLUDE):
        return summarize(results, setup, expected=num_samples if search_alg is not None else None)
