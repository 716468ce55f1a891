"""Where a command's wall time goes: named phases, timed where they happen, logged as ``phase_<name>_s``.

The driver times Ray's start, the data load, putting the data in Ray's object store, Tune's run of
the trials, the stage's tables and plots, and the final stage's training, evaluation and
registration; it logs them on the stage's run. Each trial times opening its MLflow run, training
(`fit`: epochs and validation), its per-epoch checkpoint and `tune.report`, and the wait for its
queued MLflow writes; it logs them on its own run. `benchmarks/pipeline.py` reads them back.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

# Driver phases (on the stage's run).
RAY_START = "ray_start"
DATA_LOAD = "data_load"
SHIP_DATA = "ship_data"  # ray.put of the data for every trial (tune.with_parameters)
TRIALS = "trials"  # Tune's fit: every trial, as scheduled, from the first start to the last end
CONCLUDE = "conclude"  # settling the trials, tables, plots, artifacts of the stage run
FINAL_TRAIN = "final_train"
FINAL_EVALUATE = "final_evaluate"  # test evaluation and its logged artifacts
REGISTER = "register"
# Trial phases (on each trial's run).
TRIAL_OPEN = "trial_open"  # creating or reopening the trial's MLflow run
TRIAL_FIT = "trial_fit"  # training and validation, the per-epoch callback excluded
TRIAL_CHECKPOINT = "trial_checkpoint"  # writing the epoch's checkpoint and tune.report (Ray persists it)
TRIAL_MLFLOW_WAIT = "trial_mlflow_wait"  # the end of the trial waiting for its queued MLflow writes

PREFIX = "phase_"
GPU_PEAK_MB = "gpu_peak_memory_mb"  # a trial's peak CUDA memory (torch's allocator), for GPU packing


def metric(name: str) -> str:
    """The MLflow metric a phase is logged as: ``phase_<name>_s``."""
    return f"{PREFIX}{name}_s"


class Phases:
    """Seconds per named phase, summed over every time it ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Time the body as phase `name` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def take(self) -> dict[str, float]:
        """The phases so far as metrics, forgetting them (each is logged on one run only)."""
        taken = {metric(k): v for k, v in self.seconds.items()}
        self.seconds.clear()
        return taken


# The driver's phases: one command runs in one process, its stages one after the other.
DRIVER = Phases()
