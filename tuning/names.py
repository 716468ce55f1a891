"""MLflow tag and param names, defined once (metric names live in `fer_model.metrics`)."""

TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_STAGE = "stage"
STAGE_GRID, STAGE_SEARCH, STAGE_TRIAL, STAGE_FINAL = "grid", "search", "trial", "final"
TAG_TRIAL_ID = "tune_trial_id"
TAG_OUTCOME = "outcome"  # completed | diverged | stopped_early | error
TAG_STOPPED_EARLY = "stopped_early"
TAG_STUDY = "optuna_study"
TAG_BEST_CONFIG = "best_config"  # JSON of the best TrainConfig, read by the final stage
TAG_BEST_TRIAL_RUN = "best_trial_run_id"
TAG_MODEL_OUTPUT = "model_output"  # logits | probabilities
BEST_PARAM_PREFIX = "best."

OUTCOME_COMPLETED, OUTCOME_DIVERGED = "completed", "diverged"
OUTCOME_STOPPED_EARLY, OUTCOME_ERROR = "stopped_early", "error"

# Summary metrics a trial run carries besides its per-epoch history.
FINAL_VAL_ACC = "final_val_acc"
BEST_VAL_ACC = "best_val_acc"
EPOCHS_COMPLETED = "epochs_completed"

DEFAULT_EXPERIMENT = "fer2013"
DEFAULT_MODEL_NAME = "fer2013-cnn"
