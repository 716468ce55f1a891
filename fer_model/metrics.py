"""Metric names, defined once: the trainer, Tune, MLflow and best-trial selection all use these."""

TRAIN_LOSS = "train_loss"
TRAIN_ACC = "train_acc"
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "images_per_second"
LR = "lr"

EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, EPOCH_SECONDS, IMAGES_PER_SECOND, LR)

# Hyperparameters are chosen on this, never on test data.
SELECTION_METRIC = VAL_ACC
SELECTION_MODE = "max"

TEST_ACC = "test_acc"
TEST_MACRO_F1 = "test_macro_f1"
TEST_PUBLIC_ACC = "test_public_acc"
TEST_PRIVATE_ACC = "test_private_acc"
TEST_LOSS = "test_loss"


def test_f1_name(class_name: str) -> str:
    """The metric name of one class's test F1 (e.g. ``test_f1_happy``)."""
    return f"test_f1_{class_name.lower()}"
