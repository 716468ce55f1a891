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
from tuning import options
from tuning.names import values_text
from tuning.spaces import GRID_FIXED, STUDY_GRID

if TYPE_CHECKING:
    from tuning.stages.grid import GridInputs

# `--quick`: the whole pipeline (9 trials, final stage, registration) in a few minutes on 2 CPU cores.
# 2 epochs of 2,160 training images (135 steps) is about the least in which the study's pattern still
# shows: lr 1e-3 starts to learn (28.7% validation) while lr 1e-2 collapses to the majority class
# (25.0%); 2 epochs of 720 images leave all nine at 25.0% (benchmarks/RESULTS.md, "--quick").
QUICK = {"max_samples": 3000, "epochs": 2, "final_epochs": 2}
FIXED_FLAGS = ("batch_size", "optimizer", "epochs", "schedule", "seed")
# What a resumed grid keeps: argparse dest -> (flag, key in its stored inputs and chain).
RESUME_KEYS = {
    **{d: (f"--{d.replace('_', '-')}", f"inputs.fixed.{d}") for d in FIXED_FLAGS},
    "dropouts": ("--dropouts", "inputs.dropouts"), "lrs": ("--lrs", "inputs.lrs"),
    **{f"grid_{dest}": (f"--{dest.replace('_', '-')}", f"inputs.scheduler.{key}") for dest, key in (
        ("scheduler", "kind"), ("grace_period", "grace_period"), ("reduction_factor", "reduction_factor"))},
    **options.search_resume_keys(in_grid=True),  # the search after the grid: declared on SearchOptions
    "final_epochs": ("--final-epochs", "chain.final.epochs"), "no_final": ("--no-final", "chain.final.enabled"),
    "device": ("--device", "chain.final.device"), "promote": ("--promote", "chain.final.promote"),
    "tta": ("--tta", "chain.final.tta"), "ensemble": ("--ensemble", "chain.final.ensemble"),
    "max_concurrent": ("--max-concurrent", "chain.max_concurrent")}


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.grid", description="The study's grid (dropout x lr) on Ray Tune, tracked in MLflow, then a final retrain.")
    g = p.add_argument_group("grid")
    dropouts, lrs = (values_text(STUDY_GRID[k]) for k in ("dropout", "lr"))
    g.add_argument("--dropouts", help=f"comma-separated dropout values (default {dropouts})")
    g.add_argument("--lrs", help=f"comma-separated learning rates (default {lrs})")
    g.add_argument("--batch-size", type=int, help=f"batch size (default {GRID_FIXED['batch_size']})")
    g.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default {GRID_FIXED['optimizer']})")
    g.add_argument("--epochs", type=int, help=f"epochs per trial (default {GRID_FIXED['epochs']})")
    g.add_argument("--schedule", help=f"lr schedule (default {GRID_FIXED['schedule']}, the study's StepLR(7, 0.1))")
    g.add_argument("--seed", type=int, help="training seed of every trial (default 0)")
    options.add_scheduler_flags(g, "", "grid_", "none", "grid")
    g.add_argument("--quick", action="store_true",
                   help=f"a small, fast run of the whole pipeline ({', '.join(f'{k}={v}' for k, v in QUICK.items())}; flags override)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the latest interrupted grid (and its search and final stage) where it stopped; "
                        "flags given again must have the values it started with")
    options.add_search_flags(p, in_grid=True)
    options.add_common_flags(p)
    return p


def grid_inputs(args: argparse.Namespace) -> "GridInputs":
    """The grid the parsed flags ask for (after --quick's preset is applied)."""
    from tuning.stages.grid import GridInputs  # imports Ray Tune (see main): after the flags

    fixed = {**GRID_FIXED, "seed": 0, **given(args, FIXED_FLAGS)}
    return GridInputs(fixed, options.floats(args.dropouts) if args.dropouts else list(STUDY_GRID["dropout"]),
                      options.floats(args.lrs) if args.lrs else list(STUDY_GRID["lr"]),
                      options.scheduler_settings(args, "grid_", "none"))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(the flags with --quick's preset filled in where not given, the flags as typed)."""
    parser = build_parser()
    typed = args = parser.parse_args(argv)
    if typed.quick:
        parser.set_defaults(**QUICK)  # given flags win
        args = parser.parse_args(argv)
    return args, typed


def main(argv: Sequence[str] | None = None) -> int:
    args, typed = parse_args(argv)
    opts = options.common_options(args, trial_epochs=args.epochs or GRID_FIXED["epochs"], typed=typed)
    options.keep_local_ray_on_loopback(opts.cluster)  # before ray is imported
    inputs = grid_inputs(args)
    fixed = inputs.fixed
    then = None
    chain = [options.search_resume_keys(in_grid=True)[d][0] for d in options.CHAIN_DESTS if getattr(args, d) is not None]
    if chain and args.search_trials is None:
        raise ConfigError(f"{', '.join(chain)} only apply with --search-trials")
    if args.search_trials is not None:
        then = options.search_options(args, opts.tracking.uri, train_seed=fixed["seed"], in_grid=True)
    # here, not at the top: importing it takes 3.5 s (Ray, MLflow, torch); --help and a bad flag 0.14 s
    from tuning import pipeline

    # Ctrl-C or a crash: the same command with --resume continues it (same values are accepted).
    argv = list(sys.argv[1:] if argv is None else argv)
    again = shlex.join(["python", "-m", "tuning.grid", *argv, *([] if args.resume else ["--resume"])])
    if args.resume:
        pipeline.resume_grid(opts, inputs, then, options.given_flags(args, RESUME_KEYS), again)
    else:
        pipeline.tune_grid(opts, inputs, then, again)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
