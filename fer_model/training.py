"""`fit`: one `TrainConfig` trained on in-memory uint8 tensors; checkpoints to resume it exactly.

The hot loop follows cifar10-airbench rather than the study's notebook: the whole dataset sits on
the training device as one uint8 tensor, batches are index gathers, augmentation is done on whole
batches, and there is no DataLoader or PIL. Losses and accuracies are accumulated on the device so
the loop does not synchronise every step. `benchmarks/throughput.py` measures the difference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fer_model import metrics as M
from fer_model.augment import augment_batch, augmenting
from fer_model.config import TrainConfig
from fer_model.data import FerData, Split
from fer_model.device import autocast, resolve_device
from fer_model.errors import ConfigError, DataError, first_line
from fer_model.inputs import predict_outputs, to_input
from fer_model.model import build_model

# "step": StepLR(step_size=7, gamma=0.1). Every loss curve in the study falls by 15-30% in one
# epoch at epoch 7 (e.g. 0.6651 -> 0.4734) and flattens after: the signature of this schedule.
STEP_EPOCHS, STEP_GAMMA = 7, 0.1
# "plateau": the lr is multiplied by PLATEAU_FACTOR once validation accuracy has not improved for
# PLATEAU_PATIENCE epochs in a row (as ReduceLROnPlateau in max mode; Khaireddin & Chen 2021 found
# reducing the lr on a validation plateau the best of the schedulers they compared on FER2013).
# Their runs are far longer than the 10-25 epochs here: a patience of 2 can still act several times
# in a 15-epoch run, where a longer one would act once at most, and halving (rather than x0.1) costs
# little when a single noisy validation epoch triggers it.
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 2
VAL_LOSS_EMA, VAL_ACC_EMA = M.VAL_LOSS_EMA, M.VAL_ACC_EMA  # named in fer_model.metrics, with every metric


class FitStatus(str, Enum):
    """How `fit` ended, decided here once. Its values are `tuning.names.Outcome`'s (a trial's outcome is its
    fit's status, unless the trial failed or its driver died), so the tuning side converts by value."""

    COMPLETED = "completed"
    DIVERGED = "diverged"  # the training loss stopped being finite: training ends at that epoch
    STOPPED_EARLY = "stopped_early"  # the per-epoch callback asked to stop

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # one key with its string in a dict or set (Enum hashes names)


@dataclass
class EpochResult:
    """What the per-epoch callback receives: the epoch number (1-based), metrics, and the state."""

    epoch: int
    metrics: dict[str, float]
    state: Callable[[], dict[str, Any]] = field(repr=False)  # the full training state (see `save_checkpoint`)
    diverged: bool = False  # this epoch's loss is not finite: `fit` ends here with FitStatus.DIVERGED


@dataclass
class FitResult:
    """A trained model, its epochs' metrics, how the run ended, and which epoch's weights the model holds."""

    model: nn.Module  # the weights of epoch `model_epoch`
    history: list[dict[str, float]]
    status: FitStatus
    config: TrainConfig
    best_epoch: int = 0  # 1-based epoch of the highest validation accuracy in `history` (0: none)
    model_epoch: int = 0  # the last epoch; with `fit(keep_best=True)`, the best one (see `fit`)
    averaged: bool = False  # the model holds that epoch's moving average of the weights (`TrainConfig.ema`), not its raw weights

    @property
    def epochs_completed(self) -> int:
        return len(self.history)


@dataclass
class Plateau:
    """The "plateau" schedule's state, kept in checkpoints: the best validation accuracy so far, the
    epochs since it improved, and the factor the lr has been cut by."""

    best: float = -math.inf
    bad_epochs: int = 0
    factor: float = 1.0

    def step(self, val_acc: float) -> bool:
        """Record an epoch's validation accuracy; True when it cuts the lr (PLATEAU_PATIENCE epochs in a
        row without a strictly higher accuracy), after which the count starts again."""
        if val_acc > self.best:
            self.best, self.bad_epochs = val_acc, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs < PLATEAU_PATIENCE:
            return False
        self.factor *= PLATEAU_FACTOR
        self.bad_epochs = 0
        return True


EpochCallback = Callable[[EpochResult], "bool | None"]


class WeightAverage:
    """An exponential moving average of a model's weights (`TrainConfig.ema`), updated after every
    optimizer step: ``avg = decay * avg + (1 - decay) * weights`` for each parameter, buffers (BatchNorm's
    running statistics and counts) copied as they are. It starts from the weights it is made with."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model)  # same device and memory format
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1.0 - self.decay)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    # Not fused=True: on 2 fp32 CPU cores an interleaved A/B of the study's CNN gave medians of 134.3
    # (foreach) and 135.0 img/s (fused), within this machine's +-15% run-to-run noise (RESULTS.md).
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}")  # TrainConfig refuses it first; a new name needs a branch here


def lr_factor(schedule: str, step: int, steps_per_epoch: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): the schedule's, times a
    linear warm-up from 1/warmup_steps to 1 over the first `warmup_steps` steps.

    "plateau" acts per epoch (`Plateau`, its factor applied in `fit`): per step it is 1 like "none".
    """
    warm = min((step + 1) / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return warm * _schedule_factor(schedule, step, steps_per_epoch, total_steps)


def _schedule_factor(schedule: str, step: int, steps_per_epoch: int, total_steps: int) -> float:
    if schedule == "step":
        return STEP_GAMMA ** (step // (STEP_EPOCHS * steps_per_epoch))
    progress = min(step / max(total_steps, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # 30% linear warm-up from lr/25, then cosine down to ~0
        warm = 0.3
        if progress < warm:
            return 0.04 + 0.96 * progress / warm
        return 0.5 * (1 + math.cos(math.pi * (progress - warm) / (1 - warm)))
    return 1.0


def _loss_acc(model: nn.Module, split: Split, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    out = predict_outputs(model, split.images, device, channels_last=cfg.channels_last)
    labels = split.labels.cpu()
    loss = F.cross_entropy(out, labels).item()
    acc = (out.argmax(1) == labels).float().mean().item()
    return loss, acc


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, split: Split,
                    cfg: TrainConfig, shuffle: torch.Generator, aug: torch.Generator | None,
                    average: WeightAverage | None = None) -> tuple[float, float]:
    """One pass over `split` (already on the model's device), `average` updated after every step.
    Returns (mean loss, accuracy)."""
    device = split.images.device
    n = len(split)
    order = torch.randperm(n, generator=shuffle).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    model.train()
    for step, start in enumerate(range(0, n, cfg.batch_size)):
        idx = order[start:start + cfg.batch_size]
        x = split.images[idx]
        if augmenting(cfg):
            x = augment_batch(x, cfg.flip, cfg.translate, aug, rotate=cfg.rotate, scale=cfg.scale, erase=cfg.erase)
        x = to_input(x, cfg.channels_last)
        y = split.labels[idx]
        with autocast(device, cfg.bf16):
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update(model)
        loss_sum += loss.detach() * y.shape[0]
        correct += (out.detach().argmax(1) == y).sum()
        # A cheap sync every 50 steps so a diverged run stops within the epoch.
        if step % 50 == 49 and not torch.isfinite(loss_sum):
            return float("nan"), correct.item() / max(start + len(idx), 1)
    return loss_sum.item() / n, correct.item() / n


def fit(cfg: TrainConfig, data: FerData, on_epoch: EpochCallback | None = None,
        device: torch.device | str | None = None, resume: Mapping[str, Any] | None = None,
        keep_best: bool = False) -> FitResult:
    """Train `cfg` on `data.train`, validating on `data.val` after every epoch.

    `on_epoch` receives an `EpochResult` after each epoch; returning True stops the run
    (status "stopped"). A non-finite training loss ends the run as "diverged". `resume` is a
    checkpoint from `EpochResult.state()` / `load_checkpoint`: training continues after its
    epoch with the same optimizer, schedule (the plateau's state included) and random state, so
    the result matches an uninterrupted run.

    The returned model holds the last epoch's weights; with `keep_best`, those of the epoch with the
    highest validation accuracy (the first on a tie): a CPU copy is kept whenever it improves, and
    checkpoints carry it. Resumed from a checkpoint without that copy (written without `keep_best`,
    or before it existed), the earlier epochs' weights are unknown: the best is then chosen among the
    checkpoint's own epoch and those after it (`FitResult.model_epoch` says which was kept).

    With ``cfg.ema`` > 0 a moving average of the weights (`WeightAverage`) is kept too and validated
    after every epoch (`VAL_LOSS_EMA`, `VAL_ACC_EMA` in its row; `VAL_ACC` stays the raw weights'). An
    epoch then scores the better of its two accuracies, and the model returned holds whichever of that
    epoch's raw or averaged weights scored higher (the raw on a tie; `FitResult.averaged` says which).
    Checkpoints carry the average, so a resumed run matches an uninterrupted one. With ``cfg.ema`` 0
    nothing of this happens and the run is the same, bit for bit, as before the option existed.
    """
    if resume is not None:
        _check_resumable(cfg, resume)  # before any work: a wrong checkpoint is the user's error
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())
    train, val = data.train.to(device), data.val.to(device)  # once; batches are gathers from here
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    plateau = Plateau()  # its factor stays 1 unless cfg.schedule is "plateau"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: plateau.factor * lr_factor(
        cfg.schedule, s, steps_per_epoch, total_steps, cfg.warmup * steps_per_epoch))
    shuffle = torch.Generator().manual_seed(cfg.seed)
    aug = torch.Generator(device=device).manual_seed(cfg.seed + 1) if augmenting(cfg) else None
    history: list[dict[str, float]] = []
    start_epoch = 0
    # with keep_best: {"epoch", "val_acc", "model" (a CPU state_dict), "averaged" (it is the weights' average)}
    best: dict[str, Any] | None = None
    average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None  # from the initial weights

    if resume is not None:
        model.load_state_dict(resume["model"])
        if average is not None:  # the config check has made sure a checkpoint of an ema run has it
            average.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if "plateau" in resume:  # checkpoints from before "plateau" existed never needed one
            plateau = Plateau(**resume["plateau"])
        history = [dict(h) for h in resume["history"]]
        start_epoch = int(resume["epoch"])
        if keep_best:
            best = resume.get("best") or (_best_of_epoch(start_epoch, history[-1], resume["model"], resume.get("ema"))
                                          if history else None)
        rng = resume["rng"]
        torch.set_rng_state(rng["torch"])
        shuffle.set_state(rng["shuffle"])
        if aug is not None and "augment" in rng:
            aug.set_state(rng["augment"].to(aug.get_state().device))
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)

    def state(epoch: int) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
        if aug is not None:
            rng["augment"] = aug.get_state().cpu()
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        out = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "plateau": dataclasses.asdict(plateau), "epoch": epoch,
               "history": [dict(h) for h in history], "rng": rng, "config": cfg.to_dict()}
        if average is not None:
            out["ema"] = average.state_dict()
        if best is not None:
            out["best"] = best
        return out

    status = FitStatus.COMPLETED
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr_now = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(model, optimizer, scheduler, train, cfg, shuffle, aug, average)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = _loss_acc(model, val, cfg, device)
        averaged = {}
        if average is not None:
            averaged = dict(zip((VAL_LOSS_EMA, VAL_ACC_EMA), _loss_acc(average.model, val, cfg, device)))
        row = {M.TRAIN_LOSS: train_loss, M.TRAIN_ACC: train_acc, M.VAL_LOSS: val_loss, M.VAL_ACC: val_acc,
               M.EPOCH_SECONDS: time.perf_counter() - t0, M.IMAGES_PER_SECOND: len(train) / train_seconds,
               M.LR: lr_now, **averaged}
        history.append(row)
        finite = math.isfinite(train_loss) and math.isfinite(val_loss)  # a diverging epoch is never the best
        if keep_best and finite:
            candidate = _best_of_epoch(epoch + 1, row, model.state_dict(), average and average.state_dict())
            if best is None or candidate["val_acc"] > best["val_acc"]:
                best = candidate
        if cfg.schedule == "plateau" and plateau.step(val_acc):
            _reapply_lr(optimizer, scheduler)  # the next epoch's first step already uses the cut lr
        diverged = not math.isfinite(train_loss)
        stop = on_epoch(EpochResult(epoch + 1, dict(row), lambda e=epoch + 1: state(e), diverged)) if on_epoch else None
        if diverged:
            status = FitStatus.DIVERGED
            break
        if stop:
            status = FitStatus.STOPPED_EARLY
            break
    model_epoch, use_average = len(history), False
    if best is not None:
        if best["epoch"] != model_epoch or best.get("averaged", False):
            model.load_state_dict(best["model"])
        model_epoch, use_average = best["epoch"], best.get("averaged", False)
    elif average is not None and history and M.average_is_better(history[-1]):
        model.load_state_dict(average.state_dict())  # the last epoch's average validated better than its raw weights
        use_average = True
    return FitResult(model=model, history=history, status=status, config=cfg,
                     best_epoch=M.best_epoch(history), model_epoch=model_epoch, averaged=use_average)


def _best_of_epoch(epoch: int, row: Mapping[str, float], raw: Mapping[str, torch.Tensor],
                   averaged: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    """`fit(keep_best=True)`'s candidate for an epoch: its raw or, where they validated better, averaged weights (a CPU copy)."""
    if averaged is not None and M.average_is_better(row):
        return {"epoch": epoch, "val_acc": row[VAL_ACC_EMA], "model": _cpu_copy(averaged), "averaged": True}
    return {"epoch": epoch, "val_acc": row[M.VAL_ACC], "model": _cpu_copy(raw), "averaged": False}


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict copied to the CPU (a copy even when it is there already: training goes on changing it)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _reapply_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the lr of the scheduler's current step again (as LambdaLR computes it), after a factor its
    lambda reads (the plateau's) changed between steps."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


# Fields that may differ between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = {"epochs"}


def _check_resumable(cfg: TrainConfig, ckpt: Mapping[str, Any]) -> None:
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "history", "rng", "config") if k not in ckpt]
    if missing:
        raise ConfigError(f"not a training checkpoint of this trainer (missing {', '.join(missing)})")
    saved = dict(ckpt.get("config", {}))
    now = cfg.to_dict()
    # A training key the checkpoint lacks was added after it was written (rotate, scale, erase): its default.
    defaults = TrainConfig().to_dict()
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES
                  and saved.get(k, defaults[k] if k in TrainConfig.training_keys() else None) != now[k])
    if diff:
        raise ConfigError(f"checkpoint was written by a different configuration ({', '.join(diff)} differ)")


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write a training state to `path` atomically (a crash mid-write leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(state), tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``: tensors and plain values only, no pickled code."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - missing, truncated, or not a torch file at all
        raise DataError(f"cannot read checkpoint {str(path)!r}: {first_line(exc)}") from None
    if not isinstance(state, dict):
        raise DataError(f"{str(path)!r} is not a training checkpoint")
    return state
