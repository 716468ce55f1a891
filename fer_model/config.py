"""The typed configs: what data to use (`DataConfig`), which network (`ModelSpec`), how to train it
(`TrainConfig`). Plain Python, no torch: command lines parse and check them before anything heavy loads.

Tune's config dict, a preset, a search-space file and parsed flags are all *flat* dicts
(``{"arch": "cnn", "dropout": 0.3, "lr": 1e-3, ...}``); `TrainConfig.from_dict` is the one place
such a dict becomes a config, and `to_dict` gives the same flat dict back (MLflow params, checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from fer_model.errors import ConfigError


def finite(x: Any) -> bool:
    """Whether `x` is a finite number (bools are not numbers here)."""
    if isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _integer(x: Any) -> bool:
    return finite(x) and float(x) == int(float(x))


# --------------------------------------------------------------------------- data

# The original CSV numbering. The Kaggle folders sort alphabetically (neutral before sad), so
# mapping folders by position would silently swap Sad and Neutral.
CLASS_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 48
# Decoded sources kept in the data cache (about 83 MB each for the full set); older ones are dropped.
DEFAULT_CACHE_MAX = 4


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to split it."""

    path: str | None = None
    val_fraction: float = 0.1
    max_samples: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    cache_max: int = DEFAULT_CACHE_MAX  # cache entries kept, least recently used dropped beyond it

    def __post_init__(self) -> None:
        if not finite(self.val_fraction) or not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.seed < 0:
            raise ConfigError(f"the data seed must be >= 0, got {self.seed}")
        if self.max_samples is not None and self.max_samples < 2 * NUM_CLASSES:
            raise ConfigError(f"max_samples must be at least {2 * NUM_CLASSES}, got {self.max_samples}")
        if not _integer(self.cache_max) or self.cache_max < 1:
            raise ConfigError(f"cache_max must be an integer >= 1, got {self.cache_max}")
        object.__setattr__(self, "cache_max", int(self.cache_max))  # YAML and numpy may hand over 4.0


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Option:
    """One option an architecture takes: its default, and the rule every value must follow."""

    default: Any
    rule: str  # shown in errors and --help, e.g. "one of 128, 64"
    check: Callable[[Any], bool]
    help: str = ""

    @property
    def kind(self) -> type:
        return type(self.default)

    def normalise(self, name: str, value: Any) -> Any:
        """`value` checked and cast to the option's type (Tune and YAML hand over numpy and str values)."""
        ok = _integer(value) if self.kind is int else finite(value) if self.kind is float else True
        if not ok or not self.check(value):
            raise ConfigError(f"{name} must be {self.rule}, got {value!r}")
        return self.kind(value)


def _choices(*values: Any, help: str = "") -> Option:
    return Option(values[0], "one of " + ", ".join(map(str, values)), lambda v: v in values, help)


DROPOUT = Option(0.5, "in [0, 1)", lambda v: 0 <= v < 1, "dropout before the classifier's last layer")
# Channels (and hidden units) are scaled by `width` and rounded to a multiple of 8, at least 8.
# Up to 2: the VGG's parameters grow with width squared (40M at 1.0, about 160M at 2.0).
WIDTH = Option(1.0, "in [0.25, 2]", lambda v: 0.25 <= v <= 2, "channel width multiplier (x8 rounded)")
DEPTH = Option(2, "an integer within 1..4", lambda v: 1 <= v <= 4,
               "blocks per stage (vgg: conv-BN-ReLU, resnet: basic blocks)")


@dataclass(frozen=True)
class Architecture:
    """An architecture's name, the options it takes (declared and checked here, once) and its output."""

    name: str
    options: Mapping[str, Option]
    description: str
    outputs_probabilities: bool = False  # ends in Softmax: predictions must not apply it again


_STUDY_OPTIONS = {
    "dropout": DROPOUT,
    "conv3_channels": _choices(128, 64, help="width of the third convolution"),
    "hidden": _choices(128, 64, help="hidden units of the classifier"),
}

_DEEP_OPTIONS = {"dropout": DROPOUT, "width": WIDTH, "depth": DEPTH}

# The networks `fer_model.model.build_model` can build, by name; `model.py` holds their modules.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("cnn", _STUDY_OPTIONS, "the study's CNN, logits out (its Model 2)"),
    Architecture("cnn-softmax", _STUDY_OPTIONS, "the study's CNN ending in Softmax (its Model 1)",
                 outputs_probabilities=True),
    Architecture("cnn-bn", {**_STUDY_OPTIONS, "width": WIDTH}, "the study's CNN with BatchNorm after every convolution"),
    Architecture("vgg", _DEEP_OPTIONS, "VGG-style, 4 stages of conv3x3-BN-ReLU x depth + max-pool "
                 "(64-512 channels), FC 4096-4096 with dropout (after Khaireddin & Chen 2021)"),
    Architecture("resnet", _DEEP_OPTIONS, "ResNet-style, 4 stages of depth basic blocks (32-256 channels), "
                 "global average pool, dropout, FC"),
)}
DEFAULT_ARCH = "cnn"


def model_option_names() -> list[str]:
    """Every option any architecture takes (for command-line flags and space validation)."""
    return sorted({name for a in ARCHITECTURES.values() for name in a.options})


def option(name: str) -> Option:
    """The declaration of option `name` (the first architecture that takes it)."""
    return next(a.options[name] for a in ARCHITECTURES.values() if name in a.options)


@dataclass(frozen=True)
class ModelSpec:
    """A network: its architecture's name and that architecture's options, defaults filled in."""

    arch: str = DEFAULT_ARCH
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        declared = self.architecture.options
        unknown = sorted(set(self.options) - set(declared))
        if unknown:
            raise ConfigError(f"arch {self.arch} takes no option(s) {', '.join(unknown)} "
                              f"(its options: {', '.join(sorted(declared))})")
        values = {name: opt.normalise(name, self.options.get(name, opt.default)) for name, opt in declared.items()}
        object.__setattr__(self, "options", values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelSpec":
        """From a flat dict: ``arch`` plus the architecture's options."""
        values = dict(values)
        return cls(str(values.pop("arch", DEFAULT_ARCH)), values)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **self.options}

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def outputs_probabilities(self) -> bool:
        return self.architecture.outputs_probabilities

    def describe(self) -> str:
        opts = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.options.items())
        return f"{self.arch} ({opts})" if opts else self.arch


# --------------------------------------------------------------------------- training

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
# "step", "cosine" and "onecycle" set the lr every optimizer step; "plateau" once an epoch, from validation accuracy.
SCHEDULES = ("none", "step", "cosine", "onecycle", "plateau")
# Test-time augmentation: class probabilities averaged over views of each image (`fer_model.inputs`).
TTA_MODES = ("none", "flip", "tencrop")


def check_tta(tta: str) -> str:
    """`tta` if it is a test-time augmentation this package knows, else a ConfigError."""
    if tta not in TTA_MODES:
        raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    return tta


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run: the network and the hyperparameters Tune searches over."""

    model: ModelSpec = field(default_factory=ModelSpec)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 10
    schedule: str = "none"
    warmup: int = 0  # epochs of linear lr warm-up (per step, 1/steps to 1) times the schedule's factor; 0 = off
    label_smoothing: float = 0.0
    flip: bool = False
    translate: int = 0
    rotate: float = 0.0  # degrees: each image turned by up to +-rotate (0 = off)
    scale: float = 0.0  # fraction: each image zoomed by a factor in [1 - scale, 1 + scale] (0 = off)
    erase: float = 0.0  # probability that an image gets one random rectangle zeroed (0 = off)
    # Decay of an exponential moving average of the weights kept during training (e.g. 0.999; 0 = off):
    # validated beside the raw weights every epoch, the better of the two kept (`fer_model.training.fit`).
    ema: float = 0.0
    seed: int = 0
    bf16: bool = True  # training under bfloat16 autocast where native (`device.training_bf16`); inference is always fp32
    channels_last: bool = True  # measured faster on CPU too (see benchmarks/RESULTS.md)

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (finite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}"),
            (finite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (_integer(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size}"),
            (_integer(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs}"),
            (_integer(self.warmup) and _integer(self.epochs) and 0 <= float(self.warmup) <= float(self.epochs),
             f"warmup must be an integer within 0..epochs ({self.epochs}), got {self.warmup}"),
            (_integer(self.translate) and 0 <= self.translate <= 16,
             f"translate must be an integer within 0..16 pixels, got {self.translate}"),
            (finite(self.rotate) and 0 <= self.rotate <= 45, f"rotate must be in [0, 45] degrees, got {self.rotate}"),
            (finite(self.scale) and 0 <= self.scale <= 0.5, f"scale must be in [0, 0.5], got {self.scale}"),
            (finite(self.erase) and 0 <= self.erase <= 1, f"erase must be a probability in [0, 1], got {self.erase}"),
            (finite(self.ema) and 0 <= self.ema < 1, f"ema must be a decay in [0, 1) (0 = off), got {self.ema}"),
            (_integer(self.seed), f"seed must be an integer, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        # Tune and YAML hand over numpy values; normalise so params and checkpoints are clean.
        for name in ("batch_size", "epochs", "warmup", "translate", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("lr", "weight_decay", "label_smoothing", "rotate", "scale", "erase", "ema"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def training_keys(cls) -> list[str]:
        """The flat keys that are training options (everything else in a flat dict is the model's)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "model"]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """The one conversion from a flat dict (Tune's config, a preset, flags); unknown keys are errors.

        Unknown keys are refused rather than ignored: a typo in a search space or preset would
        otherwise silently train the default and report it as the value the user asked for.
        """
        training = set(cls.training_keys())
        model_values = {k: v for k, v in values.items() if k not in training}
        arch = model_values.get("arch", DEFAULT_ARCH)
        if arch in ARCHITECTURES:
            unknown = sorted(set(model_values) - {"arch"} - set(ARCHITECTURES[arch].options))
            if unknown:
                known = sorted(training | {"arch"} | set(ARCHITECTURES[arch].options))
                raise ConfigError(f"unknown TrainConfig key(s) for arch {arch}: {', '.join(unknown)} "
                                  f"(known: {', '.join(known)})")
        return cls(model=ModelSpec.from_dict(model_values), **{k: v for k, v in values.items() if k in training})

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "TrainConfig":
        """The config whose `to_dict()` was written as strings (a trial run's MLflow params), exactly:
        each value is read back as its key's type (``str`` of a float round-trips; ``"False"`` is False).
        Unknown keys are refused, as by `from_dict`."""
        defaults = cls()
        arch = params.get("arch", DEFAULT_ARCH)
        kinds = {name: opt.kind for name, opt in ARCHITECTURES[arch].options.items()} if arch in ARCHITECTURES else {}
        kinds.update({name: type(getattr(defaults, name)) for name in cls.training_keys()})

        def typed(key: str, text: str) -> Any:
            kind = kinds.get(key, str)
            if kind is bool:
                if text not in ("True", "False"):
                    raise ConfigError(f"{key} must be True or False, got {text!r}")
                return text == "True"
            if kind is int and finite(text) and float(text) == int(float(text)):
                return int(float(text))
            return kind(text) if kind is float and finite(text) else text  # else from_dict names the bad value

        return cls.from_dict({k: typed(k, v) for k, v in params.items()})

    def to_dict(self) -> dict[str, Any]:
        """The flat dict `from_dict` reads back."""
        return {**self.model.to_dict(), **{k: getattr(self, k) for k in self.training_keys()}}

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some flat keys changed (model options included)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def flat_keys() -> list[str]:
    """Every key a flat training dict may hold, for any architecture."""
    return ["arch", *model_option_names(), *TrainConfig.training_keys()]
