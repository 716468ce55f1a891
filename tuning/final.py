"""`python -m tuning.final`: the final stage (retrain, evaluate on test) and registration, on their own,
for a finished grid or search run (its `best_config` tag).

    python -m tuning.final --run-id PARENT_RUN_ID [--final-epochs 15] [--data PATH] ...
    python -m tuning.final --run-id PARENT_RUN_ID --ensemble 3   # the 3 best trials, retrained and averaged
"""

from __future__ import annotations

import sys
from typing import Sequence

from fer_model.cli import Parser, run_cli
from tuning import options


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.final", description="Retrain, evaluate and register the best configuration of a finished grid or search run.")
    p.add_argument("--run-id", required=True, help="the grid or search parent run")
    options.add_data_flags(p)
    options.add_tracking_flags(p, experiment=False)  # the final run goes beside its source run
    options.add_final_flags(p, optional=False)
    return p


def command_options(args) -> options.CommonOptions:
    """The validated flags (no cluster: the final stage trains in this process)."""
    return options.CommonOptions(options.data_config(args), options.tracking_options(args), options.ClusterOptions(),
                               options.final_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = command_options(args)
    # here, not at the top: importing it takes 3.5 s (Ray, MLflow, torch); --help and a bad flag 0.14 s
    from tuning import pipeline

    pipeline.retrain(opts, args.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
