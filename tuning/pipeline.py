"""The driver: loads the data once, opens every MLflow run and owns its status, and composes the
stages (grid -> search -> final -> register) for `tuning.grid`, `tuning.search` and `tuning.final`.

Flags become typed options (`tuning.options`); options become each stage's inputs; each stage returns
a typed result; the next stage is built from it. A run's status is set in one place only
(`tracking.tracked_run`): FINISHED on success, KILLED on Ctrl-C, FAILED on an error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mlflow.entities.model_registry import ModelVersion

from fer_model import data as fdata
from fer_model.errors import UserError, first_line, storage_error
from fer_model.evaluate import describe_test
from fer_model.presets import STUDY_TEST_ACC
from tuning import names as N
from tuning.options import ENSEMBLE_AUTO, LATEST_GRID, CommonOptions, FinalOptions, SearchOptions
from tuning.registry import promotion
from tuning.reporting import describe, report
from tuning.stages import final as final_stage
from tuning.stages import grid as grid_stage
from tuning.stages import register as register_step
from tuning.stages import resume
from tuning.stages import search as search_stage
from tuning.stages.context import StageContext, StageResult
from tuning.stages.final import FinalInputs, FinalResult
from tuning.stages.grid import GridInputs
from tuning.stages.resume import to_json
from tuning.tracking.liveness import settle_orphans
from tuning.tracking.store import (
    bound_driver_retries,
    client_for,
    create_run,
    ensure_experiment,
    latest_stage_run,
    log_metrics,
    read_best_config,
    set_tags,
    tracked_run,
    unreachable,
    versions_of_run,
)
from tuning.trials import phases
from tuning.trials.callbacks import StoreUnavailable
from tuning.trials.head_watch import watch_head
from tuning.trials.rows import TrialRow, ensemble_candidates, trial_rows
from tuning.trials.runner import cluster_params, cluster_resources, gcs_address, gpu_share, ray_session


@contextmanager
def session(opts: CommonOptions, with_ray: bool = True, experiment_id: str | None = None,
            continue_with: str = "") -> Iterator[StageContext]:
    """The data (loaded once), the experiment (`opts`', or the given id), and Ray (joined or started;
    a joined cluster's head is watched: `tuning.trials.head_watch`, whose line names `continue_with`)."""
    with phases.DRIVER.time(phases.DATA_LOAD):
        data = fdata.load(opts.data)
    print(f"data: {fdata.describe(data)}")
    client = client_for(opts.tracking.uri)
    experiment_id = experiment_id or ensure_experiment(client, opts.tracking.experiment)
    settle_orphans(client, experiment_id)  # no stale RUNNING run survives the next command
    if with_ray:
        ray = ray_session(opts.cluster, opts.tracking.uri)
    else:
        ray = nullcontext()
    with ray, bound_driver_retries():  # now: a local Ray's workers, started above, keep MLflow's longer retries
        stop = threading.Event()
        # Not through Ray Client (ray://): its GCS address is the server's own view, often unreachable here.
        if with_ray and opts.cluster.address and not opts.cluster.address.startswith("ray://") and continue_with:
            watch_head(gcs_address(), continue_with, stop)
        try:
            yield StageContext(client, experiment_id, opts.tracking, opts.cluster, opts.data, data)
        finally:
            stop.set()


# --------------------------------------------------------------------------- one stage each, its run owned here


def grid(ctx: StageContext, inputs: GridInputs, run_id: str, restore_path: str | None = None, then: str = "") -> StageResult:
    """The grid under its run `run_id` (see `new_grid_run`); given `restore_path`, its Tune state continued."""
    dropouts, lrs = inputs.axes_text()
    print(plan_line(ctx, f"grid {inputs.size} trials (dropout {dropouts} x lr {lrs}) x {inputs.epochs} epochs",
                    inputs.size, then))
    set_tags(ctx.client, run_id, {N.TAG_TRACKING_URI: ctx.tracking.uri})  # what a --resume compares with
    with tracked_run(ctx.client, run_id):
        result = grid_stage.run(ctx, run_id, inputs, restore_path)
    drop_tune_state(ctx, run_id)
    return result


def new_grid_run(ctx: StageContext, inputs: GridInputs, chain: "Chain") -> str:
    """A grid run recording what a --resume needs: its inputs, its chain, where Tune keeps its state."""
    run_id = create_run(ctx.client, ctx.experiment_id, N.stage_run_name(N.STAGE_GRID, inputs.size),
                        {N.TAG_STAGE: N.STAGE_GRID, N.TAG_STAGE_INPUTS: to_json(inputs.to_dict()), N.TAG_CHAIN: to_json(chain.to_dict())},
                        {**grid_stage.params(ctx, inputs), **cluster_params()})
    set_tags(ctx.client, run_id, {N.TAG_TUNE_PATH: grid_stage.tune_path(ctx, run_id)})
    return run_id


def search(ctx: StageContext, options: SearchOptions, start_config: dict[str, Any] | None,
           chained_from: str | None = None, then: str = "") -> StageResult:
    """A new search (or, with `options.resume`, the interrupted one) in its own run."""
    plan = search_stage.plan(ctx, options, start_config)
    tags = {**plan.tags(), N.TAG_TUNE_PATH: search_stage.tune_path(ctx, plan),
            N.TAG_STAGE_INPUTS: to_json(search_stage.stored_inputs(ctx, plan.options))}
    if chained_from:
        tags[N.TAG_CHAINED_FROM] = chained_from
    run_id = plan.run_id or create_run(ctx.client, ctx.experiment_id, N.stage_run_name(N.STAGE_SEARCH, plan.options.trials), tags,
                                       {**search_stage.params(ctx, plan), **cluster_params()})
    o = plan.options
    asha = f", ASHA grace {o.scheduler.grace_period} rf {o.scheduler.reduction_factor:g}" if o.scheduler.kind == "asha" else ""
    print(plan_line(ctx, f"search {o.trials} trials x {o.epochs} epochs (TPE{asha}; study {plan.study_name}"
                         f"{', resumed' if plan.run_id else ''})", o.trials, then))
    set_tags(ctx.client, run_id, {N.TAG_TRACKING_URI: ctx.tracking.uri})
    with tracked_run(ctx.client, run_id):
        result = search_stage.run(ctx, run_id, plan)
    drop_tune_state(ctx, run_id)
    return result


def plan_line(ctx: StageContext, what: str, trials: int, then: str = "") -> str:
    """What a stage is about to do, said before it starts: trials x epochs, how many at once on what,
    what follows, where the results go."""
    total, share, c = cluster_resources(), gpu_share(ctx.cluster), ctx.cluster
    fits = [trials, max(int(total.get("CPU", 0) // c.cpus_per_trial), 1)]
    if share:
        fits.append(max(int(total.get("GPU", 0) // share), 1))
    if c.max_concurrent:
        fits.append(c.max_concurrent)
    sizes = ctx.data.sizes()
    where = f"MLflow {ctx.tracking.uri} (experiment {ctx.tracking.experiment!r}); Tune state under {c.storage}"
    return (f"plan: {what} on {sizes['train']:,} train / {sizes['val']:,} val images; up to {min(fits)} at once "
            f"({c.cpus_per_trial:g} CPU{f', {share:g} GPU' if share else ''} each; Ray has {total.get('CPU', 0):g} CPUs, "
            f"{total.get('GPU', 0):g} GPUs){'; then ' + then if then else ''}\n      results: {where}")


def then_text(search: SearchOptions | None, final_options: FinalOptions) -> str:
    """The stages after this one, for its plan line."""
    parts = [f"search {search.trials} trials x {search.epochs} epochs"] if search is not None else []
    ensemble = "" if final_options.ensemble is None else (
        f" x up to {final_options.ensemble_candidates} ensemble members" if final_options.ensemble == ENSEMBLE_AUTO
        else f" x {final_options.ensemble_candidates} ensemble members")
    parts.append(f"final retrain {final_options.epochs} epochs ({final_options.why_epochs}){ensemble}" if final_options.enabled
                 else "no final stage (--no-final)")
    return ", ".join(parts)


def drop_tune_state(ctx: StageContext, run_id: str) -> None:
    """A finished stage's Tune folder (checkpoints, per-trial results), once MLflow holds all of it.

    Nothing reads it again: a resumed chain reads a finished stage from MLflow. --keep-trial-dirs
    keeps it; a remote URI (s3://) is left to its bucket's lifecycle rules.
    """
    path = ctx.client.get_run(run_id).data.tags.get(N.TAG_TUNE_PATH, "")
    if ctx.cluster.keep_trial_dirs or not path or "://" in path or not Path(path).is_dir():
        return
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed Tune's folder {path} ({size / 1e6:.1f} MB; all of it is in MLflow; --keep-trial-dirs keeps it)")


def final(ctx: StageContext, options: FinalOptions, source_run_id: str, best_config: dict[str, Any],
          best_trial_run_id: str | None, trials: Sequence[TrialRow] = ()) -> tuple[FinalResult, ModelVersion | None]:
    """Retrain and evaluate (the final stage), then register (its own step), in one final run.

    With --ensemble the further members are the source stage's next best trials by validation accuracy:
    from `trials` when they are the rows of a stage that ran in this command, else read from MLflow."""
    candidates = ensemble_members(ctx, options, source_run_id, best_config, best_trial_run_id, trials)
    inputs = FinalInputs.of(best_config, options.epochs, source_run_id, best_trial_run_id, options.device, options.tta,
                            options.ensemble, candidates)
    run_id = create_run(ctx.client, ctx.experiment_id, inputs.run_name, inputs.tags(), inputs.params())
    with tracked_run(ctx.client, run_id):
        t0 = time.perf_counter()
        try:
            result = final_stage.run(ctx, run_id, inputs)
            phases.DRIVER.add(phases.FINAL_TRAIN, result.train_seconds)
            phases.DRIVER.add(phases.FINAL_EVALUATE, time.perf_counter() - t0 - result.train_seconds)
            with phases.DRIVER.time(phases.REGISTER):
                version = register_step.register(ctx, result)
        except Exception:  # a FAILED final run says error, not the training's "completed"
            try:
                set_tags(ctx.client, run_id, {N.TAG_OUTCOME: N.Outcome.ERROR})
            except Exception:  # noqa: BLE001 - the store may be what failed
                pass
            drop_partial_model(ctx, run_id)
            raise
        log_metrics(ctx.client, run_id, phases.DRIVER.take())
    print(describe_final(result, version, full_data=ctx.data_config.max_samples is None))
    if options.promote and version is not None:
        promote_version(ctx, version)
    return result, version


def promote_version(ctx: StageContext, version: ModelVersion) -> None:
    """--promote: the guarded promotion of `version`, its decision printed."""
    req = promotion.PromotionRequest(ctx.tracking.model_name, version.version)
    print(f"promotion: {promotion.promote(ctx.client, req).describe(req)}")


def drop_partial_model(ctx: StageContext, run_id: str) -> None:
    """Remove what a failed registration uploaded of the run's model (a local artifact store only: a
    server's or a bucket's artifacts are left to `mlflow gc`), so no half model is left to load."""
    from urllib.parse import urlparse

    try:
        uri = ctx.client.get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - the store may be what failed
        return
    parsed = urlparse(uri)
    try:  # a version that exists (its response lost on the way back) keeps its model: --resume adopts it
        if versions_of_run(ctx.client, run_id):
            return
    except Exception:  # noqa: BLE001 - the store may be what failed: then nothing was registered either
        pass
    if parsed.scheme in ("", "file"):
        shutil.rmtree(Path(parsed.path) / register_step.MODEL_ARTIFACT, ignore_errors=True)


def ensemble_members(ctx: StageContext, options: FinalOptions, source_run_id: str, best_config: dict[str, Any],
                     best_trial_run_id: str | None, trials: Sequence[TrialRow] = ()) -> list[TrialRow]:
    """The trials an --ensemble adds to the best one, best first (none without --ensemble); says how
    many it found when the stage has fewer than asked."""
    if options.ensemble is None:
        return []
    # A stage that ran in this command has its rows; one that finished before (a resumed chain's, or
    # tuning.final's source) has only its best, without a history: its trial runs are read back.
    rows = list(trials) if any(r.history for r in trials) else trial_rows(ctx.client, ctx.experiment_id, source_run_id)
    wanted = options.ensemble_candidates
    found = ensemble_candidates(rows, best_config, best_trial_run_id, wanted)
    n = 1 + len(found)
    if options.ensemble == ENSEMBLE_AUTO:
        print(f"ensemble auto: up to {n} members (at most {wanted}), the best trials of run {source_run_id} by validation "
              "accuracy, added while the ensemble's validation accuracy rises")
    else:
        fewer = "" if n == wanted else f" (asked {wanted}; run {source_run_id} has only {n} usable trials)"
        print(f"ensemble: {n} members, the best trials of run {source_run_id} by validation accuracy{fewer}")
    return found


def describe_final(result: FinalResult, version: ModelVersion | None, full_data: bool = True,
                   study_acc: float = STUDY_TEST_ACC["seed-best"]) -> str:
    """The final stage's lines; beside the study's test accuracy only on the full data (a subset's
    test images are another test)."""
    beside = f" (the study: {100 * study_acc:.2f}%)" if full_data else ""
    tta = f"; {result.tta_line()}" if result.tta_evaluation is not None else ""
    members = f"{len(result.members)} members x " if result.ensemble else ""
    text = (f"final: {members}{result.inputs.config.epochs} epochs in {result.train_seconds:.0f} s; "
            f"{'member 1: ' if members else ''}{result.weights_line()}; {'the ensemble: ' if members else ''}"
            f"{describe_test(result.evaluation.metrics)}{beside}{tta}\n")
    if result.ensemble:
        text += f"{result.ensemble_line()}\n"
    if version is not None:
        return text + f"registered: {version.name} version {version.version} (run {result.run_id})"
    why = f"training diverged after {len(result.history)} epochs; " if result.diverged else ""
    return text + f"not registered: {why}run {result.run_id}"


# --------------------------------------------------------------------------- the commands


@dataclass(frozen=True)
class Chain:
    """What follows the grid in `tuning.grid`: a search (with --search-trials), then the final stage.

    Recorded on the grid run (tag `chain`), so that `--resume` continues at the stage where it stopped.
    """

    search: SearchOptions | None
    final: FinalOptions
    max_concurrent: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search.stored() if self.search else None, "final": dataclasses.asdict(self.final),
                "max_concurrent": self.max_concurrent}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Chain":
        search = SearchOptions.from_stored(d["search"]) if d.get("search") else None
        return cls(search, FinalOptions(**d["final"]), d.get("max_concurrent"))


def tune_grid(opts: CommonOptions, inputs: GridInputs, then_search: SearchOptions | None = None,
              resume_command: str = "python -m tuning.grid --resume") -> StageResult:
    """`tuning.grid`: the grid, then (with --search-trials) a search started from its best, then one final."""
    if then_search is not None:  # a study-name clash is found now, not after hours of grid
        search_stage.check_study_is_new(then_search)
    chain = Chain(then_search, opts.final, opts.cluster.max_concurrent)
    return _command(opts, lambda ctx: _continue_chain(ctx, new_grid_run(ctx, inputs, chain), inputs, chain),
                    resume_command)


def resume_grid(opts: CommonOptions, asked: GridInputs, asked_search: SearchOptions | None, given: dict[str, str],
                resume_command: str = "python -m tuning.grid --resume") -> StageResult:
    """`tuning.grid --resume`: the latest unfinished grid chain, continued at the stage where it stopped.

    Its inputs and chain are those it started with; `given` flags (flag -> key) must agree with them.
    """
    def body(ctx: StageContext) -> StageResult:
        runs = ctx.client.search_runs([ctx.experiment_id], f"tags.`{N.TAG_STAGE}` = '{N.STAGE_GRID}'",
                                      max_results=50, order_by=["attributes.start_time DESC"])
        run = next((r for r in runs if not resume.stage_done(r)), None)
        if run is None:
            raise UserError(f"--resume: no interrupted grid in experiment {ctx.tracking.experiment!r}")
        run_id, tags = run.info.run_id, run.data.tags
        started = {"inputs": json.loads(tags.get(N.TAG_STAGE_INPUTS) or "{}"), "chain": json.loads(tags.get(N.TAG_CHAIN) or "{}")}
        if not started["inputs"] or not started["chain"]:
            raise UserError(f"--resume: grid run {run_id} was started by an older version that cannot be resumed; run the grid again")
        chain = Chain.from_dict(started["chain"])
        resume.check_unchanged(run_id, started, {"inputs": asked.to_dict(), "chain": Chain(asked_search, opts.final, opts.cluster.max_concurrent).to_dict()}, given)
        resume.check_can_continue(ctx, run, "grid")
        print(f"resuming grid run {run_id} ({run.info.status.lower()})")
        return _continue_chain(ctx, run_id, GridInputs.from_dict(started["inputs"]), chain, restore=True)

    return _command(opts, body, resume_command)


def _continue_chain(ctx: StageContext, grid_run_id: str, inputs: GridInputs, chain: Chain, restore: bool = False) -> StageResult:
    """The grid chain from wherever it is: each stage runs unless it finished before (on a --resume)."""
    run = ctx.client.get_run(grid_run_id)
    if restore and run.info.status == N.RunStatus.FINISHED:
        result = _finished_stage(ctx, run)
    else:
        result = grid(ctx, inputs, grid_run_id, run.data.tags[N.TAG_TUNE_PATH] if restore else None,
                      then_text(chain.search, chain.final))
    if chain.search is not None:
        found = latest_stage_run(ctx.client, ctx.experiment_id, N.STAGE_SEARCH, f"tags.`{N.TAG_CHAINED_FROM}` = '{grid_run_id}'")
        then = then_text(None, chain.final)
        if found is None:
            result = search(ctx, chain.search, result.best.config, chained_from=grid_run_id, then=then)
        elif found.info.status == N.RunStatus.FINISHED:
            result = _finished_stage(ctx, found)
        else:
            options = dataclasses.replace(chain.search, resume=True, study_name=found.data.tags[N.TAG_STUDY])
            result = search(ctx, options, None, chained_from=grid_run_id, then=then)
    done = restore and _final_done(ctx, result.parent_run_id)
    if chain.final.enabled and not done:
        final(ctx, chain.final, result.parent_run_id, result.best.config, result.best.run_id, result.trials)
    elif chain.final.enabled and chain.final.promote and isinstance(done, ModelVersion):  # adopted: promote it now
        promote_version(ctx, done)
    set_tags(ctx.client, grid_run_id, {N.TAG_CHAIN_DONE: "true"})
    return result


def _finished_stage(ctx: StageContext, run) -> StageResult:
    """A stage that finished in an earlier command: its recorded best, for the stages after it."""
    tags = run.data.tags
    print(f"{tags[N.TAG_STAGE]} run {run.info.run_id} finished before: its best is kept")
    best = TrialRow("", read_best_config(ctx.client, run.info.run_id), N.Outcome.COMPLETED,
                    run_id=tags.get(N.TAG_BEST_TRIAL_RUN) or None)
    return StageResult(tags[N.TAG_STAGE], run.info.run_id, [best], best, tags.get(N.TAG_STUDY))


def _final_done(ctx: StageContext, source_run_id: str) -> bool | ModelVersion:
    """Whether the final stage of `source_run_id` is done: a FINISHED final run, or one whose driver died
    after it registered its model (the version exists, only the run's end was not written), which is
    adopted (marked FINISHED, said in one line) rather than retrained into a second version; then the
    adopted version is returned (its promotion, if asked, had not happened)."""
    query = f"tags.`{N.TAG_PARENT}` = '{source_run_id}' and tags.`{N.TAG_STAGE}` = '{N.STAGE_FINAL}'"
    runs = ctx.client.search_runs([ctx.experiment_id], query, max_results=20)
    if any(r.info.status == N.RunStatus.FINISHED for r in runs):
        return True
    for run in runs:
        versions = [v for v in versions_of_run(ctx.client, run.info.run_id) if v.status == "READY"]
        if versions:
            set_tags(ctx.client, run.info.run_id, {N.TAG_OUTCOME: N.Outcome.COMPLETED})
            ctx.client.set_terminated(run.info.run_id, N.RunStatus.FINISHED)
            print(f"final run {run.info.run_id} ({run.info.status.lower()}) had registered {versions[0].name} version "
                  f"{versions[0].version} before its driver stopped: adopted, not retrained")
            return versions[0]
    return False


def tune_search(opts: CommonOptions, options: SearchOptions, resume_command: str = "python -m tuning.search --resume") -> StageResult:
    """`tuning.search`: a search (new, started from a stage's best, or resumed), then one final."""
    def body(ctx: StageContext) -> StageResult:
        result = search(ctx, options, start_config(ctx, options.start_from) if options.start_from else None,
                        then=then_text(None, opts.final))
        if opts.final.enabled:
            try:
                final(ctx, opts.final, result.parent_run_id, result.best.config, result.best.run_id, result.trials)
            except KeyboardInterrupt as exc:  # the search is done: only the final stage is left
                raise KeyboardInterrupt(f"{exc or 'interrupted'}; continue with: python -m tuning.final "
                                        f"--run-id {result.parent_run_id}") from None
        return result

    return _command(opts, body, resume_command, f"; optuna-dashboard {options.storage_url}")


def _command(opts: CommonOptions, body: Callable[[StageContext], StageResult], resume_command: str,
             inspect: str = "") -> StageResult:
    """A tuning command: the session, its stages, the closing lines; Ctrl-C says what continues it."""
    t0 = time.perf_counter()
    try:
        with session(opts, continue_with=resume_command) as ctx:
            result = body(ctx)
    except KeyboardInterrupt as exc:
        text = str(exc) or "interrupted"
        raise KeyboardInterrupt(text if "continue with:" in text else f"{text}; continue with: {resume_command}") from None
    except StoreUnavailable as exc:  # exit 2: the user's store to fix, then the same command goes on
        raise StoreUnavailable(f"{exc}; once the store takes writes again, continue with: {resume_command}") from None
    except Exception as exc:  # a full disk under the store, the artifacts or Tune's folder: the same
        refused, silent = storage_error(exc), unreachable(exc)
        if refused is not None:
            raise StoreUnavailable(f"storage refused a write ({refused}); once there is room, continue with: "
                                   f"{resume_command}") from None
        if silent is not None:
            raise StoreUnavailable(f"the MLflow server {opts.tracking.uri} stopped answering ({silent}); once it "
                                   f"is back, continue with: {resume_command}") from None
        raise
    _closing_lines(opts, t0, f"{result.stage} run {result.parent_run_id}", ctx.experiment_id, inspect)
    return result


def _closing_lines(opts: CommonOptions, t0: float, what: str, experiment_id: str, inspect: str = "") -> None:
    """Every command's last lines: its wall time and run, how to look at it, the link to its training runs."""
    print(f"wall time {time.perf_counter() - t0:.0f} s; {what}")
    print(f"inspect: {report.mlflow_ui_command(opts.tracking.uri)}{inspect}")
    server = opts.tracking.uri if opts.tracking.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    print(f"training runs: {describe.experiment_url(server, experiment_id)}")


def retrain(opts: CommonOptions, source_run_id: str) -> FinalResult:
    """`tuning.final`: the final stage and registration for a finished grid or search run."""
    client = client_for(opts.tracking.uri)
    try:
        source = client.get_run(source_run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own error types for unknown ids
        raise UserError(f"no run {source_run_id!r} in {opts.tracking.uri}: {first_line(exc)}") from None
    best = read_best_config(client, source_run_id)
    t0 = time.perf_counter()
    with session(opts, with_ray=False, experiment_id=source.info.experiment_id) as ctx:  # beside its source run
        result, _ = final(ctx, opts.final, source_run_id, best, source.data.tags.get(N.TAG_BEST_TRIAL_RUN) or None)
    _closing_lines(opts, t0, f"final run {result.run_id}", source.info.experiment_id)
    return result


def start_config(ctx: StageContext, start_from: str) -> dict[str, Any]:
    """The best configuration of a grid or search run (or of the latest finished grid)."""
    if start_from == LATEST_GRID:
        run = latest_stage_run(ctx.client, ctx.experiment_id, N.STAGE_GRID, statuses=(N.RunStatus.FINISHED,))
        if run is None:
            raise UserError(f"--start-from {LATEST_GRID}: no finished grid run in experiment {ctx.tracking.experiment!r}")
        start_from = run.info.run_id
    try:
        return read_best_config(ctx.client, start_from)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unknown id
        raise UserError(f"--start-from {start_from!r}: {first_line(exc)}") from None
