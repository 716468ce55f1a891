"""Faults a long tuning run meets, with real processes and nothing mocked: a trial's Ray worker
SIGKILLed mid-trial (with nothing pending, and with epoch writes still queued), the `mlflow server`
down for a while, and the server frozen (SIGSTOP).

Each test runs a one-trial grid (``--no-final``) in this process, as `python -m tuning.grid` would,
and injects its fault from a thread once the trial's MLflow run has logged an epoch.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import statistics
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable

import psutil
import pytest
from helpers import run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import grid
from tuning import names as N
from tuning.names import TAG_RESUMED_FROM

pytestmark = pytest.mark.e2e  # every test here starts Ray (see pyproject's markers)

SAMPLES = 70  # of tiny_folder's 280 Training images: about a second an epoch on a busy 2-core machine
TRIAL_ACTOR = "ImplicitFunc"  # a function trainable's Ray actor: its process title is ray::ImplicitFunc.train
EPOCH_TRACKED = (*M.EPOCH_METRICS, M.BEST_VAL_ACC)
DELAYED = re.compile(r"(\d+) epoch write\(s\) were delayed by the tracking store \(longest ([\d.]+) s\)")


def grid_argv(data: Path, epochs: int, *extra) -> list:
    return ["--data", data, "--max-samples", SAMPLES, "--dropouts", "0.3", "--lrs", "1e-3", "--epochs", epochs,
            "--no-final", "--keep-trial-dirs", *extra]  # the tests read Tune's result.json


# --------------------------------------------------------------------------- watching the run


def trial_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{N.TAG_STAGE}` = '{N.STAGE_TRIAL}'", max_results=100)


def logged_epoch(client: MlflowClient) -> int:
    """The latest epoch any trial run has logged (0 before the first)."""
    return max((m.step for r in trial_runs(client) for m in client.get_metric_history(r.info.run_id, M.VAL_ACC)), default=0)


def tune_results(workdir: Path) -> list[dict]:
    """The trial's results as Tune's driver recorded them, one per epoch (a retry may repeat one)."""
    paths = list(workdir.glob("ray_results/grid-*/*/result.json"))
    if not paths:
        return []
    (path,) = paths
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reported_epoch(workdir: Path) -> int:
    """The latest epoch Tune's driver has taken (with its checkpoint: a retry resumes from there)."""
    return max((r["epoch"] for r in tune_results(workdir)), default=0)


def trial_workers() -> list[psutil.Process]:
    """The live Ray actor processes of this session's Ray (its raylet's workers) running a Tune function
    trainable; another Ray on the machine (a test run beside this one) has its own."""
    import ray._private.worker as w

    (raylet,) = w._global_node.all_processes["raylet"]
    found = []
    for p in psutil.Process(raylet.process.pid).children(recursive=True):
        try:
            if any(TRIAL_ACTOR in part for part in p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def kill_the_trial_worker() -> int:
    (worker,) = trial_workers()
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    return worker.pid


def delayed_writes(run_id: str) -> tuple[int, float, list[str]]:
    """What the trial tracker's close() said about `run_id` (from the Ray workers' logs): writes
    delayed, the longest delay, and any line saying it gave up with writes unsent."""
    import ray._private.worker as w

    logs = Path(w._global_node.get_logs_dir_path())
    delayed, longest, unsent = 0, 0.0, []
    for f in logs.glob("worker-*.err"):
        for line in f.read_text(errors="replace").splitlines():
            if run_id in line and (m := DELAYED.search(line)):
                delayed, longest = delayed + int(m.group(1)), max(longest, float(m.group(2)))
            elif run_id in line and "still unsent" in line:
                unsent.append(line.strip())
    return delayed, longest, unsent


class Fault(threading.Thread):
    """Runs `action` once a trial run in `uri` has logged epoch `after`; keeps what it raised for the test."""

    def __init__(self, uri: str, workdir: Path, action: Callable[[], None], after: int = 1, timeout: float = 180):
        super().__init__(name="fault", daemon=True)
        self.uri, self.workdir, self.action, self.after, self.timeout = uri, workdir, action, after, timeout
        self.epoch_at_fault = 0
        self.error: BaseException | None = None
        self.cancel = threading.Event()  # the grid ended first: stop waiting for an epoch

    def run(self) -> None:
        try:
            deadline = time.time() + self.timeout
            # Tune's folder appears once the driver has opened the store (a sqlite file is then
            # created and migrated: opening it from here earlier would race with the driver).
            while not (self.workdir / "ray_results").exists() and not self.cancel.is_set():
                wait_until(deadline, f"Tune did not start within {self.timeout:.0f} s")
            client = MlflowClient(self.uri)
            while (epoch := logged_epoch(client)) < self.after:
                if self.cancel.is_set():
                    raise RuntimeError(f"the grid ended before a trial logged epoch {self.after}")
                wait_until(deadline, f"no trial logged epoch {self.after} within {self.timeout:.0f} s")
            self.epoch_at_fault = epoch
            self.action()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def wait_until(deadline: float, message: str) -> None:
    if time.time() > deadline:
        raise TimeoutError(message)
    time.sleep(0.1)


class DriverSampler(threading.Thread):
    """Samples this process's main thread (the driver: Tune's loop) while a fault lasts, and counts
    where it was inside MLflow, if anywhere: the driver must not wait on a tracking server."""

    def __init__(self, every: float = 0.1):
        super().__init__(name="driver-sampler", daemon=True)
        self.main = threading.main_thread().ident
        self.every, self.active, self.done = every, threading.Event(), threading.Event()
        self.samples, self.in_mlflow = 0, Counter()

    def run(self) -> None:
        while not self.done.is_set():
            if self.active.is_set():
                frame = sys._current_frames().get(self.main)
                stack = traceback.extract_stack(frame) if frame is not None else []
                self.samples += 1
                if any("/mlflow/" in f.filename for f in stack):
                    ours = [f for f in stack if "/tuning/" in f.filename]
                    where = ours[-1] if ours else stack[-1]
                    self.in_mlflow[f"{Path(where.filename).name}:{where.lineno} {where.name}"] += 1
            time.sleep(self.every)

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def during(results: list[dict], start: float, end: float) -> tuple[list[dict], list[dict]]:
    """Tune results of epochs that ended inside (start, end), and the others. A result's timestamp is
    the whole second it was reported in, so only a second wholly inside counts as inside."""
    inside = [r for r in results if start < r["timestamp"] and r["timestamp"] + 1 <= end]
    return inside, [r for r in results if r not in inside]


# --------------------------------------------------------------------------- checks


def check_one_finished_trial(client: MlflowClient, epochs: int, results: list[dict], stamped: bool = True):
    """One trial run, FINISHED and completed, every epoch's metrics exactly once and stamped when the
    epoch ended (not when a delayed write got through); its parent FINISHED; nothing left RUNNING."""
    (run,) = trial_runs(client)
    assert run.info.status == "FINISHED" and run.data.tags[N.TAG_OUTCOME] == N.Outcome.COMPLETED
    ended = {r["epoch"]: r["timestamp"] for r in results}  # the last report of each epoch, in whole seconds
    for name in EPOCH_TRACKED:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (name, [m.step for m in history])
        for m in history if stamped else ():  # a killed trial's retry writes what it missed when it resumes
            assert ended[m.step] - 2 <= m.timestamp / 1000 <= ended[m.step] + 3, (name, m.step, m.timestamp, ended)
    by_epoch = {r["epoch"]: r for r in results}
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, M.VAL_ACC), key=lambda m: m.step)] \
        == pytest.approx([by_epoch[e][M.VAL_ACC] for e in range(1, epochs + 1)], abs=1e-6)
    assert run.data.metrics[M.EPOCHS_COMPLETED] == epochs
    parent = client.get_run(run.data.tags[N.TAG_PARENT])
    assert parent.info.status == "FINISHED" and parent.data.tags.get(N.TAG_BEST_TRIAL_RUN) == run.info.run_id
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    return run


# --------------------------------------------------------------------------- a trial's worker SIGKILLed


def run_killed_grid(workdir: Path, data: Path, epochs: int, kill: Callable[[], int]):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    killed: list[int] = []
    fault = Fault(uri, workdir, lambda: killed.append(kill()))
    fault.start()
    t0 = time.time()
    try:
        code = run_main(grid.main, grid_argv(data, epochs))
    finally:
        fault.cancel.set()
        fault.join(30)
    seconds = time.time() - t0
    assert code == 0
    assert fault.error is None, repr(fault.error)
    assert killed and killed[0] not in {w.pid for w in trial_workers()}
    results = tune_results(workdir)
    run = check_one_finished_trial(MlflowClient(uri), epochs, results, stamped=False)
    resumed_from = int(run.data.tags[TAG_RESUMED_FROM])  # the retry continued from a checkpoint
    assert 1 <= resumed_from < epochs
    return run, results, resumed_from, fault.epoch_at_fault, seconds


def test_trial_worker_sigkilled_with_epoch_writes_queued_loses_no_epoch(ray_session, workdir, tiny_folder):
    """The store holds a write lock (as a long `mlflow gc` or a stuck client would) while the trial
    trains on and Tune checkpoints an epoch whose metrics are still queued; then the worker dies.
    The retry resumes from that checkpoint, so it must write those epochs itself."""
    epochs, db = 4, workdir / "mlflow.db"

    def kill_with_writes_queued() -> int:
        lock = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")  # the trial's writes now wait, then fail 'database is locked' and retry
            logged = logged_epoch(MlflowClient(f"sqlite:///{db}"))  # readers still read (WAL)
            deadline = time.time() + 120
            while reported_epoch(workdir) <= logged:
                wait_until(deadline, "Tune took no epoch past the one in MLflow")
            return kill_the_trial_worker()
        finally:
            lock.execute("ROLLBACK")
            lock.close()

    run, results, resumed_from, at, seconds = run_killed_grid(workdir, tiny_folder, epochs, kill_with_writes_queued)
    print(f"\nFAULT sigkill+queued: worker killed with epoch(s) {at + 1}..{resumed_from} checkpointed but not in "
          f"MLflow; resumed from epoch {resumed_from}; Tune reported epochs {[r['epoch'] for r in results]}; "
          f"runs 1; grid {seconds:.1f} s; delayed writes {delayed_writes(run.info.run_id)}")
    assert resumed_from > at  # the fault happened as meant: the checkpoint was ahead of the store


# --------------------------------------------------------------------------- the tracking server down or frozen


def fault_against_server(workdir: Path, data: Path, server, epochs: int, action: Callable[[dict], None], after: int):
    """A one-trial grid against `server`, `action(times)` run from a thread after epoch `after`; the driver sampled meanwhile."""
    times: dict[str, float] = {}
    sampler = DriverSampler()

    def fault() -> None:
        sampler.active.set()
        try:
            action(times)
        finally:
            sampler.active.clear()

    thread = Fault(server.url, workdir, fault, after=after)
    sampler.start()
    thread.start()
    t0 = time.time()
    try:
        code = run_main(grid.main, grid_argv(data, epochs, "--tracking-uri", server.url))
    finally:
        thread.cancel.set()
        thread.join(120)  # a restart in progress finishes
        sampler.stop()
    seconds = time.time() - t0
    assert code == 0
    assert thread.error is None, repr(thread.error)
    results = tune_results(workdir)
    run = check_one_finished_trial(MlflowClient(server.url), epochs, results)
    return run, results, times, sampler, seconds, thread.epoch_at_fault


def describe(results: list[dict]) -> str:
    return (f"epoch_seconds {[round(r[M.EPOCH_SECONDS], 2) for r in results]}; "
            f"time_this_iter_s {[round(r['time_this_iter_s'], 2) for r in results]}")


def report_fault(what: str, run, results: list[dict], inside: list[dict], epochs: int, seconds: float, sampler):
    """Print one FAULT line (kept/lost epochs, delayed writes, driver time in MLflow; shown with -s)."""
    delayed, longest, unsent = delayed_writes(run.info.run_id)
    print(f"\nFAULT {what}; epochs ended meanwhile: {[r['epoch'] for r in inside]}; epochs kept {epochs}/{epochs}, "
          f"lost 0; runs 1; grid {seconds:.1f} s; delayed writes {delayed} (longest {longest:.1f} s), unsent warnings "
          f"{len(unsent)}; driver samples in MLflow {sum(sampler.in_mlflow.values())}/{sampler.samples}; {describe(results)}")
    return delayed, longest, unsent


def test_mlflow_server_down_mid_trial_loses_no_epoch(ray_session, workdir, tiny_folder, mlflow_server_process):
    """The server's process group is stopped (SIGTERM) for at least DOWN seconds, then a new server
    starts on the same port and stores: the trial trains on, and every epoch reaches the store once."""
    # 30 epochs: an epoch of SAMPLES images takes ~0.2 s with native bf16 and ~1 s in fp32 (2 cores), and the
    # trial must still be training once the stop (~1 s) is through, on either machine.
    server, epochs, down = mlflow_server_process, 30, 9.0

    def outage(times: dict) -> None:
        times["stopping"] = time.time()
        server.stop()
        times["down"] = time.time()
        time.sleep(max(0.0, down - server.startup_seconds))  # a start takes this long again: down ~`down` s
        # On a loaded machine an epoch can outlast that: stay down until one has ended inside the outage
        # (Tune's whole-second stamp wholly past the stop), at most 30 s more, so the fault meets training.
        deadline = time.time() + 30
        while time.time() < deadline and not any(r["timestamp"] > times["down"] for r in tune_results(workdir)):
            time.sleep(0.2)
        times["restart"] = time.time()
        server.start()
        times["up"] = time.time()

    run, results, times, sampler, seconds, at = fault_against_server(workdir, tiny_folder, server, epochs, outage, 1)
    inside, _ = during(results, times["down"], times["up"])
    delayed, longest, unsent = report_fault(
        f"outage: server stopped after epoch {at} (stop took {times['down'] - times['stopping']:.1f} s), "
        f"down {times['up'] - times['down']:.1f} s (restart took {times['up'] - times['restart']:.1f} s)",
        run, results, inside, epochs, seconds, sampler)
    assert inside, "no epoch ended while the server was down: the outage missed the training"
    # MLflow's HTTP client retries inside each write with backoff up to 120 s, so after a long outage
    # (a restart over ~55 s) the write may still be asleep when close() stops waiting.
    assert not unsent, f"close() gave up while MLflow's client was still retrying: {unsent}"
    assert delayed >= 1  # close() says so (an epoch queued just before the server came back may not wait long)
    assert not sampler.in_mlflow, f"the driver waited on MLflow during the outage: {dict(sampler.in_mlflow)}"


def test_frozen_mlflow_server_does_not_stall_training(ray_session, workdir, tiny_folder, mlflow_server_process):
    """The server's process group is SIGSTOPped for FROZEN seconds (requests hang, none is refused),
    then SIGCONT: every metric arrives, and the epochs trained meanwhile took no longer."""
    # 20 epochs: on the bf16 Xeon a tiny epoch takes 0.15-0.25 s, and with 8 the trial once finished before the
    # fault thread had seen epoch 2 in MLflow and frozen the server (no epoch inside the freeze).
    server, epochs, frozen = mlflow_server_process, 20, 8.0

    def freeze(times: dict) -> None:
        server.send(signal.SIGSTOP)
        times["stop"] = time.time()
        try:
            time.sleep(frozen)
        finally:
            server.send(signal.SIGCONT)
            times["cont"] = time.time()

    run, results, times, sampler, seconds, at = fault_against_server(workdir, tiny_folder, server, epochs, freeze, 2)
    inside, others = during(results, times["stop"], times["cont"])
    delayed, longest, unsent = report_fault(
        f"freeze: server frozen after epoch {at} for {times['cont'] - times['stop']:.1f} s",
        run, results, inside, epochs, seconds, sampler)
    assert inside and others, "the freeze did not overlap the training"
    for key in (M.EPOCH_SECONDS, "time_this_iter_s"):  # the epoch itself; and epoch to epoch, callbacks included
        typical = statistics.median(r[key] for r in others)
        assert max(r[key] for r in inside) <= 2 * typical + 0.25, (key, inside, typical)
    assert delayed >= 1 and not unsent  # the write in flight when the server froze waited for it
    assert not sampler.in_mlflow, f"the driver waited on MLflow while the server was frozen: {dict(sampler.in_mlflow)}"
