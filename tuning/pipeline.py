"""The driver: loads the data once, opens every MLflow run and owns its status, and composes the
stages (grid -> search -> final -> register) for `tuning.grid`, `tuning.search` and `tuning.final`.

Flags become typed options (`tuning.flags`); options become each stage's inputs; each stage returns
a typed result; the next stage is built from it. A run's status is set in one place only
(`tracking.tracked_run`): FINISHED on success, KILLED on Ctrl-C, FAILED on an error.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

from mlflow.entities.model_registry import ModelVersion

from fer_model import data as fdata
from fer_model.errors import UserError, first_line
from fer_model.evaluate import describe_test
from fer_model.presets import STUDY_TEST_ACC
from tuning import names as N
from tuning import report
from tuning.orphans import settle_orphans
from tuning.flags import LATEST_GRID, CommonOptions, FinalOptions, SearchOptions
from tuning.stages import StageContext, StageResult
from tuning.stages import final as final_stage
from tuning.stages import grid as grid_stage
from tuning.stages import register as register_step
from tuning.stages import search as search_stage
from tuning.stages.final import FinalInputs, FinalResult
from tuning.stages.grid import GridInputs
from tuning.tracking import client_for, create_run, ensure_experiment, latest_stage_run, read_best_config, tracked_run


@contextmanager
def session(opts: CommonOptions, with_ray: bool = True, experiment_id: str | None = None) -> Iterator[StageContext]:
    """The data (loaded once), the experiment (`opts`', or the given id), and Ray (joined or started)."""
    data = fdata.load(opts.data)
    print(f"data: {fdata.describe(data)}")
    client = client_for(opts.tracking.uri)
    experiment_id = experiment_id or ensure_experiment(client, opts.tracking.experiment)
    settle_orphans(client, experiment_id)  # no stale RUNNING run survives the next command
    if with_ray:
        from tuning.runner import ray_session

        ray = ray_session(opts.cluster, opts.tracking.uri)
    else:
        ray = nullcontext()
    with ray:
        yield StageContext(client, experiment_id, opts.tracking, opts.cluster, opts.data, data)


# --------------------------------------------------------------------------- one stage each, its run owned here


def grid(ctx: StageContext, inputs: GridInputs) -> StageResult:
    from tuning.runner import cluster_params

    run_id = create_run(ctx.client, ctx.experiment_id, "grid", {N.TAG_STAGE: N.STAGE_GRID},
                        {**grid_stage.params(ctx, inputs), **cluster_params()})
    with tracked_run(ctx.client, run_id):
        return grid_stage.run(ctx, run_id, inputs)


def search(ctx: StageContext, options: SearchOptions, start_config: dict[str, Any] | None) -> StageResult:
    from tuning.runner import cluster_params

    plan = search_stage.plan(ctx, options, start_config)
    run_id = plan.run_id or create_run(
        ctx.client, ctx.experiment_id, f"search {plan.study_name}",
        {**plan.tags(), N.TAG_TUNE_PATH: search_stage.tune_path(ctx, plan)}, {**search_stage.params(ctx, plan), **cluster_params()})
    with tracked_run(ctx.client, run_id):
        return search_stage.run(ctx, run_id, plan)


def final(ctx: StageContext, options: FinalOptions, source_run_id: str, best_config: dict[str, Any],
          best_trial_run_id: str | None) -> tuple[FinalResult, ModelVersion | None]:
    """Retrain and evaluate (the final stage), then register (its own step), in one final run."""
    inputs = FinalInputs.of(best_config, options.epochs, source_run_id, best_trial_run_id, options.device)
    run_id = create_run(ctx.client, ctx.experiment_id, "final", inputs.tags(), inputs.config.to_dict())
    with tracked_run(ctx.client, run_id):
        result = final_stage.run(ctx, run_id, inputs)
        version = register_step.register(ctx, result)
    print(describe_final(result, version))
    if options.promote and version is not None:
        from tuning import registry

        req = registry.PromotionRequest(ctx.tracking.model_name, version.version)
        print(f"promotion: {registry.promote(ctx.client, req).describe(req)}")
    return result, version


def describe_final(result: FinalResult, version: ModelVersion | None, study_acc: float = STUDY_TEST_ACC["seed-best"]) -> str:
    text = (f"final: {result.inputs.config.epochs} epochs in {result.train_seconds:.0f} s; "
            f"{describe_test(result.evaluation.metrics)} (the study: {100 * study_acc:.2f}%)\n")
    if version is not None:
        return text + f"registered: {version.name} version {version.version} (run {result.run_id})"
    why = f"training diverged after {len(result.history)} epochs; " if result.diverged else ""
    return text + f"not registered: {why}run {result.run_id}"


# --------------------------------------------------------------------------- the commands


def tune_grid(opts: CommonOptions, inputs: GridInputs, then_search: SearchOptions | None = None) -> StageResult:
    """`tuning.grid`: the grid, then (with --search-trials) a search started from its best, then one final."""
    if then_search is not None:  # a study-name clash is found now, not after hours of grid
        search_stage.check_study_is_new(then_search)

    def stages(ctx: StageContext) -> StageResult:
        result = grid(ctx, inputs)
        return search(ctx, then_search, result.best.config) if then_search is not None else result

    return _trials_then_final(opts, stages)


def tune_search(opts: CommonOptions, options: SearchOptions) -> StageResult:
    """`tuning.search`: a search (new, started from a stage's best, or resumed), then one final."""
    def stages(ctx: StageContext) -> StageResult:
        return search(ctx, options, start_config(ctx, options.start_from) if options.start_from else None)

    return _trials_then_final(opts, stages, f"; optuna-dashboard {options.storage_url}")


def _trials_then_final(opts: CommonOptions, stages: Callable[[StageContext], StageResult], inspect: str = "") -> StageResult:
    """The trial stages, then the final stage and registration from the last one's best."""
    t0 = time.perf_counter()
    with session(opts) as ctx:
        result = stages(ctx)
        if opts.final.enabled:
            final(ctx, opts.final, result.parent_run_id, result.best.config, result.best.run_id)
    print(f"wall time {time.perf_counter() - t0:.0f} s; {result.stage} run {result.parent_run_id}")
    print(f"inspect: {report.mlflow_ui_command(opts.tracking.uri)}{inspect}")
    return result


def retrain(opts: CommonOptions, source_run_id: str) -> FinalResult:
    """`tuning.final`: the final stage and registration for a finished grid or search run."""
    client = client_for(opts.tracking.uri)
    try:
        source = client.get_run(source_run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own error types for unknown ids
        raise UserError(f"no run {source_run_id!r} in {opts.tracking.uri}: {first_line(exc)}") from None
    best = read_best_config(client, source_run_id)
    with session(opts, with_ray=False, experiment_id=source.info.experiment_id) as ctx:  # beside its source run
        result, _ = final(ctx, opts.final, source_run_id, best, source.data.tags.get(N.TAG_BEST_TRIAL_RUN) or None)
    return result


def start_config(ctx: StageContext, start_from: str) -> dict[str, Any]:
    """The best configuration of a grid or search run (or of the latest finished grid)."""
    if start_from == LATEST_GRID:
        run = latest_stage_run(ctx.client, ctx.experiment_id, N.STAGE_GRID, statuses=("FINISHED",))
        if run is None:
            raise UserError(f"--start-from {LATEST_GRID}: no finished grid run in experiment {ctx.tracking.experiment!r}")
        start_from = run.info.run_id
    try:
        return read_best_config(ctx.client, start_from)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unknown id
        raise UserError(f"--start-from {start_from!r}: {first_line(exc)}") from None
