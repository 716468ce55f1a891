"""The MLflow run of one Tune trial, written from the trial's own process (on any node).

Epoch metrics go through a bounded queue to a background thread that retries until the tracking
store answers: a slow or briefly unreachable `mlflow server` costs the trial no training time
(measured before: an epoch logged 52 s after the previous one during an outage, where epochs take
17 s). The queue drains when the trial ends. The trial never writes its outcome: the driver
settles that (`tuning.trials.callbacks`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Mapping

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import names as N
from tuning.tracking.store import client_for, create_run, find_trial_run, set_tags

log = logging.getLogger(__name__)
QUEUE_SIZE = 1000  # epochs; a trial blocks only past this many unwritten epochs
DRAIN_SECONDS = 300.0  # how long the end of a trial waits for the store: past MLflow's own HTTP retries (~250 s), which one write sleeps through
# A write this late counts as delayed: MLflow's HTTP client retries a down server itself for
# minutes (7 retries, backoff up to 120 s) before raising, and a frozen one hangs, not raises.
DELAYED_AFTER_SECONDS = 5.0
_STOP = object()


class TrialTracker:
    """Opens (or, on a retry or resume, reopens) a trial's run and logs its epochs in the background."""

    def __init__(self, client: MlflowClient, run_id: str, last_step: int):
        self.client, self.run_id, self.last_step = client, run_id, last_step
        self.delayed = 0  # writes that needed a retry, or waited over DELAYED_AFTER_SECONDS
        self.longest_delay = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread = threading.Thread(target=self._drain, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, run_name: str,
             params: Mapping[str, Any], tags: Mapping[str, Any], run_id: str | None = None) -> "TrialTracker":
        """Continue this trial's run when it has one, else create it.

        Looking the run up by trial id, not only trusting the checkpoint, means a trial that
        failed before its first checkpoint still gets exactly one run.
        """
        client = client_for(uri)
        run = client.get_run(run_id) if run_id else find_trial_run(client, experiment_id, parent_run_id, trial_id)
        all_tags = {N.TAG_PARENT: parent_run_id, N.TAG_STAGE: N.STAGE_TRIAL, N.TAG_TRIAL_ID: trial_id, **tags}
        if run is None:
            return cls(client, create_run(client, experiment_id, run_name, all_tags, params), 0)
        client.update_run(run.info.run_id, status=N.RunStatus.RUNNING)
        set_tags(client, run.info.run_id, tags)  # where it runs now (another node after a node loss)
        history = client.get_metric_history(run.info.run_id, M.VAL_ACC)
        return cls(client, run.info.run_id, max((m.step for m in history), default=0))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Queue one epoch's metrics (returns at once).

        An epoch already logged (a crash after logging, before the checkpoint) is skipped: the rerun
        gives the same numbers, and the history keeps each epoch once.
        """
        if epoch <= self.last_step:
            return
        self.last_step = epoch
        self._queue.put((epoch, dict(metrics), time.monotonic(), int(time.time() * 1000)))

    def log_summary(self, metrics: Mapping[str, float], wait: bool = False) -> None:
        """Metrics of the whole trial (its phases' seconds), at its last epoch's step: queued, or
        written at once with `wait` (after `close`; best effort, a failed write is only logged)."""
        if not wait:
            self._queue.put((self.last_step, dict(metrics), time.monotonic(), int(time.time() * 1000)))
            return
        stamp = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, self.last_step) for k, v in metrics.items()])
        except Exception as exc:  # noqa: BLE001 - timings are not worth failing a trial over
            log.info("MLflow: run %s: trial timings not written (%s)", self.run_id, exc)

    def close(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Wait for every queued write (at most `timeout` seconds) and say how many were delayed;
        True when all of them were written."""
        self._queue.put((_STOP, None, 0.0, 0))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("MLflow: run %s: %d epoch write(s) still unsent after %.0f s; the tracking store is unreachable",
                        self.run_id, self._queue.qsize(), timeout)
            return False
        if self.delayed:
            log.warning("MLflow: run %s: %d epoch write(s) were delayed by the tracking store (longest %.1f s); none lost",
                        self.run_id, self.delayed, self.longest_delay)
        return True

    def _drain(self) -> None:
        while True:
            epoch, metrics, queued, stamp = self._queue.get()
            if epoch is _STOP:
                return
            # Stamped when the epoch ended, not when a delayed write got through.
            items = [Metric(k, float(v), stamp, epoch) for k, v in metrics.items() if v is not None]
            attempt = 0
            while True:
                try:
                    self.client.log_batch(self.run_id, metrics=items)
                    break
                except Exception as exc:  # noqa: BLE001 - MlflowException, connection reset, database locked
                    attempt += 1
                    if attempt == 1:
                        log.info("MLflow: epoch %d of run %s not written yet (%s); retrying", epoch, self.run_id, exc)
                    time.sleep(min(0.5 * 2 ** attempt, 10.0))
            waited = time.monotonic() - queued
            if attempt or waited > DELAYED_AFTER_SECONDS:
                self.delayed += 1
                self.longest_delay = max(self.longest_delay, waited)
