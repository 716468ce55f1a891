"""MLflow tag, param and stage names, defined once (metric names live in `fer_model.metrics`)."""

# MLflow's own tags.
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"  # a run's description on its page (Markdown)

# What a run is.
TAG_STAGE = "stage"
STAGE_GRID, STAGE_SEARCH, STAGE_TRIAL, STAGE_FINAL = "grid", "search", "trial", "final"
TAG_TRIAL_ID = "tune_trial_id"
TAG_STUDY = "optuna_study"
TAG_TUNE_PATH = "tune_experiment_path"  # where Tune keeps a stage's state, for --resume
TAG_STAGE_INPUTS = "stage_inputs"  # JSON of a grid's typed inputs: what a --resume keeps
TAG_CHAIN = "chain"  # JSON, on a grid run: the stages that follow it (search, final)
TAG_CHAIN_DONE = "chain_done"  # on a grid run: every stage of its chain finished
TAG_CHAINED_FROM = "chained_from"  # on a search run a grid chain started: the grid run's id

# How a trial ended: set once, by the driver (tuning.outcomes), never by the trial itself.
TAG_OUTCOME = "outcome"
OUTCOME_COMPLETED, OUTCOME_DIVERGED = "completed", "diverged"
OUTCOME_STOPPED_EARLY, OUTCOME_ERROR = "stopped_early", "error"
OUTCOME_DRIVER_LOST = "driver_lost"  # its driver died (tuning.orphans); --resume continues it
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

DEFAULT_EXPERIMENT = "fer2013"
DEFAULT_MODEL_NAME = "fer2013-cnn"
