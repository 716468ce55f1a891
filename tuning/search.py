"""`python -m tuning.search`: Optuna (TPE, through Ray Tune's OptunaSearch) over batch size, optimizer,
lr, dropout and weight decay, with ASHA early stopping, a resumable study, and its plots in MLflow.

    python -m tuning.search --data PATH --trials 30
    python -m tuning.search --data PATH --start-from latest-grid   # first trial: the latest grid's best
    python -m tuning.search --data PATH --resume                   # continue the latest interrupted search
    optuna-dashboard sqlite:///$PWD/optuna.db                      # watch the study live
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from fer_model.cli import Parser, run_cli
from tuning import options


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.search",
               description="Optuna search over batch size, optimizer, lr, dropout and weight decay on Ray Tune, tracked in MLflow.")
    options.add_search_flags(p)
    p.add_argument("--seed", type=int, help="training seed of every trial (default 0)")
    options.add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = options.common_options(args, trial_epochs=options.search_epochs(args))
    options.keep_local_ray_on_loopback(opts.cluster)  # before ray is imported
    search = options.search_options(args, opts.tracking.uri, train_seed=args.seed or 0)
    # here, not at the top: importing it takes 3.5 s (Ray, MLflow, torch); --help and a bad flag 0.14 s
    from tuning import pipeline

    # Ctrl-C or a crash: the same command with --resume continues it (a resumed search keeps its start).
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--start-from" in argv:
        i = argv.index("--start-from")
        del argv[i:i + 2]
    again = shlex.join(["python", "-m", "tuning.search", *argv, *([] if search.resume else ["--resume"])])
    pipeline.tune_search(opts, search, again)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
