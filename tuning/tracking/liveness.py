"""A driver's liveness: the heartbeat it writes, and the check that settles runs whose driver died.

The writer and the stale-run check live together (as Optuna keeps its heartbeat and its stale-trial
check in one module). Runs whose driver died (SIGKILL, OOM, a closed laptop) are settled by the next command.

A stage or final run is RUNNING while its driver lives: `tuning.tracking.store.tracked_run` records the driver's
host, pid and process start time, and refreshes a heartbeat tag. A RUNNING run whose driver is gone
(on this host: no process with that pid and start time; on another host: no heartbeat for a while)
is marked KILLED with ``outcome=driver_lost``, and so are its RUNNING trial runs. `--resume` still
finds a search run settled so, and reopens it and its trials.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Iterable

import psutil
from mlflow.tracking import MlflowClient

from tuning import names as N

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 30.0  # between a driver's heartbeat writes
STALE_AFTER = 5 * HEARTBEAT_SECONDS  # another host's driver: silent this long means gone


def driver_tags() -> dict[str, str]:
    """Who runs this stage: host, pid namespace, pid and the process's start time (a reused pid has another)."""
    return {N.TAG_DRIVER_HOST: socket.gethostname(), N.TAG_DRIVER_PID_NS: pid_namespace(), N.TAG_DRIVER_PID: str(os.getpid()),
            N.TAG_DRIVER_STARTED: f"{process_start_time(os.getpid()):.0f}", N.TAG_HEARTBEAT: f"{time.time():.0f}"}


def pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"; "" off Linux): containers sharing a hostname differ here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start_time(pid: int) -> float:
    """A process's start time in epoch seconds (0 when it does not exist)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


class Heartbeat(threading.Thread):
    """Refreshes a run's heartbeat tag while the driver lives, so a dead driver's runs can be told apart."""

    def __init__(self, client: MlflowClient, run_id: str, every: float):
        super().__init__(name=f"heartbeat-{run_id[:8]}", daemon=True)
        self.client, self.run_id, self.every = client, run_id, every
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.client.set_tag(self.run_id, N.TAG_HEARTBEAT, f"{time.time():.0f}")
            except Exception as exc:  # noqa: BLE001 - a server blip must not end the stage
                log.debug("heartbeat of %s not written: %s", self.run_id, exc)


def driver_alive(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the driver recorded in a run's tags still runs."""
    if N.TAG_DRIVER_PID not in tags:
        return True  # not ours to judge (a run from before these tags, or another tool's)
    beat = float(tags.get(N.TAG_HEARTBEAT, "0") or 0)
    silent = (now or time.time()) - beat
    if tags.get(N.TAG_DRIVER_HOST) == socket.gethostname():
        started = process_start_time(int(tags[N.TAG_DRIVER_PID]))
        if started > 0 and abs(started - float(tags.get(N.TAG_DRIVER_STARTED, started))) < 2:
            return True
        if tags.get(N.TAG_DRIVER_PID_NS) and tags[N.TAG_DRIVER_PID_NS] == pid_namespace():
            return False  # the same process ids as ours, and that process is gone: dead, however fresh its heartbeat
        # Another pid namespace (a container sharing this hostname): a fresh heartbeat means alive.
        return silent < 2 * HEARTBEAT_SECONDS
    return silent < STALE_AFTER


def settle_orphans(client: MlflowClient, experiment_id: str, keep: Iterable[str] = ()) -> list[str]:
    """Mark KILLED (outcome driver_lost) the RUNNING runs of dead drivers and their RUNNING trials."""
    keep = set(keep)
    running = client.search_runs([experiment_id], f"attributes.status = '{N.RunStatus.RUNNING.value}'", max_results=5000)
    dead = {r.info.run_id for r in running
            if r.data.tags.get(N.TAG_STAGE) != N.STAGE_TRIAL and r.info.run_id not in keep and not driver_alive(r.data.tags)}
    settled = []
    for r in running:
        orphan = r.info.run_id in dead or (r.data.tags.get(N.TAG_STAGE) == N.STAGE_TRIAL and r.data.tags.get(N.TAG_PARENT) in dead)
        if not orphan:
            continue
        try:
            client.set_tag(r.info.run_id, N.TAG_OUTCOME, N.Outcome.DRIVER_LOST)
            client.set_terminated(r.info.run_id, N.RunStatus.KILLED)
            settled.append(r.info.run_id)
        except Exception as exc:  # noqa: BLE001 - settling is best effort; the next command tries again
            log.warning("run %s could not be settled: %s", r.info.run_id, exc)
    if settled:
        print(f"settled {len(settled)} run(s) left RUNNING by a driver that no longer runs (now KILLED, outcome "
              f"{N.Outcome.DRIVER_LOST})")
    return settled
