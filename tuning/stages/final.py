"""The final stage: retrain the best configuration for longer, evaluate it on test, log the evidence.

The model it evaluates, and returns for registration (`stages.register`), holds the weights of the
epoch with the best validation accuracy, not necessarily the last (`fit(keep_best=True)`). With a
test-time augmentation (`FinalInputs.tta`) its test accuracy is logged both without and with it.

With an ensemble (`FinalInputs.ensemble`, ``--ensemble K|auto``) the best trial is member 1, trained and
logged exactly as the single model is; each further candidate (the next trials by validation accuracy)
is retrained the same way, in rank order, in the same run (its epochs as ``member<k>_<metric>``). The
ensemble averages its members' class probabilities; ``auto`` keeps adding members while the averaged
validation accuracy rises (`fer_model.ensemble.choose_size`). The run's test metrics, its evaluation
files and the registered model are then the ensemble's; each member's test accuracy is logged beside.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fer_model import metrics as M
from fer_model.config import TrainConfig, check_tta
from fer_model.ensemble import accuracy, average, choose_size
from fer_model.evaluate import (
    LEARNING_CURVES_PNG,
    Evaluation,
    describe_test,
    evaluate_probabilities,
    plot_learning_curves,
    save_evaluation,
)
from fer_model.inputs import predict_proba
from fer_model.training import FitResult, FitStatus, fit
from tuning import names as N
from tuning.options import ENSEMBLE_AUTO
from tuning.reporting import describe
from tuning.stages.context import StageContext
from tuning.tracking.store import log_files, log_metrics, log_params, set_tags
from tuning.trials.rows import TrialRow

EVALUATION_DIR = "evaluation"
TTA_PARAM = "tta"  # the final run's param (and its version's tag): the test-time augmentation it used
ENSEMBLE_PARAM = "ensemble"  # the final run's param with --ensemble: K or auto, as asked
MEMBER_CONFIG = "config"  # the final run's param member<k>_config: JSON of ensemble member k's configuration


def retrain_config(config: dict[str, Any], epochs: int) -> TrainConfig:
    """A trial's configuration retrained for the final stage's `epochs`. A warm-up longer than that (a
    search's ``warmup 2`` retrained with ``--final-epochs 1``) is cut to `epochs`, said in one line:
    the search's hours are not thrown away over a final-stage detail."""
    warmup = int(config.get("warmup", 0) or 0)
    if warmup > epochs:
        print(f"final: the configuration's warm-up of {warmup} epochs is cut to the final stage's {epochs}")
        config = {**config, "warmup": epochs}
    return TrainConfig.from_dict({**config, "epochs": epochs})


@dataclass(frozen=True)
class Candidate:
    """A trial an ensemble may add after the best one: its configuration (with the final stage's
    epochs), its trial run, and the validation accuracy that ranked it."""

    config: TrainConfig
    trial_run_id: str | None = None
    val_acc: float = math.nan


@dataclass(frozen=True)
class FinalInputs:
    """What to retrain, for how long, where; and the stage run whose best it is."""

    config: TrainConfig  # the best trial's, with the final stage's epochs
    source_run_id: str  # the grid or search run
    best_trial_run_id: str | None = None
    device: str | None = None
    tta: str = "none"  # test-time augmentation of the evaluation and the registered model (fer_model.inputs)
    ensemble: str | None = None  # --ensemble: "K" or "auto"; None: one model
    candidates: tuple[Candidate, ...] = ()  # with an ensemble: the trials after the best, in rank order

    @classmethod
    def of(cls, best_config: dict[str, Any], epochs: int, source_run_id: str, best_trial_run_id: str | None,
           device: str | None, tta: str = "none", ensemble: str | None = None,
           candidates: Sequence[TrialRow] = ()) -> "FinalInputs":
        return cls(retrain_config(best_config, epochs), source_run_id, best_trial_run_id, device,
                   check_tta(tta), ensemble,
                   tuple(Candidate(retrain_config(r.config, epochs), r.run_id, r.val_acc) for r in candidates))

    def params(self) -> dict[str, Any]:
        """The final run's params: the configuration it retrains (member 1's, with an ensemble), its
        test-time augmentation, and --ensemble when given."""
        return {**self.config.to_dict(), TTA_PARAM: self.tta, **({ENSEMBLE_PARAM: self.ensemble} if self.ensemble else {})}

    @property
    def run_name(self) -> str:
        """The final run's name: the configuration it retrains (``final adam b32 lr1e-3 d0.3 (15 epochs)``),
        with an ensemble ``(15 epochs, ensemble of 3)`` or ``(15 epochs, ensemble auto)``."""
        name = N.final_run_name(self.config.to_dict())
        if self.ensemble is None:
            return name
        size = "auto" if self.ensemble == ENSEMBLE_AUTO else f"of {1 + len(self.candidates)}"
        return f"{name[:-1]}, ensemble {size})"

    def tags(self) -> dict[str, str]:
        tags = {N.TAG_PARENT: self.source_run_id, N.TAG_STAGE: N.STAGE_FINAL}
        if self.best_trial_run_id:
            tags[N.TAG_BEST_TRIAL_RUN] = self.best_trial_run_id
        return tags


@dataclass
class FinalResult:
    """A trained, evaluated model and the run that holds its evidence."""

    run_id: str
    inputs: FinalInputs
    model: Any  # torch.nn.Module
    history: list[dict[str, float]]
    evaluation: Evaluation
    status: FitStatus
    train_seconds: float
    model_epoch: int = 0  # the epoch (1-based) whose weights `model` holds: the best on validation
    tta_evaluation: Evaluation | None = None  # with inputs.tta; `evaluation` is always without
    # The members it averages, in rank order (the first is `model`; the only one without --ensemble), and with
    # auto the validation accuracy of the first 1, 2, ... trained members averaged (what chose their number).
    members: list["Member"] = field(default_factory=list)
    ensemble_val_accs: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.status == FitStatus.DIVERGED

    @property
    def networks(self) -> list[tuple[Any, Any]]:
        """What the registered model holds: (network, ModelSpec) of each member (one without --ensemble)."""
        return [(m.model, m.config.model) for m in self.members]

    @property
    def ensemble(self) -> bool:
        """Whether --ensemble asked for members beyond the best trial (auto may still keep only one)."""
        return self.inputs.ensemble is not None

    def ensemble_line(self) -> str:
        """The ensemble in one line, e.g. ``ensemble of 3: test accuracy 61.20% (members 58.10%, 57.90%,
        57.50%)``, with TTA and auto's validation accuracies when there are; empty without an ensemble."""
        if not self.ensemble:
            return ""
        pct = lambda v: f"{100 * v:.2f}%"
        line = (f"ensemble of {len(self.members)}: test accuracy {pct(self.evaluation.metrics[M.TEST_ACC])} "
                f"(members {', '.join(pct(m.test_acc) for m in self.members)})")
        if self.tta_evaluation is not None:
            line += f", with TTA {self.inputs.tta} {pct(self.tta_evaluation.metrics[M.TEST_ACC])}"
        if self.ensemble_val_accs:  # auto
            line += "; sized on validation accuracy: " + ", ".join(
                f"{pct(v)} with {k}{' member' if k == 1 else ''}" for k, v in enumerate(self.ensemble_val_accs, 1))
        return line

    def weights_line(self) -> str:
        """Which epoch's weights were evaluated and registered, e.g. ``weights of epoch 12 of 15 (best
        validation accuracy 61.20%)``."""
        if not self.model_epoch:
            return "no epoch finished"
        averaged = bool(self.members) and self.members[0].fitted.averaged
        row = self.history[self.model_epoch - 1]
        val_acc = row.get(M.VAL_ACC_EMA, row[M.VAL_ACC]) if averaged else row[M.VAL_ACC]
        return (f"{'averaged ' if averaged else ''}weights of epoch {self.model_epoch} of {len(self.history)} "
                f"(best validation accuracy {100 * val_acc:.2f}%)")

    def tta_line(self) -> str:
        """The test numbers with the test-time augmentation, e.g. ``with TTA flip: test accuracy 58.10%,
        PublicTest 57.90%, PrivateTest 58.30%, macro F1 0.5512``; empty without."""
        if self.tta_evaluation is None:
            return ""
        return f"with TTA {self.inputs.tta}: {describe_test(self.tta_evaluation.metrics)}"


@dataclass
class Member:
    """One network of an ensemble: a ranked trial's configuration retrained, and its class probabilities."""

    rank: int  # 1-based; member 1 is the best trial, the one model of a final stage without --ensemble
    config: TrainConfig
    trial_run_id: str | None
    fitted: FitResult = field(repr=False)
    seconds: float
    test_acc: float
    test_acc_tta: float | None
    test_probs: Any = field(repr=False)  # torch (N, 7) on the CPU
    test_probs_tta: Any = field(default=None, repr=False)  # with inputs.tta
    val_probs: Any = field(default=None, repr=False)  # with auto: what sizes the ensemble (with inputs.tta)

    @property
    def model(self) -> Any:
        return self.fitted.model


def run(ctx: StageContext, run_id: str, inputs: FinalInputs) -> FinalResult:
    """Retrain (each member, with an ensemble), log each epoch, evaluate on test, log the metrics and
    the evaluation files."""
    import torch

    device = torch.device(inputs.device) if inputs.device else None
    t0 = time.perf_counter()
    # The best epoch's weights: a later epoch that overfits (or a schedule that ends badly) costs nothing.
    result = fit(inputs.config, ctx.data, device=device, keep_best=True,
                 on_epoch=lambda r: log_metrics(ctx.client, run_id, r.metrics, step=r.epoch))
    train_seconds = time.perf_counter() - t0
    # One model is an ensemble of one: the same members, the same averaged evaluation (of one, the model's own).
    members, val_accs, metrics, train_seconds = _ensemble(ctx, run_id, inputs, result, train_seconds, device)
    ev = _evaluate_average(ctx, [m.test_probs for m in members])
    tta_ev = _evaluate_average(ctx, [m.test_probs_tta for m in members]) if inputs.tta != "none" else None
    metrics.update({**ev.metrics, **M.summary(result.history), "train_seconds": train_seconds,
                    M.BEST_EPOCH: result.model_epoch,
                    # 1: the registered weights are that epoch's moving average (--ema), 0: its raw weights
                    M.WEIGHTS_AVERAGED: float(result.averaged)})
    if tta_ev is not None:
        metrics.update(M.with_tta(tta_ev.metrics))
    log_metrics(ctx.client, run_id, metrics)
    with tempfile.TemporaryDirectory() as d:
        files = save_evaluation(ev, d, result.history if len(members) == 1 else None, title="(final)")
        if len(members) > 1:  # every member's learning curves in one figure
            files.append(plot_learning_curves({f"member {m.rank}": m.fitted.history for m in members},
                                              Path(d) / LEARNING_CURVES_PNG, title="(final)"))
        log_files(ctx.client, run_id, files, EVALUATION_DIR)
    final = FinalResult(run_id, inputs, result.model, result.history, ev, result.status, train_seconds,
                        model_epoch=result.model_epoch, tta_evaluation=tta_ev, members=members, ensemble_val_accs=val_accs)
    note = describe.final_description(
        inputs.config.to_dict(), ev.metrics, source_run_id=inputs.source_run_id, best_trial_run_id=inputs.best_trial_run_id,
        status=result.status, train_seconds=train_seconds, test_size=len(ctx.data.test), fingerprint=ctx.data.fingerprint,
        full_data=ctx.data_config.max_samples is None, epochs_run=len(result.history))
    tta_text = final.tta_line()
    note += f"\n\nEvaluated (and registered): {'member 1, ' if final.ensemble else ''}the {final.weights_line()}."
    note += f" {tta_text[:1].upper()}{tta_text[1:]}." if tta_text else ""
    tags = {N.TAG_OUTCOME: N.Outcome(result.status.value)}
    if final.ensemble:
        names = [N.config_name(m.config.to_dict(), N.FINAL_NAME_KEYS) for m in members]
        note += (f"\n\nAn {final.ensemble_line()}. Its members, by their trials' validation accuracy: " + "; ".join(
            f"{m.rank}. `{name}` (trial run `{m.trial_run_id or '-'}`)" for m, name in zip(members, names)) + ".")
        tags[N.TAG_MEMBER_TRIAL_RUNS] = ",".join(m.trial_run_id or "" for m in members)
    set_tags(ctx.client, run_id, {**tags, N.TAG_NOTE: note})
    return final


def _ensemble(ctx: StageContext, run_id: str, inputs: FinalInputs, first: FitResult, first_seconds: float,
              device) -> tuple[list[Member], list[float], dict[str, float], float]:
    """Member 1 (`first`, trained already) and the candidates retrained in rank order as member 1 was (none
    without --ensemble: an ensemble of one); with auto, until one does not raise the averaged validation
    accuracy (it is then left out). A diverged member 1 ends it: that result is never registered.

    Returns the members kept, auto's validation accuracy of each number of members tried, the metrics of
    every member trained, and the seconds all training took. A candidate whose training diverged is left
    out (and ends an auto ensemble).
    """
    auto = inputs.ensemble == ENSEMBLE_AUTO
    trained = [_member(ctx, inputs, 1, inputs.config, inputs.best_trial_run_id, first, first_seconds, device, auto)]
    seconds = first_seconds
    if inputs.ensemble is None or first.status == FitStatus.DIVERGED:  # its numbers are the final run's own
        return trained, [], {}, seconds
    for rank, candidate in enumerate(inputs.candidates, 2):
        name = N.config_name(candidate.config.to_dict(), N.FINAL_NAME_KEYS)
        print(f"ensemble member {rank}: retraining trial run {candidate.trial_run_id or '-'} ({name}, validation "
              f"accuracy {100 * candidate.val_acc:.2f}%) for {candidate.config.epochs} epoch(s)", flush=True)
        config_json = json.dumps(candidate.config.to_dict(), sort_keys=True)
        log_params(ctx.client, run_id, {M.member_metric(rank, MEMBER_CONFIG): config_json})
        t0 = time.perf_counter()
        fitted = fit(candidate.config, ctx.data, device=device, keep_best=True, on_epoch=lambda r, k=rank: log_metrics(
            ctx.client, run_id, {M.member_metric(k, key): v for key, v in r.metrics.items()}, step=r.epoch))
        took = time.perf_counter() - t0
        seconds += took
        if fitted.status == FitStatus.DIVERGED:
            print(f"ensemble member {rank}: training diverged; left out")
            if auto:
                break
            continue
        trained.append(_member(ctx, inputs, rank, candidate.config, candidate.trial_run_id, fitted, took, device, auto))
        if auto and choose_size([m.val_probs for m in trained], ctx.data.val.labels)[0] < len(trained):
            print(f"ensemble member {rank}: validation accuracy did not rise with it; left out")
            break
    size, tried = choose_size([m.val_probs for m in trained], ctx.data.val.labels) if auto else (len(trained), [])
    for k, acc in enumerate(tried, 1):
        log_metrics(ctx.client, run_id, {M.ENSEMBLE_VAL_ACC: acc}, step=k)
    metrics: dict[str, float] = {M.ENSEMBLE_SIZE: size}
    for m in trained:
        metrics.update({M.member_metric(m.rank, M.TEST_ACC): m.test_acc, M.member_metric(m.rank, "train_seconds"): m.seconds,
                        M.member_metric(m.rank, M.BEST_EPOCH): m.fitted.model_epoch})
        if m.test_acc_tta is not None:
            metrics[M.member_metric(m.rank, M.TEST_ACC_TTA)] = m.test_acc_tta
    return trained[:size], tried, metrics, seconds


def _member(ctx: StageContext, inputs: FinalInputs, rank: int, config: TrainConfig, trial_run_id: str | None,
            fitted: FitResult, seconds: float, device, auto: bool) -> Member:
    """A trained member with its test probabilities (also with the TTA) and, for auto, its validation ones
    (with the TTA: the ensemble is sized as the registered model will predict)."""
    def probs(split, tta: str):
        return predict_proba(fitted.model, split.images, config.model.outputs_probabilities, tta=tta, device=device)

    test = probs(ctx.data.test, "none")
    test_tta = probs(ctx.data.test, inputs.tta) if inputs.tta != "none" else None
    return Member(rank, config, trial_run_id, fitted, seconds, accuracy(test, ctx.data.test.labels),
                  None if test_tta is None else accuracy(test_tta, ctx.data.test.labels), test, test_tta,
                  probs(ctx.data.val, inputs.tta) if auto else None)


def _evaluate_average(ctx: StageContext, probabilities: list) -> Evaluation:
    """The test evaluation of the members' averaged class probabilities (`fer_model.ensemble.average`,
    as the registered model averages them)."""
    test = ctx.data.test
    return evaluate_probabilities(average(probabilities).numpy(), test.labels.cpu().numpy(), test.usage.cpu().numpy())
