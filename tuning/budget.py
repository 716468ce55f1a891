"""A time budget planned into a search: how many trials, which ASHA rungs, how long (`--time-budget 2h`).

Pure functions, no Ray and no torch at import (`measure_epoch_seconds` imports fer_model's trainer when
called). `plan` chooses the trials, ASHA grace period, reduction factor and longest trial so that the
epochs the trials run, `concurrent` at a time, fit the budget:

    trials reaching rung i:  n_i = ceil(N / rf**i)            (the best reaches the longest trial)
    trial-epochs:            sum_i n_i * (rung_i - rung_{i-1})  (a trial stopped at a rung ran that many epochs)
    search time:             max(trial-epochs * s/epoch / concurrent, longest trial * s/epoch)

Of the plans that fit, the one with the most trials x longest trial wins (ties: more trials), among those
with at least rf**(rungs-1) trials (so each rung keeps one trial in rf) where any has. With the grace
period at least the space's, that favours more rungs (3 -> 9 -> 27) over longer first rungs: each rung
costs about N * grace epochs and multiplies the longest trial by rf.

Seconds per epoch are timed here (`measure_epoch_seconds`), else read from `EPOCH_SPEED` (one machine's, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import product
from typing import Any, Callable, Mapping

from fer_model.config import TrainConfig
from fer_model.errors import ConfigError

# Training images a second of each net: `python benchmarks/arch_speed.py` (benchmarks/RESULTS.md): AMD EPYC,
# 2 fp32 threads, batch 64, AdamW, best of 3 repeats. Keys as arch_speed's --net (`net_key`).
EPOCH_SPEED: dict[str, float] = {
    "cnn": 129.3,
    "cnn-bn:width=1": 112.9,
    "vgg:width=0.25,depth=2": 415.1,
    "vgg:width=0.375,depth=2": 182.0,
    "vgg:width=0.5,depth=2": 113.4,
    "resnet:width=0.25,depth=2": 395.5,
    "resnet:width=0.5,depth=1": 398.8,
    "resnet:width=0.5,depth=2": 179.6,
}
SPEED_THREADS = 2  # the table's
# A real epoch (training at a mean speed, then its validation pass) against the table's best speed: the
# 40-epoch vgg 0.25 run took 79 s an epoch on average, 62 s at 415 img/s (docs/results.md).
EPOCH_OVERHEAD = 79 / 62
# A real epoch against `measure_epoch_seconds`'s few steps: augmentation, the checkpoint and a neighbour
# trial on the other core. 2-core AMX bf16 Xeon: vgg 0.25 timed 36.7 s an epoch alone on 1 thread, 41 s
# in a search of 2 trials at once (2026-12-01).
TIMED_OVERHEAD = 41 / 36.7
FER_TRAINING_IMAGES = 28_709  # FER2013's Training usage; validation is a share of it
DEFAULT_REDUCTION_FACTOR = 3.0

_DURATION = re.compile(r"^\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*(s|sec|m|min|h|hr|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration(text: str, flag: str = "--time-budget", positive: bool = True) -> float:
    """Seconds in ``"45s"``, ``"90m"``, ``"2h"``, ``"1.5h"`` or ``"3600"`` (plain numbers are seconds);
    anything else, or (`positive`) a duration <= 0, a ConfigError naming `flag`."""
    match = _DURATION.match(str(text))
    named = f"{flag}: " if flag else ""
    if not match:
        raise ConfigError(f"{named}expected a duration such as 45s, 90m, 2h or 3600 (seconds), got {text!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
    if positive and not seconds > 0:
        raise ConfigError(f"{named}must be > 0 seconds, got {text!r}")
    return seconds


def duration_text(seconds: float) -> str:
    """``5400`` -> ``"1h30m"``, ``90`` -> ``"1m30s"``, ``45`` -> ``"45s"`` (rounded to the second)."""
    s = int(round(seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


# --------------------------------------------------------------------------- speed


def net_key(config: Mapping[str, Any]) -> str:
    """The network of a flat config as benchmarks/arch_speed.py's --net names it: ``vgg:width=0.25,depth=2``."""
    spec = TrainConfig.from_dict({k: v for k, v in config.items() if k in ("arch", "width", "depth")}).model
    opts = ",".join(f"{k}={spec.options[k]:g}" for k in ("width", "depth") if k in spec.options)
    return f"{spec.arch}:{opts}" if opts else spec.arch.replace("cnn-softmax", "cnn")


def space_nets(space: Mapping[str, Any]) -> list[str]:
    """Every network (`net_key`) a search space can produce: its arch x width x depth values."""
    def values(key: str) -> list[Any]:
        spec = space.get(key)
        if spec is None:
            return [None]
        if isinstance(spec, Mapping):
            kind, vals = next(iter(spec.items()))
            if kind == "choice":
                return list(vals)
            return list(range(vals[0], vals[1])) if kind == "randint" else [vals[1]]  # a range's widest end
        return [spec]

    keys = []
    for arch, width, depth in product(values("arch"), values("width"), values("depth")):
        config = {k: v for k, v in (("arch", arch), ("width", width), ("depth", depth)) if v is not None}
        try:
            key = net_key(config)
        except ConfigError:  # an arch without that option (the space validated, so this cannot be its own value)
            key = net_key({k: v for k, v in config.items() if k == "arch"})
        if key not in keys:
            keys.append(key)
    return keys


def table_speed(key: str) -> float | None:
    """`EPOCH_SPEED` of a net; a shallower net of a measured width is taken at the deeper one's speed (it is
    faster); None where the table does not know it."""
    if key in EPOCH_SPEED:
        return EPOCH_SPEED[key]
    m = re.match(r"^(.*),depth=(\d+)$", key)
    if m:
        deeper = [EPOCH_SPEED[f"{m.group(1)},depth={d}"] for d in range(int(m.group(2)) + 1, 5)
                  if f"{m.group(1)},depth={d}" in EPOCH_SPEED]
        if deeper:
            return deeper[0]
    return None


def table_epoch_seconds(space: Mapping[str, Any], data_sizes: Mapping[str, int],
                        threads: float = SPEED_THREADS) -> dict[str, float] | None:
    """Seconds an epoch (with its validation) of each net of `space` from `EPOCH_SPEED`, on `threads` CPU
    threads (assumed to scale linearly from the table's 2); None where a net is not in the table."""
    speeds = {key: table_speed(key) for key in space_nets(space)}
    if any(v is None for v in speeds.values()):
        return None
    scale = SPEED_THREADS / max(threads, 1e-9)
    return {key: data_sizes["train"] / speed * EPOCH_OVERHEAD * scale for key, speed in speeds.items()}


def measure_epoch_seconds(space: Mapping[str, Any], data_sizes: Mapping[str, int], steps: int = 3,
                          batch_size: int = 64, threads: int | None = None, device: str | None = None) -> dict[str, float]:
    """Seconds an epoch of `data_sizes` (``{"train": n, "val": m}``) takes for each net of `space`, timed
    here: `steps` training steps of random images with fer_model's trainer (after one untimed), and a
    validation pass over as many images, times `TIMED_OVERHEAD` for what a real epoch adds. Seconds of
    this machine, `threads` torch threads."""
    import torch

    from fer_model.device import resolve_device

    was_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _measure(space, data_sizes, steps, batch_size, resolve_device(device))
    finally:
        torch.set_num_threads(was_threads)  # this process's own setting, as it was


def _measure(space: Mapping[str, Any], data_sizes: Mapping[str, int], steps: int, batch_size: int, dev) -> dict[str, float]:
    import torch

    from fer_model.data import Split
    from fer_model.inputs import predict_outputs
    from fer_model.model import build_model
    from fer_model.training import make_optimizer, train_one_epoch

    n = batch_size * (steps + 1)
    images = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8)
    split = Split(images, torch.randint(0, 7, (n,)), torch.zeros(n, dtype=torch.int8)).to(dev)
    warm = Split(split.images[:batch_size], split.labels[:batch_size], split.usage[:batch_size])
    out = {}
    for key in space_nets(space):
        arch, _, opts = key.partition(":")
        values = {"arch": arch, **{k: float(v) if k == "width" else int(v)
                                   for k, v in (o.split("=") for o in filter(None, opts.split(",")))}}
        cfg = TrainConfig.from_dict({**values, "batch_size": batch_size, "epochs": 1})
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dev)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer(cfg, model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        gen = torch.Generator().manual_seed(0)
        train_one_epoch(model, opt, sched, warm, cfg, gen, None)  # warm-up: allocation, kernels
        t0 = time.perf_counter()
        train_one_epoch(model, opt, sched, Split(split.images[batch_size:], split.labels[batch_size:],
                                                 split.usage[batch_size:]), cfg, gen, None)
        train_s = (time.perf_counter() - t0) / (n - batch_size)
        t0 = time.perf_counter()
        predict_outputs(model, split.images, dev, channels_last=cfg.channels_last)
        val_s = (time.perf_counter() - t0) / n
        out[key] = (data_sizes["train"] * train_s + data_sizes.get("val", 0) * val_s) * TIMED_OVERHEAD
    return out


def data_sizes(max_samples: int | None, val_fraction: float) -> dict[str, int]:
    """Training and validation images of FER2013 (or of a --max-samples subset) for a validation share."""
    total = max_samples or FER_TRAINING_IMAGES
    val = int(round(total * val_fraction))
    return {"train": total - val, "val": val}


# --------------------------------------------------------------------------- the plan


def rungs(grace_period: int, reduction_factor: float, max_epochs: int, asha: bool = True) -> list[int]:
    """Where trials stop: ASHA's milestones (grace x rf**k, up to the longest trial, as Ray's
    AsyncHyperBandScheduler places them), then the longest trial if it is not one."""
    if not asha:
        return [max_epochs]
    stops, k = [], 0
    while (m := grace_period * reduction_factor ** k) <= max_epochs + 1e-9:
        stops.append(int(round(m)))
        k += 1
    if not stops or stops[-1] != max_epochs:
        stops.append(max_epochs)
    return stops


@dataclass(frozen=True)
class Plan:
    """A search sized to a time budget: `trials` trials, ASHA from `grace_period` by `reduction_factor` up
    to `max_epochs`, `concurrent` at a time, each epoch `seconds_per_epoch`."""

    trials: int
    grace_period: int
    reduction_factor: float
    max_epochs: int
    concurrent: int
    seconds_per_epoch: float
    budget_s: float
    final_seconds: float = 0.0
    asha: bool = True
    speeds: Mapping[str, float] = field(default_factory=dict, compare=False)  # seconds an epoch of each net

    def stops(self) -> list[int]:
        """The epochs trials stop at (`rungs`), the longest trial last."""
        return rungs(self.grace_period, self.reduction_factor, self.max_epochs, self.asha)

    def reaching(self) -> list[int]:
        """Trials reaching each stop: ceil(N / rf**j) at the j-th (all of them at the first; at a
        milestone ASHA keeps 1 in rf of the trials arriving)."""
        return [math.ceil(self.trials / self.reduction_factor ** j - 1e-9) for j in range(len(self.stops()))]

    @property
    def trial_epochs(self) -> int:
        """Epochs all trials run in all: each runs to the stop where ASHA ends it."""
        total, before = 0, 0
        for stop, n in zip(self.stops(), self.reaching()):
            total += n * (stop - before)
            before = stop
        return total

    @property
    def search_seconds(self) -> float:
        """The search's estimated length: its trial-epochs `concurrent` at a time (as many as there are
        trials at most), and never less than its longest trial."""
        parallel = min(self.concurrent, self.trials)
        return max(self.trial_epochs * self.seconds_per_epoch / parallel, self.max_epochs * self.seconds_per_epoch)

    def line(self, now: datetime | None = None) -> str:
        """``~16 trials, ASHA 3->9->27 epochs, 2 at a time, ends by 14:32; final stage ~36 min``."""
        now = now or datetime.now()
        shape = f"ASHA {'->'.join(map(str, self.stops()))} epochs" if self.asha else f"{self.max_epochs} epochs each"
        ends = (now + timedelta(seconds=self.budget_s)).strftime("%H:%M")
        final = f"; final stage ~{max(round(self.final_seconds / 60), 1)} min" if self.final_seconds else ""
        return (f"~{self.trials} trials, {shape}, {self.concurrent} at a time, ends by {ends} "
                f"(~{self.seconds_per_epoch / 60:.1f} min an epoch, ~{duration_text(self.search_seconds)} of "
                f"{duration_text(self.budget_s)}){final}")


def _epoch_seconds(seconds_per_epoch: Mapping[str, float] | float) -> float:
    if isinstance(seconds_per_epoch, Mapping):
        if not seconds_per_epoch:
            raise ConfigError("no seconds per epoch to plan with")
        return max(seconds_per_epoch.values())  # the slowest net: TPE may settle on it
    return float(seconds_per_epoch)


def plan(budget_s: float, seconds_per_epoch: Mapping[str, float] | float, concurrent: int, final_epochs: int = 0, *,
         max_epochs: int = 27, min_grace: int = 1, trials: int | None = None, epochs: int | None = None,
         grace_period: int | None = None, reduction_factor: float | None = None, asha: bool = True,
         flag: str = "--time-budget", final_scale: float = 1.0) -> Plan:
    """The search that fits `budget_s` seconds (see the module's docstring for how it is chosen).

    `seconds_per_epoch`: of each net (``{net_key: s}``; the slowest is planned with) or one number;
    `concurrent`: trials at once; `final_epochs`: the final stage's, for its estimate, which takes
    `final_scale` of a trial's seconds an epoch (the final stage has more threads than one trial). `max_epochs` bounds the
    longest trial and `min_grace` the grace period where they are free; `trials`, `epochs`, `grace_period` and
    `reduction_factor` given are kept as they are. A budget too short for one trial is a ConfigError saying the
    least budget."""
    spe = _epoch_seconds(seconds_per_epoch)
    if not (spe > 0 and math.isfinite(spe)):
        raise ConfigError(f"seconds per epoch must be a positive number, got {spe}")
    concurrent = max(int(concurrent), 1)
    rf = reduction_factor or DEFAULT_REDUCTION_FACTOR
    cap = epochs or max_epochs
    speeds = dict(seconds_per_epoch) if isinstance(seconds_per_epoch, Mapping) else {}
    make = lambda n, g, e: Plan(n, g, rf, e, concurrent, spe, budget_s, final_epochs * spe * final_scale, asha, speeds)

    first = grace_period or min(min_grace, cap)
    least = make(trials or 1, first, epochs or first).search_seconds
    if budget_s < least:
        what = f"{trials} trials" if trials else "one trial"
        raise ConfigError(f"{flag} {duration_text(budget_s)} is too short for {what} of {epochs or first} epochs here "
                          f"(~{spe:.0f} s an epoch, {concurrent} at a time): give at least {duration_text(math.ceil(least))}")

    graces = [grace_period] if grace_period else list(range(min(min_grace, cap), cap + 1))
    candidates: list[Plan] = []
    for g in graces if asha else [first]:
        if epochs:
            lengths = [epochs] if g <= epochs else []
        elif asha:
            lengths = sorted({int(round(g * rf ** k)) for k in range(64) if g * rf ** k <= cap + 1e-9})
        else:
            lengths = [e for e in (cap, *range(cap - 1, 0, -1)) if e * spe <= budget_s][:1]
        for e in lengths:
            fits = lambda n: make(n, g, e).search_seconds <= budget_s
            if trials:
                if fits(trials):
                    candidates.append(make(trials, g, e))
                continue
            if not fits(1):
                continue
            low, high = 1, 2
            while fits(high):
                low, high = high, high * 2
            while high - low > 1:  # the most trials that fit: low fits, high does not
                mid = (low + high) // 2
                low, high = (mid, high) if fits(mid) else (low, mid)
            candidates.append(make(low, g, e))
    if not candidates:
        raise ConfigError(f"{flag} {duration_text(budget_s)} is too short for {trials} trials of these epochs here "
                          f"(~{spe:.0f} s an epoch, {concurrent} at a time): give at least {duration_text(math.ceil(least))}")
    ranked = lambda p: (trials is not None or p.trials >= rf ** (len(p.stops()) - 1), p.trials * p.max_epochs,
                        p.trials, p.grace_period)
    return max(candidates, key=ranked)


def plan_for_search(budget_s: float, space: Mapping[str, Any], sizes: Mapping[str, int], concurrent: int,
                    threads: float, final_epochs: int, *, max_epochs: int, min_grace: int,
                    measure: Callable[[Mapping[str, Any], Mapping[str, int]], Mapping[str, float]] | None = None,
                    final_threads: float | None = None, **given: Any) -> Plan:
    """`plan` with the seconds per epoch of `space`'s nets on this machine: `measure` (default
    `measure_epoch_seconds`: a few steps per net, timed here, `threads` torch threads as a trial has), else
    `EPOCH_SPEED` where timing fails and the table knows them all. The table is one machine's: the 2-core
    AMX bf16 Xeon trains vgg 0.25 at ~41 s an epoch on 1 thread where the table (2 fp32 EPYC threads)
    plans 168 s, so a table plan ran a 60-minute budget as ~10 minutes of trials.

    `final_threads`: the final stage's torch threads (default this machine's CPUs); its estimate scales
    the trials' seconds an epoch by threads / final_threads."""
    speeds = None
    if measure is not None:
        speeds = measure(space, sizes)
    else:
        print(f"time budget: timing a few training steps of {', '.join(space_nets(space))} ...", flush=True)
        try:
            speeds = measure_epoch_seconds(space, sizes, threads=int(max(threads, 1)))
        except Exception as exc:  # noqa: BLE001 - a net that cannot be timed here: the table, if it knows them all
            speeds = table_epoch_seconds(space, sizes, threads)
            if speeds is None:
                raise
            print(f"time budget: timing failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                  "planning with benchmarks/RESULTS.md's speeds", flush=True)
    final_threads = final_threads or float(os.cpu_count() or 1)
    final_scale = min(max(threads, 1.0) / max(final_threads, 1.0), 1.0)
    return plan(budget_s, dict(speeds), concurrent, final_epochs, max_epochs=max_epochs, min_grace=min_grace,
                final_scale=final_scale, **given)
