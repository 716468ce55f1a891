"""Every string that crosses a process or a store, defined once: the keys a trial reports to the driver,
MLflow tags, params and run names, and how a trial ended (`Outcome`). Metric names live in
`fer_model.metrics`. Imports nothing of the project: every layer may use it.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Mapping, Sequence

# What a trial reports to the driver beside its metrics (`tune.report`), and tags on its run.

EPOCH = "epoch"  # reported beside the metrics; ASHA's time attribute
RUN_ID = "mlflow_run_id"  # reported too, so the driver settles the right run
DIVERGED = "diverged"  # reported too: fer_model decided the epoch diverged (the driver does not decide it again)

# Where a trial runs, as tags on its run (the node it finished on, after a node loss), and the GPU
# share Ray gave it ("0": none).
TAG_NODE_ID, TAG_NODE_IP, TAG_GPU_IDS, TAG_GPU_SHARE = "ray_node_id", "ray_node_ip", "gpu_ids", "gpu_share"
TAG_RESUMED_FROM = "resumed_from_epoch"  # set when a retry or --resume continued from a checkpoint


# MLflow's own tags.
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"  # a run's description on its page (Markdown)

# What a run is.
TAG_STAGE = "stage"
STAGE_GRID, STAGE_SEARCH, STAGE_TRIAL, STAGE_FINAL = "grid", "search", "trial", "final"
TAG_TRIAL_ID = "tune_trial_id"
TAG_STUDY = "optuna_study"
# On each Optuna trial of a search: the MLflow run id of the trial (optuna-dashboard shows it beside the trial).
OPTUNA_RUN_ID_ATTR = "mlflow_run_id"
TAG_TUNE_PATH = "tune_experiment_path"  # where Tune keeps a stage's state, for --resume
TAG_STAGE_INPUTS = "stage_inputs"  # JSON of a grid's typed inputs: what a --resume keeps
TAG_CHAIN = "chain"  # JSON, on a grid run: the stages that follow it (search, final)
TAG_CHAIN_DONE = "chain_done"  # on a grid run: every stage of its chain finished
TAG_CHAINED_FROM = "chained_from"  # on a search run a grid chain started: the grid run's id

# How a trial ended, as Optuna's TrialState: decided once, where it is known (the driver's Tune callback,
# `tuning.trials.callbacks`; the liveness check for a dead driver), and stored as its value in tag `outcome`.
TAG_OUTCOME = "outcome"


class Outcome(str, Enum):
    """How a trial (or a final run) ended."""

    COMPLETED = "completed"  # ran every epoch
    DIVERGED = "diverged"  # its loss stopped being finite (`fer_model` stops training there)
    STOPPED_EARLY = "stopped_early"  # ASHA, or the --time-budget, ended it before its last epoch
    ERROR = "error"  # failed after its retries
    DRIVER_LOST = "driver_lost"  # its driver died (`tuning.tracking.liveness`); --resume continues it

    def __str__(self) -> str:  # f-strings and MLflow tags show the value on every Python version
        return self.value

    __hash__ = str.__hash__  # a member and its stored string are one key in a dict or set (Enum hashes names)


class RunStatus(str, Enum):
    """MLflow's run statuses, as its store spells them (mlflow.entities.RunStatus), in one place."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"  # the only status whose model is the whole training's
    FAILED = "FAILED"
    KILLED = "KILLED"  # cut (Ctrl-C, SIGTERM) or settled for a dead driver: --resume reopens it

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__


UNFINISHED = (RunStatus.RUNNING, RunStatus.KILLED, RunStatus.FAILED)  # a stage run --resume may continue
TAG_ERROR = "error"  # a failed trial's error, its first line (the whole trace is in Tune's error file)
TAG_TRACKING_URI = "tracking_uri"  # on a stage run: the tracking URI its driver wrote with (a --resume may use another)
TAG_STOPPED_BY = "stopped_by"  # on a stage run whose --time-budget ran out
STOPPED_BY_BUDGET = "time_budget"

# The best trial of a stage, read by the final stage.
TAG_BEST_CONFIG = "best_config"  # JSON of the best flat TrainConfig dict
TAG_BEST_TRIAL_RUN = "best_trial_run_id"
TAG_MEMBER_TRIAL_RUNS = "member_trial_run_ids"  # an ensemble's final run and version: its members' trial runs, in rank order
BEST_PARAM_PREFIX = "best."

# Where the driver runs, so a later command can tell a live run from one whose driver died.
TAG_DRIVER_HOST = "driver_host"
TAG_DRIVER_PID = "driver_pid"
TAG_DRIVER_PID_NS = "driver_pid_namespace"  # Linux: which process ids the pid is one of
TAG_DRIVER_STARTED = "driver_started"  # the driver process's start time (tells a reused pid apart)
TAG_HEARTBEAT = "driver_heartbeat"  # epoch seconds, refreshed while the driver lives

# Registered model versions.
TAG_MODEL_OUTPUT = "model_output"  # logits | probabilities (of the network inside the pyfunc)
TAG_SOURCE_RUN = "source_run_id"
TAG_PARENT_RUN = "parent_run_id"
TAG_DATA_FINGERPRINT = "data_fingerprint"
TAG_TEST_SIZE = "test_size"
# A version's test-time augmentation (none | flip | tencrop): what it serves with (the final run's param tta).
TAG_TTA = "tta"

DEFAULT_EXPERIMENT = "fer2013"
DEFAULT_MODEL_NAME = "fer2013-cnn"

# MLflow 3's experiment kind: the tag its UI's experiment-kind selector writes, with the value meaning
# "Machine learning" (training runs) rather than "GenAI apps & agents". MLflow 3.17's UI no longer
# reads it on the experiment page: there the sidebar's workflow switch decides (the URL parameter
# below, else the browser's last choice, else GenAI). The tag still says what the experiment is, for
# UIs that read it and for anyone searching experiments by kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"


# --------------------------------------------------------------------------- run names

# How a configuration value is named in a run name: ``adamw b64 lr3.2e-4 d0.41``.
_SHORT = {"dropout": "d", "lr": "lr", "batch_size": "b", "optimizer": "", "weight_decay": "wd", "arch": "",
          "label_smoothing": "ls", "schedule": "", "conv3_channels": "c", "hidden": "h", "width": "w", "depth": "depth",
          "epochs": "ep"}
_SCIENTIFIC = ("lr", "weight_decay")
FINAL_NAME_KEYS = ("optimizer", "batch_size", "lr", "dropout")


# --------------------------------------------------------------------------- names


def value_text(key: str, value: Any) -> str:
    """A value as a run name shows it: ``1e-3``/``3.2e-4`` for rates, two significant digits otherwise."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if key in _SCIENTIFIC:
        if value == 0:
            return "0"
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.2g}"


def values_text(values: Sequence[float]) -> str:
    """Numbers as a comma list flags take (``--lrs 0.001,0.01``): the grid's axes in params, plans and --help."""
    return ",".join(f"{v:g}" for v in values)


def config_name(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A configuration named by `keys`, e.g. ``d0.3 lr1e-3`` (grid) or ``adamw b64 lr3.2e-4 d0.41`` (search)."""
    return " ".join(f"{_SHORT.get(k, k + '=')}{value_text(k, config.get(k))}" for k in keys)


def stage_run_name(stage: str, trials: int, when: float | None = None) -> str:
    """A stage run's name: its stage, when it started and its trial count, e.g. ``grid 2025-05-01 14:03 (9 trials)``."""
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
    return f"{stage} {started} ({trials} trial{'s' if trials != 1 else ''})"


def final_run_name(config: Mapping[str, Any]) -> str:
    """The final run's name: the configuration it retrains, e.g. ``final adam b32 lr1e-3 d0.3 (15 epochs)``."""
    epochs = config.get("epochs")
    return f"final {config_name(config, FINAL_NAME_KEYS)} ({epochs} epoch{'s' if epochs != 1 else ''})"
