"""The search stage: Optuna's TPE (through Ray Tune's OptunaSearch) with ASHA, a resumable study,
and its plots in MLflow."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fer_model import metrics as M
from fer_model.config import TrainConfig, option
from fer_model.errors import UserError, first_line
from fer_model.evaluate import pyplot
from tuning import names as N
from tuning.names import UNFINISHED
from tuning.options import STUDY_PREFIX, SearchOptions
from tuning.reporting import report
from tuning.spaces import SEARCH_FIXED
from tuning.stages.context import StageContext, StageResult, conclude, data_params
from tuning.stages.resume import check_can_continue, check_unchanged
from tuning.tracking.store import latest_stage_run
from tuning.trials.runner import OptunaStudy, run_trials
from tuning.trials.trainable import TrialSetup

log = logging.getLogger(__name__)
SEARCH_NAME_KEYS = ("arch", "optimizer", "batch_size", "lr", "dropout")


@dataclass(frozen=True)
class SearchPlan:
    """A search ready to run: new, or the interrupted one `run_id` continued."""

    options: SearchOptions  # on a resume, with the trial count it started with
    study_name: str
    start_point: dict[str, Any] | None  # the --start-from trial's searched values
    run_id: str | None = None  # the interrupted search run to reopen
    tune_path: str | None = None
    # The first trials' searched values, in order: the named space's start points (its recipes), then `start_point`.
    start_points: tuple[dict[str, Any], ...] = ()

    def tags(self) -> dict[str, str]:
        return {N.TAG_STAGE: N.STAGE_SEARCH, N.TAG_STUDY: self.study_name}


def plan(ctx: StageContext, options: SearchOptions, start_from: dict[str, Any] | None) -> SearchPlan:
    """Name the study, or find the interrupted search to resume and check it can be; no run is touched."""
    if not options.resume:
        name = options.study_name or f"{STUDY_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_study_is_new(options, name)
        point = starting_point(start_from, options.space) if start_from else None
        return SearchPlan(options, name, point, start_points=start_points(options, point))
    extra = f"tags.`{N.TAG_STUDY}` = '{options.study_name}'" if options.study_name else ""
    run = latest_stage_run(ctx.client, ctx.experiment_id, N.STAGE_SEARCH, extra, UNFINISHED)
    if run is None:
        raise UserError("--resume: no interrupted search run in this experiment"
                        + (f" for study {options.study_name!r}" if options.study_name else ""))
    tune_path = check_can_continue(ctx, run, "search")
    started = json.loads(run.data.tags.get(N.TAG_STAGE_INPUTS) or "{}")
    check_unchanged(run.info.run_id, started, stored_inputs(ctx, options), options.given)
    # The restored Tune experiment keeps its own space, epochs, seeds and searcher (and so its Optuna
    # storage); what it started with is read back so this process agrees with it.
    if started:
        options = dataclasses.replace(SearchOptions.from_stored({k: v for k, v in started.items() if k != "max_concurrent"}),
                                      resume=True)
    else:  # a search run recorded before `stage_inputs` existed
        was = run.data.params
        options = dataclasses.replace(options, trials=int(was.get("trials", options.trials)),
                                      storage_url=was.get("optuna_storage", options.storage_url))
    return SearchPlan(options, run.data.tags[N.TAG_STUDY], None, run.info.run_id, tune_path)


def start_points(options: SearchOptions, start_from: dict[str, Any] | None = None) -> tuple[dict[str, Any], ...]:
    """A new search's first trials: its space's start points (`NamedSpace.start_points`, the shipped
    recipes) moved inside the space (`starting_point`), then the --start-from point; each once."""
    points: list[dict[str, Any]] = []
    for point in [*(starting_point(p, options.space) for p in options.start_points), *([start_from] if start_from else [])]:
        if point not in points:
            points.append(point)
    return tuple(points)


def stored_inputs(ctx: StageContext, options: SearchOptions) -> dict[str, Any]:
    """What a search run records of its inputs (tag `stage_inputs`), for --resume to keep."""
    return {**options.stored(), "max_concurrent": ctx.cluster.max_concurrent}


def params(ctx: StageContext, p: SearchPlan) -> dict[str, Any]:
    o = p.options
    return {"trials": o.trials, "epochs": o.epochs, "scheduler": o.scheduler.kind, "space": str(o.space),
            "optuna_storage": o.storage_url, "started_from": str(p.start_point) if p.start_point else "nothing",
            "time_budget": o.time_budget, **data_params(ctx)}


def tune_path(ctx: StageContext, p: SearchPlan) -> str:
    """Where Tune keeps this search's state (a tag on its run, for --resume)."""
    return p.tune_path or f"{ctx.cluster.storage.rstrip('/')}/search-{p.study_name}"


def run(ctx: StageContext, parent_run_id: str, p: SearchPlan) -> StageResult:
    """Run (or resume) the search under `parent_run_id`; log its table and Optuna's plots there."""
    o = p.options
    study = OptunaStudy(p.study_name, o.storage_url, o.sampler_seed, p.start_points)
    fixed = {**SEARCH_FIXED, "epochs": o.epochs, "seed": o.train_seed, **{k: v for k, v in o.space.items() if not isinstance(v, dict)}}
    searched = {k: v for k, v in o.space.items() if isinstance(v, dict)}
    setup = TrialSetup(ctx.tracking.uri, ctx.experiment_id, parent_run_id, ctx.cluster.cpus_per_trial)
    rows = run_trials(ctx.cluster, ctx.data, setup, f"search-{p.study_name}", fixed, searched=searched,
                      name_keys=[k for k in SEARCH_NAME_KEYS if k in searched] or sorted(searched),
                      study=study, scheduler=o.scheduler, max_epochs=o.epochs, num_samples=o.trials,
                      time_budget_s=o.time_budget, restore_path=p.run_id and tune_path(ctx, p))
    study = optuna.load_study(study_name=p.study_name, storage=o.storage_url)
    result = conclude(ctx, N.STAGE_SEARCH, parent_run_id, rows, lambda d: [
        report.write_table(rows, d / "search_trials.csv"),
        report.plot_all_learning_curves(rows, d / "learning_curves.png"),
        *optuna_plots(study, d)], study_name=p.study_name)
    print(f"\nstudy {p.study_name} ({o.storage_url}); trials by validation accuracy:")
    print(report.trials_text(rows))
    print(f"best: {result.best.config} val {100 * result.best.val_acc:.2f}% (run {result.best.run_id})")
    if tie := report.tie_line(rows):
        print(tie)
    return result


def starting_point(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """A configuration (defaults filled in) on the searched keys, moved inside the space.

    Ray needs a value for every searched key. The grid's weight decay is 0, outside a log-uniform
    range: it becomes the range's low end; a categorical value the space lacks becomes its first. An
    option the configuration's architecture does not take (a grid's cnn has no depth) is the option's default.
    """
    full = TrainConfig.from_dict(config).to_dict()
    point = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            continue
        (kind, values), value = next(iter(spec.items())), full[key] if key in full else option(key).default
        if kind == "choice":
            point[key] = value if value in values else values[0]
        else:
            inside = min(max(value, values[0]), values[1])
            point[key] = int(inside) if kind == "randint" else float(inside)
    return point


def check_study_is_new(options: SearchOptions, name: str | None = None) -> None:
    """A new search must not reuse a study that has trials (that is what --resume is for)."""
    import optuna

    name = name or options.study_name
    if not name:
        return
    try:
        trials = len(optuna.load_study(study_name=name, storage=options.storage_url).trials)
    except KeyError:
        return
    if trials:
        raise UserError(f"Optuna study {name!r} already has trials in {options.storage_url}: "
                        "pass --resume to continue it, or another --study-name")


def optuna_plots(study, out: Path) -> list[Path]:
    """Optuna's own plots (matplotlib backend) as PNG; a plot the study cannot make yet is skipped."""
    import warnings

    import optuna.visualization.matplotlib as vis

    plt = pyplot()
    names = {k for t in study.trials for k in t.params}
    makers = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study, target_name=M.VAL_ACC),
        "param_importances.png": lambda: vis.plot_param_importances(study, target_name=M.VAL_ACC),
        "parallel_coordinate.png": lambda: vis.plot_parallel_coordinate(study, target_name=M.VAL_ACC),
        "slice_batch_size_optimizer.png": lambda: vis.plot_slice(
            study, params=[p for p in ("batch_size", "optimizer") if p in names] or None, target_name=M.VAL_ACC),
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
            log.warning("skipped %s: %s", name, first_line(exc))
    return paths
