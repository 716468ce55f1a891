"""The one trainable: shared data in, `fit()` with a callback, `tune.report` + the trial's MLflow run out."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from fer_model import metrics as M
from fer_model.config import TrainConfig
from fer_model.data import FerData
from fer_model.training import EpochResult, fit, load_checkpoint, save_checkpoint
from tuning.names import (
    DIVERGED,
    EPOCH,
    RUN_ID,
    TAG_GPU_IDS,
    TAG_GPU_SHARE,
    TAG_NODE_ID,
    TAG_NODE_IP,
    TAG_RESUMED_FROM,
    config_name,
)
from tuning.tracking.trial_log import TrialTracker
from tuning.trials import phases

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# For tests only: "1" in the command's environment lets a trial given a GPU share train on the CPU
# when its process sees no CUDA device, so that Tune's packing of GPU shares can be tested on a
# CPU-only Ray node that declares GPUs (`ray start --num-gpus 1`). Read by the driver and carried to
# the trials in `TrialSetup` (a cluster's workers do not get the driver's environment).
GPU_TRIALS_ON_CPU_ENV = "FER_TUNE_GPU_TRIALS_ON_CPU"


def gpu_trials_on_cpu() -> bool:
    """Whether FER_TUNE_GPU_TRIALS_ON_CPU is set (to anything but "" or "0") in this process."""
    return os.environ.get(GPU_TRIALS_ON_CPU_ENV, "0") not in ("", "0")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one stage run needs besides its config and the data."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus_per_trial: float = 1.0
    gpu_trials_on_cpu: bool = field(default_factory=gpu_trials_on_cpu)  # the driver's FER_TUNE_GPU_TRIALS_ON_CPU


class GpuNotVisible(RuntimeError):
    """A trial was given a GPU share but its process sees no CUDA device."""


def run_name(config: dict[str, Any], keys: list[str]) -> str:
    """A trial run's name from the values that vary between trials: ``d0.3 lr1e-3`` in the grid,
    ``adamw b64 lr3.2e-4 d0.41`` in the search (Tune's trial id stays a tag, `names.TAG_TRIAL_ID`)."""
    return config_name(config, keys) or "trial"


def gpu_share_given() -> float:
    """The GPU share Ray gave this trial's process (0.0: none)."""
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


def where() -> dict[str, str]:
    """This process's Ray node, the GPUs Ray gave it and its share of them."""
    ctx = ray.get_runtime_context()
    return {TAG_NODE_ID: ctx.get_node_id(), TAG_NODE_IP: ray.util.get_node_ip_address(),
            TAG_GPU_IDS: ",".join(map(str, ray.get_gpu_ids())) or "none", TAG_GPU_SHARE: f"{gpu_share_given():g}"}


def choose_device(gpu_share: float, cuda_visible: bool, on_cpu_allowed: bool, node: str) -> torch.device:
    """Where a trial trains: on the GPU when Ray gave it a share and its process sees a CUDA device,
    on the CPU when Ray gave it none. A share without a visible device raises `GpuNotVisible`, one
    line naming the share and `node`, unless `on_cpu_allowed` (FER_TUNE_GPU_TRIALS_ON_CPU, tests)."""
    # Only a trial Ray gave a GPU share uses one: Ray 2.x leaves CUDA_VISIBLE_DEVICES alone for
    # zero-GPU trials, so torch.cuda.is_available() would put "CPU" trials on GPU 0 unscheduled.
    if gpu_share <= 0:
        return torch.device("cpu")
    if cuda_visible:
        return torch.device("cuda")
    if on_cpu_allowed:
        return torch.device("cpu")
    # Else it would train on the CPU unnoticed, holding a GPU share that another trial could use.
    raise GpuNotVisible(
        f"trial given {gpu_share:g} GPU on node {node}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, "
        f"but its process sees no CUDA device (torch {torch.__version__}): give trials no GPU (--gpus-per-trial 0) "
        f"or run them where torch sees one ({GPU_TRIALS_ON_CPU_ENV}=1 trains them on the CPU, for tests)")


def quiet_worker_exit(unraisable) -> None:
    """`sys.unraisablehook` of a trial's worker: Ray's SIGTERM handler stops an idle (reused) trial
    worker with SystemExit when its driver ends, and where that lands in a weakref callback Python
    printed "Exception ignored in ... SystemExit: 1" with a traceback, forwarded to the driver's console
    as the last lines of a run. That exit is the worker being stopped; anything else is printed as ever."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def train_trial(config: dict[str, Any], data: FerData, setup: TrialSetup, name_keys: tuple[str, ...] = ()) -> None:
    """Train one Tune trial. `data` arrives once through the object store (tune.with_parameters)."""
    cfg = TrainConfig.from_dict(config)  # the one conversion from Tune's dict; unknown keys fail
    # Ray logs "Checkpoint successfully created at: <path>" (INFO) at every epoch's checkpoint and
    # forwards it to the driver's console: a line per trial and epoch, saying nothing a user acts on.
    # Set here because a trial runs in a Ray worker process, which the driver's logging setup does not reach.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    # A cluster's workers did not get the driver's environment (fer_model.cli.quiet_libraries): no
    # "View run ... at" line per trial forwarded to the driver's console.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    sys.unraisablehook = quiet_worker_exit
    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    ctx = tune.get_context()

    resume, run_id = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry after a failure, or a restored experiment
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(Path(d) / STATE_FILE)
            run_id = json.loads((Path(d) / META_FILE).read_text()).get(RUN_ID)

    timed = phases.Phases()
    tags = where()
    if resume is not None:
        tags[TAG_RESUMED_FROM] = str(len(resume["history"]))
    with timed.time(phases.TRIAL_OPEN):
        tracker = TrialTracker.open(setup.tracking_uri, setup.experiment_id, setup.parent_run_id, ctx.get_trial_id(),
                                    run_name(cfg.to_dict(), list(name_keys)), cfg.to_dict(), tags, run_id)
    best = M.best_val_acc(resume["history"]) if resume else float("nan")
    if resume is not None:
        # Epochs the checkpoint has but the run lacks: their writes were still queued when the last
        # process died (training resumes after them, so nothing else would write them).
        history = resume["history"]
        for epoch in range(tracker.last_step + 1, len(history) + 1):
            tracker.log_epoch(epoch, {**history[epoch - 1], M.BEST_VAL_ACC: M.best_val_acc(history[:epoch])})

    def on_epoch(r: EpochResult) -> None:
        nonlocal best
        val = M.kept_val_acc(r.metrics)
        best = val if not math.isfinite(best) or val > best else best
        tracker.log_epoch(r.epoch, {**r.metrics, M.BEST_VAL_ACC: best})
        with timed.time(phases.TRIAL_CHECKPOINT), tempfile.TemporaryDirectory() as d:
            save_checkpoint(r.state(), Path(d) / STATE_FILE)
            (Path(d) / META_FILE).write_text(json.dumps({RUN_ID: tracker.run_id, EPOCH: r.epoch}))
            # Persisted by Ray before report returns, so the temporary folder can go.
            tune.report({**r.metrics, M.VAL_ACC_KEPT: val, M.BEST_VAL_ACC: best, EPOCH: r.epoch, RUN_ID: tracker.run_id, DIVERGED: r.diverged},
                        checkpoint=tune.Checkpoint.from_directory(d))

    t0, device = time.perf_counter(), None
    try:
        # After the run is open, so a trial refused here is a FAILED run with its error and GPU tags.
        device = choose_device(gpu_share_given(), torch.cuda.is_available(), setup.gpu_trials_on_cpu,
                               f"{tags[TAG_NODE_IP]} ({tags[TAG_NODE_ID][:8]})")
        fit(cfg, data, on_epoch=on_epoch, device=device, resume=resume)
    finally:
        timed.add(phases.TRIAL_FIT, time.perf_counter() - t0 - timed.seconds.get(phases.TRIAL_CHECKPOINT, 0.0))
        summary = timed.take()
        if device is not None and device.type == "cuda":  # how much of a shared GPU this trial held (benchmarks/gpu_packing.py)
            summary[phases.GPU_PEAK_MB] = torch.cuda.max_memory_allocated(device) / 2**20
        tracker.log_summary(summary)
        t0 = time.perf_counter()
        if tracker.close():  # also when ASHA stops the trial (Tune ends it inside tune.report)
            tracker.log_summary({phases.metric(phases.TRIAL_MLFLOW_WAIT): time.perf_counter() - t0}, wait=True)
