"""`python -m tuning.grid`: the study's dropout x learning-rate grid as Ray Tune trials, tracked in MLflow.

    python -m tuning.grid --quick --data ../shared/data/fer2013/fer2013-msambare.tar.gz
    python -m tuning.grid --data PATH                      # the study's full protocol
    python -m tuning.grid --data PATH --search-trials 30   # grid, then the Optuna search, then one final
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from fer_model import data as fdata
from fer_model.cli import Parser, run_cli
from fer_model.errors import ConfigError
from fer_model.training import OPTIMIZERS, TrainConfig
from tuning import names as N
from tuning import report
from tuning.final import final_stage
from tuning.options import add_common_flags, apply_preset, common_options
from tuning.runner import best_row, make_scheduler, ray_session, run_trials
from tuning.spaces import GRID_FIXED, STUDY_GRID
from tuning.tracking import client_for, ensure_experiment, log_files, record_best, stage_run
from tuning.trainable import TrialSetup

# `--quick`: the whole pipeline (9 trials, final stage, registration) in a few minutes on 2 CPU cores.
QUICK = {"max_samples": 3000, "epochs": 4, "final_epochs": 4}


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError("expected at least one value")
    return values


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.grid", description="The study's grid (dropout x lr) on Ray Tune, tracked in MLflow, then a final retrain.")
    g = p.add_argument_group("grid")
    dropouts, lrs = (",".join(f"{v:g}" for v in STUDY_GRID[k]) for k in ("dropout", "lr"))
    g.add_argument("--dropouts", default=dropouts, help=f"comma-separated dropout values (default {dropouts})")
    g.add_argument("--lrs", default=lrs, help=f"comma-separated learning rates (default {lrs})")
    g.add_argument("--batch-size", type=int, help=f"batch size (default {GRID_FIXED['batch_size']})")
    g.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default {GRID_FIXED['optimizer']})")
    g.add_argument("--epochs", type=int, help=f"epochs per trial (default {GRID_FIXED['epochs']})")
    g.add_argument("--schedule", help=f"lr schedule (default {GRID_FIXED['schedule']}, the study's StepLR(7, 0.1))")
    g.add_argument("--seed", type=int, default=0, help="training seed of every trial (default 0)")
    g.add_argument("--scheduler", choices=["none", "asha"], default="none",
                   help="asha: stop poor trials early (default none: the study's full table)")
    g.add_argument("--quick", action="store_true",
                   help=f"a small, fast run of the whole pipeline ({', '.join(f'{k}={v}' for k, v in QUICK.items())}; flags override)")
    g.add_argument("--search-trials", type=int, default=0,
                   help="then run this many Optuna search trials seeded by the grid's best, and one final stage")
    from tuning.search import add_search_flags

    add_search_flags(p, for_grid=True)
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        raise ConfigError("the grid has no --resume; continue an interrupted search with python -m tuning.search --resume")
    if args.quick:
        apply_preset(args, QUICK)
    opts = common_options(args)
    fixed = dict(GRID_FIXED, seed=args.seed)
    fixed.update({k: getattr(args, k) for k in ("batch_size", "optimizer", "epochs", "schedule") if getattr(args, k) is not None})
    dropouts, lrs = _floats(args.dropouts), _floats(args.lrs)
    for d in dropouts:  # every grid point must be a valid config before Ray starts
        for lr in lrs:
            TrainConfig.from_dict({**fixed, "dropout": d, "lr": lr})
    search = None
    if args.search_trials:
        from tuning.search import search_settings

        search = search_settings(args, opts, trials=args.search_trials)

    t_start = time.perf_counter()
    data = fdata.load(opts.data)
    print(f"data: {fdata.describe(data)}")
    client = client_for(opts.tracking_uri)
    experiment_id = ensure_experiment(client, opts.experiment)
    params = {**{k: v for k, v in fixed.items()}, "dropouts": args.dropouts, "lrs": args.lrs,
              "scheduler": args.scheduler, **data.sizes(), "data_fingerprint": data.fingerprint[:16]}
    with ray_session(opts):
        with stage_run(client, experiment_id, "grid", {N.TAG_STAGE: N.STAGE_GRID}, params) as parent:
            setup = TrialSetup(opts.tracking_uri, experiment_id, parent, opts.cpus_per_trial)
            from ray import tune

            space = {**fixed, "dropout": tune.grid_search(dropouts), "lr": tune.grid_search(lrs)}
            rows = run_trials(opts, data, setup, f"grid-{parent[:8]}", space,
                              scheduler=make_scheduler(args.scheduler, fixed["epochs"], args.grace_period,
                                                       args.reduction_factor))
            best = best_row(rows)
            with tempfile.TemporaryDirectory() as d:
                files = [report.write_table(rows, Path(d) / "grid_results.csv"),
                         report.plot_grid_heatmap(rows, dropouts, lrs, Path(d) / "val_acc_heatmap.png"),
                         report.plot_all_learning_curves(rows, Path(d) / "learning_curves.png")]
                log_files(client, parent, files)
            record_best(client, parent, best.config, best.run_id)
            print("\nvalidation accuracy after each trial (the study's test accuracy in brackets):")
            print(report.grid_text(rows, dropouts, lrs))
            print(f"best: dropout {best.config['dropout']:g}, lr {best.config['lr']:g}: val {100 * best.val_acc:.2f}% "
                  f"(trial {best.trial_id}, run {best.run_id})")
            final_from = (parent, best.config, best.run_id)
        if search is not None:
            from tuning.search import run_search

            outcome = run_search(search, opts, data, client, experiment_id, seed_config=best.config)
            final_from = (outcome.parent_run_id, outcome.best.config, outcome.best.run_id)
        final_stage(opts, data, experiment_id, *final_from)
    print(f"wall time {time.perf_counter() - t_start:.0f} s; grid run {parent}")
    print(f"inspect: {report.mlflow_ui_command(opts.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
