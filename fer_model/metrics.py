"""Metric names, defined once: the trainer, Tune, MLflow and best-trial selection all use these."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

TRAIN_LOSS = "train_loss"
TRAIN_ACC = "train_acc"
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
# With `TrainConfig.ema`: the averaged weights' validation metrics, beside the raw weights' in each epoch's row.
VAL_LOSS_EMA, VAL_ACC_EMA = "val_loss_ema", "val_acc_ema"
WEIGHTS_AVERAGED = "weights_averaged"  # a final run's: 1 when its registered weights are the moving average
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "images_per_second"
LR = "lr"

EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, EPOCH_SECONDS, IMAGES_PER_SECOND, LR)

# The validation accuracy of the weights an epoch would keep (`kept_val_acc`): its moving average's where
# that validated better (`TrainConfig.ema`), else its raw weights' (= VAL_ACC without an average). A trial
# reports it to Tune beside its row, so ASHA, Optuna and the best trial judge an averaging trial by the
# weights the final stage would register, not by the raw ones it does not serve.
VAL_ACC_KEPT = "val_acc_kept"
# Hyperparameters are chosen on this, never on test data.
SELECTION_METRIC = VAL_ACC_KEPT
SELECTION_MODE = "max"

# Summaries of a run's epochs (a trial run carries them beside its per-epoch history).
FINAL_VAL_ACC = "final_val_acc"
BEST_VAL_ACC = "best_val_acc"
EPOCHS_COMPLETED = "epochs_completed"

TEST_ACC = "test_acc"
TEST_MACRO_F1 = "test_macro_f1"
TEST_PUBLIC_ACC = "test_public_acc"
TEST_PRIVATE_ACC = "test_private_acc"
TEST_LOSS = "test_loss"
# The final stage's test numbers with its test-time augmentation (--tta), beside the plain ones: each
# headline metric with this suffix (test_acc_tta, test_public_acc_tta, test_private_acc_tta, ...).
TTA_SUFFIX = "_tta"
TEST_HEADLINE = (TEST_ACC, TEST_PUBLIC_ACC, TEST_PRIVATE_ACC, TEST_MACRO_F1)
TEST_ACC_TTA = TEST_ACC + TTA_SUFFIX
# The epoch (1-based) whose weights the final stage evaluated and registered: the best on validation.
BEST_EPOCH = "best_epoch"
# The final stage's ensemble (--ensemble): how many members the registered model averages, and (step k)
# the validation accuracy of the first k ranked members averaged, which `--ensemble auto` sizes it by.
ENSEMBLE_SIZE = "ensemble_size"
ENSEMBLE_VAL_ACC = "ensemble_val_acc"


def with_tta(metrics: dict[str, float]) -> dict[str, float]:
    """The headline test metrics of an evaluation with TTA, renamed with TTA_SUFFIX (test_acc -> test_acc_tta)."""
    return {k + TTA_SUFFIX: metrics[k] for k in TEST_HEADLINE if k in metrics}


def test_f1_name(class_name: str) -> str:
    """The metric name of one class's test F1 (e.g. ``test_f1_happy``)."""
    return f"test_f1_{class_name.lower()}"


def member_metric(rank: int, name: str) -> str:
    """A metric of ensemble member `rank` (1-based, rank order) in the final run, e.g. ``member2_test_acc``."""
    return f"member{rank}_{name}"


def average_is_better(row: Mapping[str, float]) -> bool:
    """Whether an epoch's averaged weights validated strictly better than its raw ones (it had them, with a
    finite loss): the one rule for which weights an epoch keeps."""
    acc = row.get(VAL_ACC_EMA)
    return acc is not None and math.isfinite(row.get(VAL_LOSS_EMA, math.nan)) and acc > row[VAL_ACC]


def kept_val_acc(row: Mapping[str, float]) -> float:
    """The validation accuracy of the weights an epoch keeps (`VAL_ACC_KEPT`): the average's where better."""
    return float(row[VAL_ACC_EMA] if average_is_better(row) else row[VAL_ACC])


def last_val_acc(history: Sequence[Mapping[str, float]]) -> float:
    """Validation accuracy of the weights kept at the last epoch (what selection uses); NaN with no epochs."""
    return kept_val_acc(history[-1]) if history else float("nan")


def best_val_acc(history: Sequence[Mapping[str, float]]) -> float:
    """The highest validation accuracy of the weights any epoch kept; NaN with no epochs."""
    values = [acc for acc in map(kept_val_acc, history) if math.isfinite(acc)]
    return max(values) if values else float("nan")


def best_epoch(history: Sequence[Mapping[str, float]]) -> int:
    """The epoch (1-based) of the highest validation accuracy of its kept weights, the first on a tie; 0
    with none finite."""
    best, epoch = -math.inf, 0
    for i, h in enumerate(history):
        acc = kept_val_acc(h)
        if math.isfinite(acc) and acc > best:
            best, epoch = acc, i + 1
    return epoch


def summary(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The summary metrics of a history: epochs, last and best validation accuracy."""
    out: dict[str, float] = {EPOCHS_COMPLETED: len(history)}
    if history:
        out[FINAL_VAL_ACC] = last_val_acc(history)
        out[BEST_VAL_ACC] = best_val_acc(history)
    return out
