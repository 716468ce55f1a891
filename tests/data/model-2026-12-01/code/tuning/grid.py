"""`python -m tuning.grid`: the study's dropout x learning-rate grid as Ray Tune trials, tracked in MLflow.

    python -m tuning.grid --quick --data ../shared/data/fer2013/fer2013-msambare.tar.gz
    python -m tuning.grid --data PATH                      # the study's full protocol
    python -m tuning.grid --data PATH --search-trials 30   # grid, then the Optuna search, then one final
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING, Sequence

from fer_model.cli import Parser, given, run_cli
from fer_model.config import OPTIMIZERS
from fer_model.errors import ConfigError
from tuning import flags
from tuning.spaces import GRID_FIXED, STUDY_GRID

if TYPE_CHECKING:
    from tuning.stages.grid import GridInputs

# `--quick`: the whole pipeline (9 trials, final stage, registration) in a few minutes on 2 CPU cores.
# 2 epochs of 2,160 training images (135 steps) is about the least in which the study's pattern still
# shows: lr 1e-3 starts to learn (28.7% validation) while lr 1e-2 collapses to the majority class
# (25.0%); 2 epochs of 720 images leave all nine at 25.0% (benchmarks/RESULTS.md, "--quick").
QUICK = {"max_samples": 3000, "epochs": 2, "final_epochs": 2}
FIXED_FLAGS = ("batch_size", "optimizer", "epochs", "schedule", "seed")
CHAIN_FLAGS = ("search_epochs", "search_scheduler", "search_grace_period", "search_reduction_factor", "space",
               "time_budget", "optuna_storage", "study_name", "search_seed")  # the search after the grid
# What a resumed grid keeps: argparse dest -> (flag, key in its stored inputs and chain).
RESUME_KEYS = {
    **{d: (f"--{d.replace('_', '-')}", f"inputs.fixed.{d}") for d in FIXED_FLAGS},
    "dropouts": ("--dropouts", "inputs.dropouts"), "lrs": ("--lrs", "inputs.lrs"),
    "grid_scheduler": ("--scheduler", "inputs.scheduler.kind"),
    "grid_grace_period": ("--grace-period", "inputs.scheduler.grace_period"),
    "grid_reduction_factor": ("--reduction-factor", "inputs.scheduler.reduction_factor"),
    "search_trials": ("--search-trials", "chain.search.trials"),
    **{d: (f"--{d.replace('_', '-')}", f"chain.search.{k}") for d, k in (
        ("search_epochs", "epochs"), ("space", "space"), ("time_budget", "time_budget"),
        ("optuna_storage", "storage_url"), ("study_name", "study_name"), ("search_seed", "sampler_seed"),
        ("search_scheduler", "scheduler.kind"), ("search_grace_period", "scheduler.grace_period"),
        ("search_reduction_factor", "scheduler.reduction_factor"))},
    "final_epochs": ("--final-epochs", "chain.final.epochs"), "no_final": ("--no-final", "chain.final.enabled"),
    "device": ("--device", "chain.final.device"), "promote": ("--promote", "chain.final.promote"),
    "tta": ("--tta", "chain.final.tta"), "ensemble": ("--ensemble", "chain.final.ensemble"),
    "max_concurrent": ("--max-concurrent", "chain.max_concurrent")}


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.grid", description="The study's grid (dropout x lr) on Ray Tune, tracked in MLflow, then a final retrain.")
    g = p.add_argument_group("grid")
    dropouts, lrs = (",".join(f"{v:g}" for v in STUDY_GRID[k]) for k in ("dropout", "lr"))
    g.add_argument("--dropouts", help=f"comma-separated dropout values (default {dropouts})")
    g.add_argument("--lrs", help=f"comma-separated learning rates (default {lrs})")
    g.add_argument("--batch-size", type=int, help=f"batch size (default {GRID_FIXED['batch_size']})")
    g.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default {GRID_FIXED['optimizer']})")
    g.add_argument("--epochs", type=int, help=f"epochs per trial (default {GRID_FIXED['epochs']})")
    g.add_argument("--schedule", help=f"lr schedule (default {GRID_FIXED['schedule']}, the study's StepLR(7, 0.1))")
    g.add_argument("--seed", type=int, help="training seed of every trial (default 0)")
    flags.add_scheduler_flags(g, "", "grid_", "none", "grid")
    g.add_argument("--quick", action="store_true",
                   help=f"a small, fast run of the whole pipeline ({', '.join(f'{k}={v}' for k, v in QUICK.items())}; flags override)")
    g.add_argument("--search-trials", type=int,
                   help="then run this many Optuna search trials started from the grid's best, and one final stage")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the latest interrupted grid (and its search and final stage) where it stopped; "
                        "flags given again must have the values it started with")
    flags.add_search_flags(p, in_grid=True)
    flags.add_common_flags(p)
    return p


def grid_inputs(args: argparse.Namespace) -> "GridInputs":
    """The grid the parsed flags ask for (after --quick's preset is applied)."""
    from tuning.stages.grid import GridInputs  # after the flags: --help and bad flags answer at once

    fixed = {**GRID_FIXED, "seed": 0, **given(args, FIXED_FLAGS)}
    return GridInputs(fixed, flags.floats(args.dropouts) if args.dropouts else list(STUDY_GRID["dropout"]),
                      flags.floats(args.lrs) if args.lrs else list(STUDY_GRID["lr"]),
                      flags.scheduler_settings(args, "grid_", "none"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        flags.apply_preset(args, QUICK)
    opts = flags.common_options(args, trial_epochs=args.epochs or GRID_FIXED["epochs"])
    flags.keep_local_ray_on_loopback(opts.cluster)  # before ray is imported
    inputs = grid_inputs(args)
    fixed = inputs.fixed
    then = None
    chain = [f"--{d.replace('_', '-')}" for d in CHAIN_FLAGS if getattr(args, d) is not None]
    if chain and args.search_trials is None:
        raise ConfigError(f"{', '.join(chain)} only apply with --search-trials")
    if args.search_trials is not None:
        if args.search_trials < 1:
            raise ConfigError(f"--search-trials must be >= 1, got {args.search_trials}")
        then = flags.search_options(args, opts.tracking.uri, trials=args.search_trials, train_seed=fixed["seed"])
    from tuning import pipeline
    from tuning.resume import given_flags

    # Ctrl-C or a crash: the same command with --resume continues it (same values are accepted).
    argv = list(sys.argv[1:] if argv is None else argv)
    again = shlex.join(["python", "-m", "tuning.grid", *argv, *([] if args.resume else ["--resume"])])
    if args.resume:
        pipeline.resume_grid(opts, inputs, then, given_flags(args, RESUME_KEYS), again)
    else:
        pipeline.tune_grid(opts, inputs, then, again)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
