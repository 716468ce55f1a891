"""`python -m tuning.search`: Optuna (TPE, through Ray Tune's OptunaSearch) over batch size, optimizer,
lr, dropout and weight decay, with ASHA early stopping, a resumable study, and its plots in MLflow.

    python -m tuning.search --data PATH --trials 30
    python -m tuning.search --data PATH --resume          # continue the latest interrupted search
    optuna-dashboard sqlite:///$PWD/optuna.db             # watch the study live
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fer_model import data as fdata
from fer_model import metrics as M
from fer_model.cli import Parser, run_cli
from fer_model.errors import ConfigError, UserError
from fer_model.training import TrainConfig
from tuning import names as N
from tuning import report
from tuning.final import final_stage
from tuning.options import CommonOptions, add_common_flags, common_options
from tuning.runner import TrialRow, best_row, make_scheduler, ray_session, run_trials
from tuning.spaces import DEFAULT_SEARCH_SPACE, SEARCH_FIXED, load_space, to_tune, validate_space
from tuning.tracking import (client_for, ensure_experiment, log_files, read_best_config, record_best, set_tags,
                             stage_run)
from tuning.trainable import TrialSetup

log = logging.getLogger(__name__)
TAG_TUNE_PATH = "tune_experiment_path"
STUDY_PREFIX = "fer2013-search"
DEFAULT_TRIALS = 30


@dataclass(frozen=True)
class SearchSettings:
    """Validated search flags."""

    trials: int
    epochs: int
    space: dict[str, Any]
    time_budget: float | None
    scheduler: str
    grace_period: int
    reduction_factor: float
    storage_url: str
    study_name: str | None  # None: a new timestamped name, or (with resume) the latest search's
    resume: bool
    seed: int  # TPE sampler seed
    train_seed: int


def add_search_flags(p: argparse.ArgumentParser, for_grid: bool = False) -> None:
    """Search flags; inside `tuning.grid` the ones the grid also has get a ``search-`` prefix."""
    pre = "search-" if for_grid else ""
    g = p.add_argument_group("search")
    if not for_grid:
        g.add_argument("--trials", type=int, help="number of trials (default 30; a resumed search keeps its own)")
    g.add_argument(f"--{pre}epochs", dest="search_epochs", type=int, default=SEARCH_FIXED["epochs"],
                   help=f"epochs per search trial (default {SEARCH_FIXED['epochs']})")
    g.add_argument(f"--{pre}scheduler", dest="search_scheduler", choices=["asha", "none"], default="asha",
                   help="asha (default): stop poor trials early on validation accuracy; none: run all to the end")
    g.add_argument("--space", help="YAML or JSON search space replacing the default (see tuning/spaces.py)")
    g.add_argument("--time-budget", type=float,
                   help="end the search after this many seconds; trials running then are recorded as stopped early")
    g.add_argument("--grace-period", type=int, default=2, help="ASHA (grid and search): epochs before a trial can be stopped (default 2)")
    g.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA (grid and search): keep 1/this of trials at each rung (default 3)")
    g.add_argument("--optuna-storage", help="Optuna storage URL (default sqlite:///optuna.db beside the MLflow sqlite file)")
    g.add_argument("--study-name", help=f"Optuna study name (default {STUDY_PREFIX}-<time>; with --resume, the latest search's)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted search without repeating finished trials")
    g.add_argument("--search-seed", type=int, default=0, help="TPE sampler seed (default 0)")


def search_settings(args: argparse.Namespace, opts: CommonOptions, trials: int) -> SearchSettings:
    if trials < 1:
        raise ConfigError(f"the number of trials must be >= 1, got {trials}")
    if args.search_epochs < 1:
        raise ConfigError(f"search epochs must be >= 1, got {args.search_epochs}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise ConfigError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.grace_period < 1 or args.reduction_factor <= 1:
        raise ConfigError("--grace-period must be >= 1 and --reduction-factor > 1")
    space = load_space(args.space) if args.space else validate_space(DEFAULT_SEARCH_SPACE)
    return SearchSettings(trials, args.search_epochs, space, args.time_budget, args.search_scheduler,
                          args.grace_period, args.reduction_factor, optuna_storage_url(args.optuna_storage, opts.tracking_uri),
                          args.study_name, args.resume, args.search_seed, args.seed)


def optuna_storage_url(flag: str | None, tracking_uri: str) -> str:
    """--optuna-storage, else sqlite:///optuna.db beside the MLflow sqlite store (or here)."""
    if flag:
        url = flag if "://" in flag else "sqlite:///" + str(Path(flag).resolve())
    elif tracking_uri.startswith("sqlite:///"):
        url = "sqlite:///" + str(Path(tracking_uri[len("sqlite:///"):]).parent / "optuna.db")
    else:
        url = "sqlite:///" + str(Path("optuna.db").resolve())
    if url.startswith("sqlite:///"):
        if not Path(url[len("sqlite:///"):]).parent.is_dir():
            raise ConfigError(f"--optuna-storage {url}: its folder does not exist")
        return url
    try:  # open it now, before Ray starts: a bad URL or a server that is down is one line
        import optuna

        optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and driver errors alike
        raise ConfigError(f"--optuna-storage {url} cannot be opened: {str(exc).splitlines()[0]}") from None
    return url


@dataclass
class SearchOutcome:
    parent_run_id: str
    study_name: str
    rows: list[TrialRow]
    best: TrialRow


def starting_point(seed_config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The seed configuration (defaults filled in) on the searched keys, moved inside the space.

    Ray needs a value for every searched key. The grid's weight decay is 0, outside a log-uniform
    range: it becomes the range's low end; a categorical value the space lacks becomes its first.
    """
    full = TrainConfig.from_dict(seed_config).to_dict()
    point = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            continue
        (kind, values), value = next(iter(spec.items())), full[key]
        if kind == "choice":
            point[key] = value if value in values else values[0]
        else:
            inside = min(max(value, values[0]), values[1])
            point[key] = int(inside) if kind == "randint" else float(inside)
    return point


def latest_stage_run(client, experiment_id: str, stage: str, extra: str = "", statuses: Sequence[str] = ()):
    query = f"tags.`{N.TAG_STAGE}` = '{stage}'" + (f" and {extra}" if extra else "")
    for run in client.search_runs([experiment_id], query, max_results=50, order_by=["attributes.start_time DESC"]):
        if not statuses or run.info.status in statuses:
            return run
    return None


def run_search(s: SearchSettings, opts: CommonOptions, data, client, experiment_id: str,
               seed_config: dict[str, Any] | None = None) -> SearchOutcome:
    """Run (or resume) the search; log its table and Optuna's plots on its parent run."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    resumed = None
    if s.resume:
        extra = f"tags.`{N.TAG_STUDY}` = '{s.study_name}'" if s.study_name else ""
        resumed = latest_stage_run(client, experiment_id, N.STAGE_SEARCH, extra, ("RUNNING", "KILLED", "FAILED"))
        if resumed is None:
            raise UserError("--resume: no interrupted search run in this experiment"
                            + (f" for study {s.study_name!r}" if s.study_name else ""))
    study_name = resumed.data.tags[N.TAG_STUDY] if resumed else (s.study_name or f"{STUDY_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resumed and _study_has_trials(optuna, s.storage_url, study_name):
        raise UserError(f"Optuna study {study_name!r} already has trials in {s.storage_url}: "
                        "pass --resume to continue it, or another --study-name")
    if seed_config is None:
        grid = latest_stage_run(client, experiment_id, N.STAGE_GRID, statuses=("FINISHED",))
        seed_config = read_best_config(client, grid.info.run_id) if grid else None
    points = [starting_point(seed_config, s.space)] if seed_config else None
    fixed = {**SEARCH_FIXED, "epochs": s.epochs, "seed": s.train_seed, **{k: v for k, v in s.space.items() if not isinstance(v, dict)}}
    if resumed:  # the restored Tune experiment keeps its own trial count, space and data
        s = dataclasses.replace(s, trials=int(resumed.data.params.get("trials", s.trials)))
        was, now = resumed.data.params, _data_params(opts, data)
        changed = [k for k, v in now.items() if k in was and was[k] != str(v)]
        if changed:
            raise ConfigError(f"--resume: the data differs from the interrupted search's ({', '.join(changed)}); "
                              "pass the same --data, --max-samples, --val-fraction and --data-seed")
    tune_path = resumed.data.tags.get(TAG_TUNE_PATH) if resumed else None
    if resumed and not (tune_path and tune.Tuner.can_restore(tune_path)):
        raise UserError(f"--resume: the Tune experiment of run {resumed.info.run_id} ({tune_path}) cannot be restored")

    params = {"trials": s.trials, "epochs": s.epochs, "scheduler": s.scheduler, "space": str(s.space),
              "optuna_storage": s.storage_url, "seeded_with": str(points[0]) if points else "nothing",
              "time_budget": s.time_budget, **_data_params(opts, data)}
    tags = {N.TAG_STAGE: N.STAGE_SEARCH, N.TAG_STUDY: study_name}
    with stage_run(client, experiment_id, f"search {study_name}", tags, None if resumed else params,
                   run_id=resumed.info.run_id if resumed else None) as parent:
        name = f"search-{study_name}"
        if not resumed:
            set_tags(client, parent, {TAG_TUNE_PATH: f"{opts.storage.rstrip('/')}/{name}"})
        storage = optuna.storages.RDBStorage(s.storage_url)
        searcher = OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=s.seed),
                                study_name=study_name, storage=storage)
        scheduler = make_scheduler(s.scheduler, s.epochs, s.grace_period, s.reduction_factor)
        setup = TrialSetup(opts.tracking_uri, experiment_id, parent, opts.cpus_per_trial)
        rows = run_trials(opts, data, setup, name, {**fixed, **to_tune({k: v for k, v in s.space.items() if isinstance(v, dict)})},
                          search_alg=searcher, scheduler=scheduler, num_samples=s.trials, time_budget_s=s.time_budget,
                          restore_path=tune_path if resumed else None)
        best = best_row(rows)
        with tempfile.TemporaryDirectory() as d:
            files = [report.write_table(rows, Path(d) / "search_trials.csv"),
                     report.plot_all_learning_curves(rows, Path(d) / "learning_curves.png")]
            files += optuna_plots(optuna.load_study(study_name=study_name, storage=storage), Path(d))
            log_files(client, parent, files)
        record_best(client, parent, best.config, best.run_id)
    print(f"\nstudy {study_name} ({s.storage_url}); trials by validation accuracy:")
    print(report.trials_text(rows))
    print(f"best: {best.config} val {100 * best.val_acc:.2f}% (run {best.run_id})")
    return SearchOutcome(parent, study_name, rows, best)


def _data_params(opts: CommonOptions, data) -> dict[str, Any]:
    """What decides the data a trial sees; a resume must see the same."""
    return {**data.sizes(), "data_fingerprint": data.fingerprint[:16], "val_fraction": opts.data.val_fraction,
            "data_seed": opts.data.seed}


def _study_has_trials(optuna, url: str, name: str) -> bool:
    try:
        return len(optuna.load_study(study_name=name, storage=url).trials) > 0
    except KeyError:
        return False


def optuna_plots(study, out: Path) -> list[Path]:
    """Optuna's own plots (matplotlib backend) as PNG; a plot the study cannot make yet is skipped."""
    import warnings

    import optuna.visualization.matplotlib as vis

    from fer_model.evaluate import pyplot

    plt = pyplot()
    makers = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study, target_name=M.VAL_ACC),
        "param_importances.png": lambda: vis.plot_param_importances(study, target_name=M.VAL_ACC),
        "parallel_coordinate.png": lambda: vis.plot_parallel_coordinate(study, target_name=M.VAL_ACC),
        "slice_batch_size_optimizer.png": lambda: vis.plot_slice(
            study, params=[p for p in ("batch_size", "optimizer") if p in _param_names(study)] or None, target_name=M.VAL_ACC),
    }
    paths = []
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" notices on every matplotlib plot
                ax = make()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            paths.append(out / name)
        except Exception as exc:  # noqa: BLE001 - e.g. importances need 2+ finished trials with variation
            log.warning("skipped %s: %s", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return paths


def _param_names(study) -> set[str]:
    return {k for t in study.trials for k in t.params}


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.search", description="Optuna search over batch size, optimizer, lr, dropout and weight decay on Ray Tune, tracked in MLflow.")
    add_search_flags(p)
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial (default 0)")
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = common_options(args)
    if args.resume:
        fixed_on_resume = {"--trials": args.trials is not None, "--space": args.space is not None,
                           "--epochs": args.search_epochs != SEARCH_FIXED["epochs"],
                           "--scheduler": args.search_scheduler != "asha", "--time-budget": args.time_budget is not None}
        given = [flag for flag, was_given in fixed_on_resume.items() if was_given]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot change a resumed search: it keeps what it started with")
    s = search_settings(args, opts, args.trials if args.trials is not None else DEFAULT_TRIALS)
    t0 = time.perf_counter()
    data = fdata.load(opts.data)
    print(f"data: {fdata.describe(data)}")
    client = client_for(opts.tracking_uri)
    experiment_id = ensure_experiment(client, opts.experiment)
    with ray_session(opts):
        outcome = run_search(s, opts, data, client, experiment_id)
        final_stage(opts, data, experiment_id, outcome.parent_run_id, outcome.best.config, outcome.best.run_id)
    print(f"wall time {time.perf_counter() - t0:.0f} s; search run {outcome.parent_run_id}")
    print(f"inspect: {report.mlflow_ui_command(opts.tracking_uri)}; optuna-dashboard {s.storage_url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
