"""The Model Registry: guarded promotion of a version to an alias (`champion`), and rollback.

A candidate takes the alias only when it beats the version holding it by more than a margin, on what
each serves: by default its test accuracy as it answers, with the test-time augmentation it was
registered with (its ``tta`` tag: ``test_acc_tta`` for flip or tencrop, else ``test_acc``); with an
explicit metric, that metric of both final runs, and only when both were scored on the same test data (the
``data_fingerprint`` and ``test_size`` tags every registered version carries). The version that loses
the alias gets the ``previous`` alias; a rollback gives the alias back to it. Every decision is
recorded as tags on the versions, so the history shows on the model's page in the MLflow UI.
Aliases only: MLflow's stages are deprecated.

Two promotions at once must not both win: on a sqlite store they take turns (a file lock beside the
database, per model); on any store the alias is moved by compare-and-set (read it, set it, read it
back), and a decision is recorded only once the alias it claims has held. A version whose training
did not finish (its run is not FINISHED) is refused without --force.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from fer_model.errors import UserError, first_line
from tuning import names as N
from tuning.tracking.store import file_lock, sqlite_path

CHAMPION = "champion"
NOT_PROMOTED = 3  # exit code: a decision, not an error
FINISHED = N.RunStatus.FINISHED  # the only run status whose model is the whole training's
SWAP_TRIES = 5  # compare-and-set rounds before giving up on an alias other commands keep moving

# Tags a decision leaves on the candidate version.
TAG_DECISION = "promotion_decision"
TAG_DECIDED_AT = "promotion_decided_at"
TAG_REPLACED = "promotion_replaced_version"
TAG_ROLLED_BACK = "rolled_back_at"


def previous_alias(alias: str) -> str:
    """Where the version that loses `alias` goes: ``previous`` for the champion, else ``<alias>-previous``."""
    return "previous" if alias == CHAMPION else f"{alias}-previous"


def higher_is_better(metric: str) -> bool:
    return not metric.endswith("_loss")


def serving_tta(version) -> str:
    """The test-time augmentation `version` answers with (its ``tta`` tag): ``none`` when it has none."""
    return (version.tags.get(N.TAG_TTA) or "none").strip() or "none"


def serving_metric(version) -> str:
    """What `version` serves, as a metric of its final run: ``test_acc_tta`` when it was registered
    with test-time augmentation, else ``test_acc``."""
    return M.TEST_ACC if serving_tta(version) == "none" else M.TEST_ACC_TTA


@dataclass(frozen=True)
class PromotionRequest:
    model_name: str
    version: str | None = None  # None: the newest version
    alias: str = CHAMPION
    metric: str | None = None  # None: each version's serving accuracy (`serving_metric`); else this metric of both
    min_delta: float = 0.0
    force: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Decision:
    """What promotion decided, and why (one line)."""

    promote: bool
    candidate: str
    incumbent: str | None
    candidate_value: float | None  # None: a refused candidate whose run has no such metric
    incumbent_value: float | None
    reason: str
    # Which number was compared for each: the metric's name and, when it is the serving accuracy of a
    # version that answers with test-time augmentation, that augmentation ("" otherwise).
    candidate_metric: str = M.TEST_ACC
    incumbent_metric: str = M.TEST_ACC
    candidate_tta: str = ""
    incumbent_tta: str = ""

    def describe(self, req: PromotionRequest) -> str:
        """One line: the number compared for each version, where the alias goes, and why."""
        ours = f"version {self.candidate} " + (
            f"{self.candidate_metric} {self.candidate_value:.4f}{_serves(self.candidate_tta)}"
            if self.candidate_value is not None else f"(no {self.candidate_metric})")
        theirs = (f"{req.alias} version {self.incumbent} {self.incumbent_metric} {self.incumbent_value:.4f}"
                  f"{_serves(self.incumbent_tta)}" if self.incumbent is not None else f"no {req.alias} yet")
        verb = ("would move" if req.dry_run else "moved") if self.promote else ("would stay" if req.dry_run else "stays")
        where = (f"{req.alias} {verb} to version {self.candidate}" if self.promote
                 else f"{req.alias} {verb} unset" if self.incumbent is None
                 else f"{req.alias} {verb} with version {self.incumbent}")
        return f"{ours}; {theirs}: {where} ({self.reason})"


def _serves(tta: str) -> str:
    return f" (serves with {tta})" if tta else ""


def _version(client: MlflowClient, name: str, version: str | None):
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception as exc:  # noqa: BLE001 - unknown model or version
        raise UserError(f"model {name!r} version {version}: {first_line(exc)}") from None
    if not versions:
        raise UserError(f"no registered model {name!r}: run python -m tuning.grid (or tuning.final) first")
    return max(versions, key=lambda v: int(v.version))


def _holder(client: MlflowClient, name: str, alias: str):
    """The version holding `alias`, or None when the alias is unset (any other failure is an error:
    a server blip must never read as "no champion yet")."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "alias" in str(exc).lower():
            return None
        raise UserError(f"model {name!r} alias {alias!r}: {first_line(exc)}") from None


def _run_of(client: MlflowClient, version):
    """The final run that produced `version`."""
    try:
        return client.get_run(version.run_id)
    except Exception as exc:  # noqa: BLE001 - a deleted run, or a version registered without one
        raise UserError(f"version {version.version}: its run {version.run_id!r} cannot be read: {first_line(exc)}") from None


def metric_of(client: MlflowClient, version, metric: str, run=None) -> float:
    """`metric` of the final run that produced `version` (`run`, when already read); ``test_acc_tta``
    falls back on the version's tag of that name (4 decimals) when the run lacks it."""
    metrics = (run or _run_of(client, version)).data.metrics
    if metric not in metrics and metric == M.TEST_ACC_TTA and version.tags.get(M.TEST_ACC_TTA):
        try:
            return float(version.tags[M.TEST_ACC_TTA])
        except ValueError:
            pass
    if metric not in metrics:
        raise UserError(f"version {version.version}'s run {version.run_id} has no metric {metric!r} "
                        f"(it has: {', '.join(sorted(metrics))})")
    return float(metrics[metric])


def _compared(version, req: PromotionRequest) -> tuple[str, str]:
    """The metric compared for `version`, and the TTA it serves with when that is why ("" otherwise)."""
    if req.metric is not None:
        return req.metric, ""
    metric = serving_metric(version)
    return metric, (serving_tta(version) if metric == M.TEST_ACC_TTA else "")


def decide(client: MlflowClient, req: PromotionRequest) -> Decision:
    """Compare the candidate with the alias holder; change nothing.

    Without `req.metric`, each is measured on what it serves (`serving_metric`): a version registered
    with --tta flip or tencrop by its test accuracy with it. A candidate whose run is not FINISHED
    (killed, failed, still running: a model of a training that did not end) is refused unless --force.
    """
    cand = _version(client, req.model_name, req.version)
    cand_v, run = str(cand.version), _run_of(client, cand)
    holder = _holder(client, req.model_name, req.alias)
    held_v = str(holder.version) if holder is not None else None
    cand_metric, cand_tta = _compared(cand, req)
    held_metric, held_tta = _compared(holder, req) if holder is not None else (cand_metric, "")
    theirs = metric_of(client, holder, held_metric) if holder is not None else None
    named = {"candidate_metric": cand_metric, "incumbent_metric": held_metric, "candidate_tta": cand_tta,
             "incumbent_tta": held_tta}

    def decision(promote_: bool, value: float | None, reason: str) -> Decision:
        return Decision(promote_, cand_v, held_v, value, theirs, reason, **named)

    unfinished = f"its run {run.info.run_id} is {run.info.status}, not FINISHED" if run.info.status != FINISHED else ""
    if unfinished and not req.force:
        return decision(False, run.data.metrics.get(cand_metric),
                        f"{unfinished}: its training did not end; --force to promote anyway")
    value = metric_of(client, cand, cand_metric, run)
    if holder is None:
        return decision(True, value,
                        f"the first {req.alias}" + (f"; --force: {unfinished}" if unfinished else ""))
    if held_v == cand_v:
        return decision(False, value, f"version {cand_v} already holds it")
    same_data = all(cand.tags.get(t) and cand.tags.get(t) == holder.tags.get(t) for t in (N.TAG_DATA_FINGERPRINT, N.TAG_TEST_SIZE))
    if not same_data and not req.force:
        return decision(False, value,
                        f"not comparable: scored on other test data (test size {cand.tags.get(N.TAG_TEST_SIZE, '?')} vs "
                        f"{holder.tags.get(N.TAG_TEST_SIZE, '?')}, fingerprints differ or are missing); --force to promote anyway")
    gain = (value - theirs) if higher_is_better(cand_metric) else (theirs - value)
    if req.force:
        return decision(True, value, "--force" + (f": {unfinished}" if unfinished else ""))
    if gain > req.min_delta:
        return decision(True, value, f"better by {gain:.4f} > {req.min_delta:g}")
    return decision(False, value, f"not better by more than {req.min_delta:g} (difference {gain:+.4f})")


def promote(client: MlflowClient, req: PromotionRequest) -> Decision:
    """Decide, then (unless a dry run) move the aliases and record the decision on the versions.

    One promotion of a model at a time per sqlite store (`promotion_lock`). The alias moves by
    compare-and-set (`_swap`); when another command moved it meanwhile (possible on a tracking
    server, which has no lock), the candidate is decided again against the new holder. After
    `SWAP_TRIES` such rounds it gives up with a user error, having recorded nothing.
    """
    if req.dry_run:
        return decide(client, req)
    with promotion_lock(client, req.model_name):
        moved = None  # the holder another command put there meanwhile
        for _ in range(SWAP_TRIES):
            decision = decide(client, req)
            if moved is not None:
                decision = replace(decision, reason=f"{decision.reason}; decided again: {req.alias} changed meanwhile "
                                                    f"(to version {moved})")
            moved = _swap(client, req, decision) if decision.promote else None
            if moved is None:
                _record(client, req, decision)
                return decision
    raise UserError(f"model {req.model_name!r}: {req.alias} kept changing while version {decision.candidate} was being "
                    f"promoted ({SWAP_TRIES} tries; other promotions running?): nothing recorded; run it again")


def _swap(client: MlflowClient, req: PromotionRequest, decision: Decision) -> str | None:
    """Move `req.alias` from `decision.incumbent` to the candidate, then the loser to the previous
    alias; None when that held, else the version found holding the alias ("none": unset).

    MLflow has no atomic compare-and-set: the alias is compared just before it is set and read back
    just after. What is left unguarded is the moment between the compare and the set (a local store
    closes it with `promotion_lock`).
    """
    def now_holding() -> str:
        held = _holder(client, req.model_name, req.alias)
        return str(held.version) if held is not None else "none"

    if now_holding() != (decision.incumbent or "none"):
        return now_holding()
    client.set_registered_model_alias(req.model_name, req.alias, decision.candidate)
    seen = now_holding()
    if seen != decision.candidate:
        return seen
    if decision.incumbent is not None:
        client.set_registered_model_alias(req.model_name, previous_alias(req.alias), decision.incumbent)
        client.set_model_version_tag(req.model_name, decision.candidate, TAG_REPLACED, decision.incumbent)
    return None


def _record(client: MlflowClient, req: PromotionRequest, decision: Decision) -> None:
    """The decision, as tags on the candidate: written after the aliases, so they say what happened."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = f"{'promoted to' if decision.promote else 'not promoted to'} {req.alias}: {decision.describe(req)}"
    for key, value in {TAG_DECISION: text, TAG_DECIDED_AT: now}.items():
        client.set_model_version_tag(req.model_name, decision.candidate, key, value)


@contextmanager
def promotion_lock(client: MlflowClient, model_name: str) -> Iterator[None]:
    """Hold ``<db>.promote-<model>.lock`` (an flock) when `client`'s registry is a sqlite file, so
    that promotions and rollbacks of one model on it take turns; a server's registry gets no lock
    (`_swap`'s compare-and-set is what guards it)."""
    db = sqlite_path(getattr(client, "_registry_uri", None) or client.tracking_uri)
    if db is None:
        yield
        return
    safe = re.sub(r"[^\w.-]", "_", model_name)  # a file name; two names sharing one only take turns
    with file_lock(Path(f"{db.resolve()}.promote-{safe}.lock")):
        yield


def check_alias(alias: str) -> None:
    """MLflow reserves ``latest`` and ``v<N>``; an alias is a name."""
    if not alias.strip() or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) or not re.fullmatch(r"[\w-]+", alias):
        raise UserError(f"--alias {alias!r} cannot be used: letters, digits, _ and -, and not 'latest' or 'v<number>'")


def rollback(client: MlflowClient, model_name: str, alias: str = CHAMPION, dry_run: bool = False) -> tuple[str, str]:
    """Give `alias` back to the version holding its previous alias; returns (from, to) versions."""
    with nullcontext() if dry_run else promotion_lock(client, model_name):  # not mid-way through a promotion
        return _rollback(client, model_name, alias, dry_run)


def _rollback(client: MlflowClient, model_name: str, alias: str, dry_run: bool) -> tuple[str, str]:
    back = _holder(client, model_name, previous_alias(alias))
    if back is None:
        raise UserError(f"--rollback: model {model_name!r} has no {previous_alias(alias)!r} version to go back to")
    now_holder = _holder(client, model_name, alias)
    current = str(now_holder.version) if now_holder else "none"
    if not dry_run:
        client.set_registered_model_alias(model_name, alias, str(back.version))
        client.delete_registered_model_alias(model_name, previous_alias(alias))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        note = f"{alias} rolled back from version {current} to version {back.version}"
        for version in {str(back.version), current} - {"none"}:
            client.set_model_version_tag(model_name, version, TAG_ROLLED_BACK, f"{stamp}: {note}")
    return current, str(back.version)
