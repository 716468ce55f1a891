"""Every flag the tuning commands share, in one place, and their validation (all before Ray starts).

One convention: a flag's argparse default is None, meaning "not given"; defaults are filled in
here (or by a preset, which only fills what the user left unset). Each concern becomes its own
typed, validated object: `DataConfig`, `TrackingOptions`, `ClusterOptions`, `FinalOptions`,
`SchedulerSettings`. Nothing heavy is imported at module level: --help answers at once.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from fer_model.config import DEFAULT_CACHE_MAX, TTA_MODES, DataConfig
from fer_model.errors import ConfigError, DataError, UserError, first_line
from tuning import budget
from tuning.names import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME
from tuning.spaces import NAMED_SPACES, load_space, validate_space
from tuning.tracking.uri import SQLITE, check_tracking, resolve_tracking_uri, sqlite_path

DEFAULT_FINAL_EPOCHS = 15  # the study's retrain of its grid winner
# --ensemble auto: the final stage retrains up to this many of the best trials, keeping those that help on validation.
ENSEMBLE_AUTO, ENSEMBLE_AUTO_MAX = "auto", 5
FINAL_EPOCHS_RATIO = 1.5  # the study: 15 final epochs after 10-epoch trials; --final-epochs follows --epochs so


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# --------------------------------------------------------------------------- data


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="FER2013 folder, .zip, .tar.gz or .csv (else $FER2013_DATA, ./data/fer2013, kagglehub)")
    g.add_argument("--max-samples", type=int, help="use a stratified subset of this many Training images (test cut alike)")
    g.add_argument("--val-fraction", type=float, help="stratified share of Training for validation (default 0.1)")
    g.add_argument("--data-seed", type=int, help="seed of the validation split and subsets (default 0)")
    g.add_argument("--cache-dir", help="decoded-data cache (default $FER2013_CACHE or ~/.cache/fer2013)")
    g.add_argument("--cache-max", type=int, metavar="N",
                   help=f"keep at most N decoded sources in the cache, least recently used dropped (default {DEFAULT_CACHE_MAX})")


def data_config(args: argparse.Namespace) -> DataConfig:
    if args.data and not Path(args.data).expanduser().exists():
        raise DataError(f"--data {args.data!r} does not exist")
    return DataConfig(args.data, _or(args.val_fraction, 0.1), args.max_samples, _or(args.data_seed, 0), args.cache_dir,
                      _or(args.cache_max, DEFAULT_CACHE_MAX))


# --------------------------------------------------------------------------- tracking


@dataclass(frozen=True)
class TrackingOptions:
    """Where runs and models go."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    model_name: str = DEFAULT_MODEL_NAME


def add_tracking_flags(p: argparse.ArgumentParser, model_name: bool = True, experiment: bool = True) -> None:
    g = p.add_argument_group("tracking")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    if experiment:
        g.add_argument("--experiment", help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    if model_name:
        g.add_argument("--model-name", help=f"registered model name (default {DEFAULT_MODEL_NAME})")


def tracking_options(args: argparse.Namespace) -> TrackingOptions:
    experiment = _or(getattr(args, "experiment", None), DEFAULT_EXPERIMENT)
    if not experiment.strip():
        raise ConfigError("--experiment must not be empty")
    model_name = _or(getattr(args, "model_name", None), DEFAULT_MODEL_NAME)
    if not model_name.strip():
        raise ConfigError("--model-name must not be empty")
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    return TrackingOptions(uri, experiment, model_name)


# --------------------------------------------------------------------------- cluster and resources


@dataclass(frozen=True)
class ClusterOptions:
    """Which Ray, what each trial gets, where Tune keeps its state."""

    address: str | None = None
    storage: str = ""
    storage_shared: bool = False
    gpus_per_trial: float | None = None  # None: a share where the cluster has GPUs
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    dashboard: bool = False  # a local Ray's dashboard, on 127.0.0.1
    keep_trial_dirs: bool = False  # else a finished stage's Tune folder is removed once MLflow has it all
    verbose: bool = False  # Ray Tune's own progress tables too (`tuning.trials.runner.tune_verbose`)


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources and cluster")
    g.add_argument("--gpus-per-trial", type=float,
                   help="GPU share per trial, within 0..1 (0: no GPU; default where the cluster has GPUs: as many trials "
                        "per GPU as fit in its memory, a power of two up to 4, so 0.25 on any GPU of 9 GiB or more; else 0)")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    g.add_argument("--max-concurrent", type=int,
                   help="at most this many trials at once (default: as resources allow: with GPU shares, "
                        "GPUs / --gpus-per-trial, e.g. 4 per GPU at 0.25)")
    g.add_argument("--address", help="join this Ray cluster (default $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--storage", help="where Tune keeps trial results and checkpoints (default $FER_TUNE_STORAGE, else ./ray_results; "
                                     "a shared path or URI on a cluster)")
    g.add_argument("--storage-shared", action="store_true", default=None,
                   help="--storage is a folder every node mounts (NFS), not a local one")
    g.add_argument("--keep-trial-dirs", action="store_true", default=None,
                   help="keep Tune's trial folders (checkpoints, results) after a stage finished; by default they "
                        "are removed once everything is in MLflow")
    g.add_argument("--verbose", action="store_true", default=None,
                   help="Ray Tune's own progress tables and messages, besides a line per finished trial")
    g.add_argument("--dashboard", action="store_true", default=None,
                   help="start the local Ray's dashboard, on 127.0.0.1 only (default: none; a cluster's is on its head)")


def keep_local_ray_on_loopback(cluster: ClusterOptions) -> None:
    """A Ray this command starts itself listens on 127.0.0.1 only.

    Ray replaces a 127.0.0.1 node address with the machine's network address, so its GCS, raylet and
    workers listen on every interface (seen with `ss -ltnp`), guarded by its token alone. With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it keeps the loopback address, and binds there. Ray reads it
    when imported: call this before anything imports ray. Joining a cluster leaves it alone.
    """
    if cluster.address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def check_ray_address(address: str, source: str = "--address", timeout: float = 3.0) -> None:
    """Raise a UserError unless something listens at the Ray cluster `address` (``HOST:PORT`` or
    ``ray://HOST:PORT``; ``auto`` and ``local`` are left to Ray).

    Without this, ray.init retries a dead GCS for minutes, printing C++ connection warnings.
    A TCP connect proves only that a port is open, which is all this check claims.
    """
    import socket

    if address in ("auto", "local"):
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    hostport = hostport.split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{source} {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else first_line(exc)
        raise UserError(f"no Ray cluster at {source} {address} ({reason}): start one with `python -m cluster.local up` "
                        "or `ray start --head --node-ip-address 127.0.0.1`, or drop the address for a local Ray") from None


def check_share(value: float | None, flag: str = "--gpus-per-trial") -> None:
    """Refuse a GPU share outside 0..1 (NaN too): a trial trains on one device, and 0 means no GPU."""
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{flag} must be within 0..1 (a share of one GPU; 0: no GPU), got {value:g}")


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    check_share(args.gpus_per_trial)
    cpus = _or(args.cpus_per_trial, 1.0)
    if cpus <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {cpus}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    # `python -m cluster.local up` writes FER_TUNE_STORAGE(_SHARED) into cluster.env: a folder every node reads.
    storage = args.storage or os.environ.get("FER_TUNE_STORAGE") or str(Path("ray_results").resolve())
    shared = bool(args.storage_shared) or (not args.storage and os.environ.get("FER_TUNE_STORAGE_SHARED") == "1")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address:  # before Ray starts: ray.init on a dead address hangs for minutes
        check_ray_address(address, "--address" if args.address else "RAY_ADDRESS")
    if address and args.dashboard:
        raise ConfigError("--dashboard starts a local Ray's dashboard; a cluster's dashboard runs on its head node")
    if args.dashboard:
        import importlib.util

        if importlib.util.find_spec("aiohttp_cors") is None:
            raise ConfigError("--dashboard needs Ray's dashboard packages: pip install 'ray[default]'")
    return ClusterOptions(address, storage, shared, args.gpus_per_trial, cpus, args.max_concurrent, bool(args.dashboard),
                          bool(args.keep_trial_dirs), bool(args.verbose))


# --------------------------------------------------------------------------- the final stage


@dataclass(frozen=True)
class FinalOptions:
    """The retrain of the best configuration (and its registration)."""

    enabled: bool = True
    epochs: int = DEFAULT_FINAL_EPOCHS
    device: str | None = None
    promote: bool = False  # then the guarded promotion of the new version to `champion`
    why_epochs: str = ""  # where `epochs` came from, for the plan line
    # Test-time augmentation of the final evaluation (logged beside the plain one) and of the registered
    # model. Off by default: the registered model then answers exactly as the network alone.
    tta: str = "none"
    # --ensemble: "K" (the K best trials, each retrained) or ENSEMBLE_AUTO (sized on validation); None: one model.
    ensemble: str | None = None

    @property
    def ensemble_candidates(self) -> int:
        """How many of the source stage's best trials the final stage may retrain: 1 without --ensemble."""
        if self.ensemble is None:
            return 1
        return ENSEMBLE_AUTO_MAX if self.ensemble == ENSEMBLE_AUTO else int(self.ensemble)


def add_final_flags(p: argparse.ArgumentParser, optional: bool = True) -> None:
    g = p.add_argument_group("final stage")
    g.add_argument("--final-epochs", type=int, help=f"epochs of the final retrain (default {DEFAULT_FINAL_EPOCHS})")
    if optional:
        g.add_argument("--no-final", action="store_true", default=None, help="stop after the trials: no retrain, no registration")
    g.add_argument("--device", help="device of the final retrain (default cuda if available)")
    g.add_argument("--promote", action="store_true", default=None,
                   help="then promote the new version to champion if it beats the champion (as python -m tuning.promote)")
    g.add_argument("--tta", choices=TTA_MODES,
                   help="test-time augmentation of the final evaluation and the registered model: class probabilities "
                        "averaged over the image and its mirror (flip), or over 5 shifted copies and their mirrors "
                        "(tencrop); test accuracy is logged with and without it (default none)")
    g.add_argument("--ensemble", metavar="K|auto",
                   help="register an ensemble: the K best trials by validation accuracy, each retrained as the final "
                        f"model is, their class probabilities averaged; auto: up to {ENSEMBLE_AUTO_MAX}, added in rank "
                        "order while validation accuracy rises (default: one model)")


def final_options(args: argparse.Namespace, trial_epochs: int | None = None,
                  typed: argparse.Namespace | None = None) -> FinalOptions:
    """The final stage's options; its epochs follow the trials' by the study's ratio unless given.
    `typed`: the flags as the user typed them, where a preset (`parser.set_defaults`) filled `args`."""
    typed = typed or args
    if args.final_epochs is not None:
        epochs, why = args.final_epochs, "--final-epochs" if typed.final_epochs is not None else "the preset's"
    elif trial_epochs:
        epochs = max(1, round(FINAL_EPOCHS_RATIO * trial_epochs))
        # A time budget plans the trials' epochs later (they may stop sooner): the final stage follows the space's.
        planned = getattr(args, "time_budget", None) and getattr(args, "search_epochs", None) is None
        whose = "the space's" if planned else "the trials'"
        why = f"{FINAL_EPOCHS_RATIO:g} x {whose} {trial_epochs}, the study's ratio; --final-epochs sets it"
    else:
        epochs, why = DEFAULT_FINAL_EPOCHS, "the study's; --final-epochs sets it"
    if epochs < 1:
        raise ConfigError(f"--final-epochs must be >= 1, got {epochs}")
    from fer_model.device import resolve_device  # torch (1.4 s here): not for --help, nor a bad flag

    resolve_device(args.device)  # the final stage runs there: refuse a device this machine lacks now
    enabled = not getattr(args, "no_final", None)
    if not enabled:
        given = [f for f, v in (("--promote", args.promote), ("--device", args.device),
                                ("--final-epochs", typed.final_epochs),
                                ("--tta", args.tta), ("--ensemble", getattr(args, "ensemble", None))) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) the final stage: drop --no-final")
    return FinalOptions(enabled, epochs, args.device, bool(args.promote), why, _or(args.tta, "none"),
                        ensemble_option(getattr(args, "ensemble", None)))


def ensemble_option(value: str | None) -> str | None:
    """--ensemble's value as stored: an integer >= 2 ("3") or ENSEMBLE_AUTO; None when not given."""
    if value is None or value == ENSEMBLE_AUTO:
        return value
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 2:
        raise ConfigError(f"--ensemble must be an integer >= 2 or {ENSEMBLE_AUTO}, got {value!r}")
    return str(k)


# --------------------------------------------------------------------------- early stopping


DEFAULT_GRACE_PERIOD = 2


@dataclass(frozen=True)
class SchedulerSettings:
    """Early stopping of poor trials: ASHA on validation accuracy per epoch, or none."""

    kind: str = "none"  # "asha" or "none"
    grace_period: int = DEFAULT_GRACE_PERIOD
    reduction_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("the grace period must be >= 1 and the reduction factor > 1")


def add_scheduler_flags(group: argparse._ArgumentGroup, flag_prefix: str, dest_prefix: str, default: str, what: str) -> None:
    """--[prefix]scheduler, --[prefix]grace-period, --[prefix]reduction-factor for one stage's trials."""
    group.add_argument(f"--{flag_prefix}scheduler", dest=f"{dest_prefix}scheduler", choices=["asha", "none"],
                       help=f"asha: stop poor {what} trials early on validation accuracy; none: run all to the end (default {default})")
    group.add_argument(f"--{flag_prefix}grace-period", dest=f"{dest_prefix}grace_period", type=int,
                       help=f"ASHA: epochs before a {what} trial can be stopped (default {DEFAULT_GRACE_PERIOD}; "
                            "--space strong: 5)")
    group.add_argument(f"--{flag_prefix}reduction-factor", dest=f"{dest_prefix}reduction_factor", type=float,
                       help=f"ASHA: keep 1/this of {what} trials at each rung (default 3)")


def scheduler_settings(args: argparse.Namespace, dest_prefix: str, default: str, flag_prefix: str = "",
                       grace_period: int = DEFAULT_GRACE_PERIOD) -> SchedulerSettings:
    value = lambda name, fallback: _or(getattr(args, dest_prefix + name), fallback)
    if value("scheduler", default) != "asha":
        flag = "--" + flag_prefix
        unused = [f"{flag}{n}" for n in ("grace-period", "reduction-factor") if getattr(args, dest_prefix + n.replace("-", "_")) is not None]
        if unused:
            raise ConfigError(f"{', '.join(unused)} only apply with {flag}scheduler asha")
    return SchedulerSettings(value("scheduler", default), value("grace_period", grace_period), value("reduction_factor", 3.0))


# --------------------------------------------------------------------------- the search

DEFAULT_TRIALS = 30
DEFAULT_SEARCH_EPOCHS = 15  # the default space's (tuning.spaces.NAMED_SPACES)
STUDY_PREFIX = "fer2013-search"
LATEST_GRID = "latest-grid"


@dataclass(frozen=True)
class Flag:
    """A search flag, declared once on its `SearchOptions` field: its names (in tuning.search, and in
    tuning.grid's chain, where None means the grid has no such flag), its help, how its value is read and
    checked, and whether a --resume refuses another value for it."""

    flag: str
    grid_flag: str | None
    help: str
    dest: str = ""  # argparse's (default: from `flag`)
    type: Callable[[str], Any] | None = None
    metavar: str | None = None  # argparse's (default: from `type`)
    store_true: bool = False
    check: Callable[[Any], str | None] | None = None  # what is wrong with a value ("must be >= 1, got 0"), else None
    resume: tuple[str, ...] = ("search", "grid")  # where a --resume refuses a changed value
    stored: bool = True  # kept on the search run (and a grid's chain) for --resume

    def names(self, in_grid: bool) -> str | None:
        return self.grid_flag if in_grid else self.flag

    def argparse_dest(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")


def search_flag(default: Any, flag: str, grid_flag: str | None, help: str, **kw: Any) -> Any:
    """A `SearchOptions` field that is a flag; `default` fills it when the flag is not given."""
    factory = {"default_factory": (lambda: dict(default))} if isinstance(default, dict) else {"default": default}
    return field(**factory, metadata={"flag": Flag(flag, grid_flag, help, **kw)})


def _above(low: float, unit: str = "") -> Callable[[Any], str | None]:
    """A check: values must be > `low` (the error follows the flag's name: ``must be > 0 seconds, got -1``)."""
    return lambda v: None if v > low else f"must be > {low:g}{unit}, got {v:g}"


def _at_least_one(v: Any) -> str | None:
    return None if v >= 1 else f"must be >= 1, got {v}"


def _duration(text: str) -> float:
    """--time-budget's type: `budget.parse_duration`, its error as argparse shows a flag's."""
    try:
        return budget.parse_duration(text, flag="", positive=False)  # > 0: the flag's check says so
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class SearchOptions:
    """A search: how many trials of how many epochs over which space, its Optuna study, its start.

    Each field that is a flag declares it (`search_flag`): the parsers, the defaults, the checks, what a
    --resume keeps and refuses to change, and tuning.grid's chain flags all come from here. A new search
    flag is one field here (and what reads it)."""

    trials: int = search_flag(DEFAULT_TRIALS, "--trials", "--search-trials", f"number of trials (default {DEFAULT_TRIALS})",
                              dest="search_trials", type=int, check=_at_least_one)
    epochs: int = search_flag(DEFAULT_SEARCH_EPOCHS, "--epochs", "--search-epochs",
                              f"epochs per search trial (default {DEFAULT_SEARCH_EPOCHS}; --space strong: 30, laptop: 27)",
                              dest="search_epochs", type=int, check=_at_least_one)
    space: dict[str, Any] = search_flag({}, "--space", "--space",
                                        "default (the study's next steps), strong (architectures, augmentation, schedules), "
                                        "laptop (the nets fast on CPUs, the CPU recipe first), "
                                        "or a YAML or JSON space file (see tuning/spaces.py; a name wins over a file of that name)")
    scheduler: SchedulerSettings = field(default_factory=lambda: SchedulerSettings("asha"))  # --scheduler & co, below
    storage_url: str = search_flag("", "--optuna-storage", "--optuna-storage",
                                   "Optuna storage URL (default sqlite:///optuna.db beside the MLflow sqlite file)")
    # None: a new timestamped name, or (with resume) the latest search's
    study_name: str | None = search_flag(None, "--study-name", "--study-name",
                                         f"Optuna study name (default {STUDY_PREFIX}-<time>; with --resume, the latest search's)",
                                         resume=("grid",))
    resume: bool = search_flag(False, "--resume", None, "continue an interrupted search without repeating finished trials",
                               store_true=True, resume=(), stored=False)
    time_budget: float | None = search_flag(None, "--time-budget", "--time-budget",
                                            "end the search after this long (45s, 90m, 2h; a plain number is seconds); "
                                            "trials running then are recorded as stopped early. Without --trials, --epochs, "
                                            "--grace-period or --reduction-factor, those not given are planned to fit it "
                                            "(tuning/budget.py; the plan is printed first)",
                                            type=_duration, metavar="DURATION", check=_above(0, " seconds"))
    sampler_seed: int = search_flag(0, "--search-seed", "--search-seed", "TPE sampler seed (default 0)", type=int)
    train_seed: int = 0  # the trials' --seed: tuning.search's own, the grid's in a chain
    # a grid or search run id, or LATEST_GRID: its best config is trial 1
    start_from: str | None = search_flag(None, "--start-from", None,
                                         f"a grid or search run id, or {LATEST_GRID}: its best configuration is the first trial",
                                         resume=(), stored=False)
    given: Mapping[str, str] = field(default_factory=dict, compare=False)  # with resume: flag -> key to check
    # The first trials (before a --start-from one): a named space's `start_points`, flat configs inside it.
    start_points: tuple[dict[str, Any], ...] = ()
    # With --time-budget: the plan that filled the flags not given (tuning.budget), else None.
    budget_plan: budget.Plan | None = field(default=None, compare=False)

    def stored(self) -> dict[str, Any]:
        """What a search run keeps for --resume (and a grid chain for its search)."""
        kept = {f.name for f in fields(self) if f.name not in ("given", "budget_plan")
                and (_flag_of(f) is None or _flag_of(f).stored)}
        return {k: v for k, v in asdict(self).items() if k in kept}

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> "SearchOptions":
        names = {f.name for f in fields(cls)} - {"budget_plan"}
        return cls(**{**{k: v for k, v in d.items() if k in names}, "scheduler": SchedulerSettings(**d["scheduler"]),
                      "start_points": tuple(dict(p) for p in d.get("start_points") or ())})


def _flag_of(f) -> Flag | None:
    return f.metadata.get("flag")


def search_flags() -> list[tuple[str, Flag]]:
    """(field, flag) of every flag `SearchOptions` declares, in field order."""
    return [(f.name, _flag_of(f)) for f in fields(SearchOptions) if _flag_of(f) is not None]


# The search's scheduler flags (shared with the grid's, `add_scheduler_flags`): argparse dest -> key in SchedulerSettings.
_SCHEDULER_KEYS = {"scheduler": "kind", "grace_period": "grace_period", "reduction_factor": "reduction_factor"}


def add_search_flags(p: argparse.ArgumentParser, in_grid: bool = False) -> None:
    """The search's flags, from `SearchOptions`. In `tuning.grid` (a grid -> search chain) the flags the
    grid also has get a ``--search-`` prefix; the chain's search starts from the grid's best, and cannot resume."""
    g = p.add_argument_group("search" if not in_grid else "search after the grid (with --search-trials)")
    for name, flag in search_flags():
        names = flag.names(in_grid)
        if names is None:
            continue
        helptext = flag.help if not (in_grid and name == "trials") else \
            "then run this many Optuna search trials started from the grid's best, and one final stage"
        if flag.store_true:
            g.add_argument(names, dest=flag.argparse_dest(), action="store_true", default=None, help=helptext)
        else:
            g.add_argument(names, dest=flag.argparse_dest(), type=flag.type, metavar=flag.metavar, help=helptext)
        if name == "epochs":  # the scheduler's flags, after the epochs they stop
            add_scheduler_flags(g, "search-" if in_grid else "", "search_", "asha", "search")


def search_resume_keys(in_grid: bool) -> dict[str, tuple[str, str]]:
    """What a resumed search (or, `in_grid`, a grid's chain) keeps: argparse dest -> (flag, key in
    `SearchOptions.stored()`, under ``chain.search.`` in a grid's)."""
    where, prefix, pre = ("grid", "chain.search.", "search-") if in_grid else ("search", "", "")
    keys = {flag.argparse_dest(): (flag.names(in_grid), prefix + name)
            for name, flag in search_flags() if where in flag.resume and flag.names(in_grid)}
    keys.update({f"search_{dest}": (f"--{pre}{dest.replace('_', '-')}", f"{prefix}scheduler.{key}")
                 for dest, key in _SCHEDULER_KEYS.items()})
    return keys


# A resumed search keeps what it started with: these flags, given again, must say the same.
SEARCH_RESUME_KEYS = {**search_resume_keys(in_grid=False), "seed": ("--seed", "train_seed"),
                      "max_concurrent": ("--max-concurrent", "max_concurrent")}
# tuning.grid's flags for the search after it (they need --search-trials).
CHAIN_DESTS = tuple(dest for dest in search_resume_keys(in_grid=True) if dest != "search_trials")


def search_options(args: argparse.Namespace, tracking_uri: str, train_seed: int = 0, in_grid: bool = False,
                   epoch_seconds: Callable[[Mapping[str, Any], Mapping[str, int]], Mapping[str, float]] | None = None
                   ) -> SearchOptions:
    """Validate the search flags (the space file included) before anything starts; `in_grid`: the flags
    of the search after tuning.grid's grid (their --search- names). With --time-budget (not resumed, not
    in a grid's chain) the trials, epochs and ASHA settings not given are planned (`budget_values`;
    `epoch_seconds` replaces its speed table)."""
    values: dict[str, Any] = {}
    for name, flag in search_flags():
        value = getattr(args, flag.argparse_dest(), None)
        if value is not None and flag.check and (error := flag.check(value)):
            raise ConfigError(f"{flag.names(in_grid)} {error}")
        if value is not None:
            values[name] = value
    if values.get("resume") and values.get("start_from"):
        raise ConfigError("--start-from does not apply with --resume: a resumed search keeps its start")
    named = NAMED_SPACES.get(args.space or "default")  # None: a space file
    epochs = values["epochs"] = search_epochs(args)
    values["space"] = validate_space(named.space, epochs) if named else load_space(args.space, epochs)
    grace = named.grace_period if named else DEFAULT_GRACE_PERIOD
    values["scheduler"] = scheduler_settings(args, "search_", "asha", "search-" if in_grid else "", grace)
    values["start_points"] = named.start_points if named else ()
    if values.get("time_budget") and not values.get("resume") and not in_grid:
        values.update(budget_values(args, values, named, epoch_seconds))
    values["storage_url"] = optuna_storage_url(args.optuna_storage, tracking_uri)
    values["train_seed"] = train_seed
    if values.get("resume"):
        values["given"] = given_flags(args, SEARCH_RESUME_KEYS)
    return SearchOptions(**values)


def budget_values(args: argparse.Namespace, values: Mapping[str, Any], named, epoch_seconds=None) -> dict[str, Any]:
    """--time-budget without --trials, --epochs, --grace-period or --reduction-factor: those not given, from
    `budget.plan` (the space's epochs the longest trial at most, its grace period the least), which is printed.
    `epoch_seconds(space, sizes)`: seconds an epoch of each net (default: `budget.EPOCH_SPEED`, else timed)."""
    arg = lambda name: getattr(args, name, None)
    fixed = {"trials": arg("search_trials"), "epochs": arg("search_epochs"),
             "grace_period": arg("search_grace_period"), "reduction_factor": arg("search_reduction_factor")}
    scheduler: SchedulerSettings = values["scheduler"]
    if scheduler.kind != "asha":  # no rungs: only the trials and their epochs to plan
        fixed = {k: v for k, v in fixed.items() if k in ("trials", "epochs")}
    if all(v is not None for v in fixed.values()):
        return {}
    sizes = budget.data_sizes(arg("max_samples"), _or(arg("val_fraction"), 0.1))
    threads = _or(arg("cpus_per_trial"), 1.0)
    # A local Ray's CPUs (a cluster joined with --address may have more: --max-concurrent says how many at once).
    concurrent = arg("max_concurrent") or max(int((os.cpu_count() or 1) // threads), 1)
    final_epochs = arg("final_epochs") or max(1, round(FINAL_EPOCHS_RATIO * values["epochs"]))  # as final_options
    plan = budget.plan_for_search(
        values["time_budget"], values["space"], sizes, concurrent, threads, final_epochs,
        max_epochs=named.epochs if named else DEFAULT_SEARCH_EPOCHS,
        min_grace=named.grace_period if named else DEFAULT_GRACE_PERIOD, measure=epoch_seconds,
        asha=scheduler.kind == "asha", flag="--time-budget", **{k: v for k, v in fixed.items() if v is not None})
    # Printed here, before Ray starts (the stage's own plan line follows, with these values).
    print(f"time budget {budget.duration_text(values['time_budget'])}: {plan.line()}", flush=True)
    try:  # values bounded by the epochs (warmup) must suit the planned trials
        validate_space(values["space"], plan.max_epochs)
    except ConfigError as exc:
        raise ConfigError(f"--time-budget planned {plan.max_epochs}-epoch trials, too short for this space: {exc}; "
                          "give --epochs") from None
    out: dict[str, Any] = {"trials": plan.trials, "epochs": plan.max_epochs, "budget_plan": plan}
    if scheduler.kind == "asha":
        out["scheduler"] = SchedulerSettings("asha", plan.grace_period, plan.reduction_factor)
    return out


def search_epochs(args: argparse.Namespace) -> int:
    """--epochs of the search, else its named space's (30 for strong), else DEFAULT_SEARCH_EPOCHS."""
    named = NAMED_SPACES.get(args.space or "default")
    return _or(args.search_epochs, named.epochs if named else DEFAULT_SEARCH_EPOCHS)


def optuna_storage_url(flag: str | None, tracking_uri: str) -> str:
    """--optuna-storage, else sqlite:///optuna.db beside the MLflow sqlite store (or here)."""
    if flag:
        url = flag if "://" in flag else SQLITE + str(Path(flag).resolve())
    elif sqlite_path(tracking_uri) is not None:
        url = SQLITE + str(sqlite_path(tracking_uri).parent / "optuna.db")
    else:
        url = SQLITE + str(Path("optuna.db").resolve())
    if sqlite_path(url) is not None:
        if not sqlite_path(url).parent.is_dir():
            raise ConfigError(f"--optuna-storage {url}: its folder does not exist")
        return url
    try:  # open it now, before Ray starts: a bad URL or a server that is down is one line
        import optuna

        optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and driver errors alike
        raise ConfigError(f"--optuna-storage {url} cannot be opened: {first_line(exc)}") from None
    return url


# --------------------------------------------------------------------------- all of them


@dataclass(frozen=True)
class CommonOptions:
    """The validated shared flags of a tuning command."""

    data: DataConfig
    tracking: TrackingOptions
    cluster: ClusterOptions
    final: FinalOptions


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Data, resources and cluster, tracking and final-stage flags."""
    add_data_flags(p)
    add_cluster_flags(p)
    add_tracking_flags(p)
    add_final_flags(p)


def common_options(args: argparse.Namespace, trial_epochs: int | None = None,
                   typed: argparse.Namespace | None = None) -> CommonOptions:
    """Validate the shared flags: a bad value or an unreachable server raises a UserError.
    `trial_epochs`: the trials' epochs, which the final stage's follow unless --final-epochs is given;
    `typed`: the flags as typed, where a preset filled `args` (see `final_options`)."""
    data, cluster, final = data_config(args), cluster_options(args), final_options(args, trial_epochs, typed)
    return CommonOptions(data, tracking_options(args), cluster, final)


def given_flags(args, table: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """`table` (argparse dest -> (flag, dotted key)) narrowed to the flags given, as ``{flag: key}``."""
    return {flag: key for dest, (flag, key) in table.items() if getattr(args, dest, None) is not None}


def floats(text: str) -> list[float]:
    """Comma-separated numbers (``--dropouts 0.3,0.5``)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError("expected at least one value")
    return values
