"""`python -m tuning.promote`: move the `champion` alias to a better registered version, or roll it back.

    python -m tuning.promote                      # the newest version of fer2013-cnn, if it beats the champion
    python -m tuning.promote --version 3 --dry-run
    python -m tuning.promote --rollback           # champion back to the version it replaced

Exit codes: 0 the alias moved (or, with --dry-run, would move; or a rollback was done);
2 a user error (bad flag, unknown model or version, unreachable store, an alias other commands
  kept moving meanwhile; one line on stderr);
3 not promoted: the candidate is not better by more than --min-delta, already holds the alias,
  was scored on other test data, or comes from a run that is not FINISHED (killed, failed, still
  running) (a decision, not an error; one line says why).

Two promotions of one model at once take turns on a sqlite store; on a tracking server the alias is
moved by compare-and-set, and the loser is decided again against the new champion.

By default each version is measured on what it serves: a version registered with test-time
augmentation (its ``tta`` tag flip or tencrop) by its test accuracy with it (test_acc_tta), any other by
test_acc; the decision line names the number compared for each. --metric compares that metric of both.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fer_model.cli import Parser, run_cli
from fer_model.errors import ConfigError
from tuning import options

EXIT_CODES = __doc__[__doc__.index("Exit codes"):]


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.promote", description="Guarded promotion of a registered model version to an alias.",
               epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", help="the candidate version (default: the newest)")
    p.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    p.add_argument("--metric", default=None,
                   help="a metric of the versions' final runs; higher is better unless it ends in _loss (default: what each "
                        "serves: test_acc_tta for a version registered with --tta flip or tencrop, else test_acc)")
    p.add_argument("--min-delta", type=float, default=0.0, help="the candidate must be better by more than this (default 0)")
    p.add_argument("--force", action="store_true", help="promote even if not better, scored on other test data, or from a run that did not finish")
    p.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")
    p.add_argument("--rollback", action="store_true", help="give the alias back to the version it replaced (its previous alias)")
    options.add_tracking_flags(p, experiment=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.min_delta < 0:
        raise ConfigError(f"--min-delta must be >= 0, got {args.min_delta}")
    if args.rollback and (args.version or args.force or args.min_delta):
        raise ConfigError("--rollback takes no --version, --force or --min-delta")
    tracking = options.tracking_options(args)
    from tuning.registry import promotion  # MLflow: 1.3 s to import, after the flags are checked
    from tuning.tracking.store import client_for

    promotion.check_alias(args.alias)
    client = client_for(tracking.uri)
    if args.rollback:
        was, now = promotion.rollback(client, tracking.model_name, args.alias, args.dry_run)
        verb = "would move" if args.dry_run else "moved"
        print(f"{tracking.model_name}: {args.alias} {verb} from version {was} back to version {now}")
        return 0
    req = promotion.PromotionRequest(tracking.model_name, args.version, args.alias, args.metric, args.min_delta,
                                    args.force, args.dry_run)
    decision = promotion.promote(client, req)
    print(f"{tracking.model_name}: {decision.describe(req)}")
    return 0 if decision.promote else promotion.NOT_PROMOTED


if __name__ == "__main__":
    sys.exit(run_cli(main))
