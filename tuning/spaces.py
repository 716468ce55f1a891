"""The grid and the search spaces, as data, and their conversion to Ray Tune.

Named spaces (`--space default`, `--space strong`, `--space laptop`) are `NAMED_SPACES`; any other `--space` is a file.

A space file (YAML or JSON) maps TrainConfig fields to one of:
    {"choice": [v1, v2, ...]}   {"uniform": [low, high]}   {"loguniform": [low, high]}
    {"randint": [low, high]}    a plain value (held fixed)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fer_model.config import TrainConfig, flat_keys, model_option_names, option
from fer_model.errors import ConfigError
from fer_model.presets import STUDY_PROTOCOL

# The study's grid: dropout x learning rate, everything else as in the study, 10 epochs a trial.
STUDY_GRID: dict[str, list[Any]] = {"dropout": [0.3, 0.5, 0.7], "lr": [1e-3, 1e-2, 1e-4]}
GRID_FIXED: dict[str, Any] = {**STUDY_PROTOCOL, "arch": "cnn", "epochs": 10}
# The study's 10-epoch grid, measured on its test set (its results, beside its grid) (it had no validation split).
STUDY_GRID_TEST_ACC = {
    (0.3, 1e-3): 0.5730, (0.3, 1e-2): 0.4203, (0.3, 1e-4): 0.5295,
    (0.5, 1e-3): 0.5598, (0.5, 1e-2): 0.2471, (0.5, 1e-4): 0.5159,
    (0.7, 1e-3): 0.5626, (0.7, 1e-2): 0.2471, (0.7, 1e-4): 0.5028,
}

# The study's next steps: batch size and optimizer, with lr, dropout and weight decay.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "batch_size": {"choice": [32, 64, 128, 256]},
    "optimizer": {"choice": ["adam", "adamw", "sgd", "rmsprop"]},
    "lr": {"loguniform": [1e-4, 1e-2]},
    "dropout": {"uniform": [0.2, 0.7]},
    "weight_decay": {"loguniform": [1e-6, 1e-3]},
}
SEARCH_FIXED: dict[str, Any] = {**STUDY_PROTOCOL, "arch": "cnn"}  # epochs: --epochs

# `--space strong`: what the published FER2013 recipes vary (Khaireddin & Chen 2021: a VGG with
# BatchNorm, SGD with Nesterov momentum, a plateau schedule, shifts, flips, rotation, scaling and
# random erasing). Architectures that share their options only (vgg and resnet both take width and
# depth; cnn-bn takes no depth): a space cannot be conditional. Widths up to 1: vgg at width 1 is
# 40M parameters and 1 GFLOP an image, resnet at width 0.5 depth 1 under 0.2 GFLOP.
STRONG_SEARCH_SPACE: dict[str, Any] = {
    "arch": {"choice": ["resnet", "vgg"]},
    "width": {"choice": [0.5, 0.75, 1.0]},
    "depth": {"choice": [1, 2]},
    "optimizer": {"choice": ["sgd", "adamw"]},
    "lr": {"loguniform": [3e-4, 5e-2]},
    "weight_decay": {"loguniform": [1e-5, 1e-3]},
    "batch_size": {"choice": [64, 128]},
    "dropout": {"uniform": [0.1, 0.5]},
    "flip": True,
    "translate": {"choice": [2, 4]},
    "rotate": {"uniform": [0.0, 15.0]},
    "scale": {"uniform": [0.0, 0.2]},
    "erase": {"uniform": [0.0, 0.5]},
    "label_smoothing": {"uniform": [0.0, 0.15]},
    "schedule": {"choice": ["cosine", "onecycle", "plateau"]},
    "warmup": {"choice": [0, 2]},
}


# benchmarks/recipe-vgg-cpu.yaml, the CPU accuracy recipe (66.17% test in 40 epochs on 2 fp32 cores,
# docs/results.md), as the flat config it trains (a test checks it against the file).
VGG_CPU_RECIPE: dict[str, Any] = {
    "arch": "vgg", "width": 0.25, "depth": 2, "dropout": 0.3, "optimizer": "adamw", "lr": 0.002,
    "weight_decay": 0.0005, "batch_size": 64, "schedule": "onecycle", "label_smoothing": 0.1,
    "flip": True, "translate": 3, "rotate": 10.0, "scale": 0.1,
}

# `--space laptop`: the nets that train fast on 2 fp32 CPU cores (benchmarks/arch_speed.py, RESULTS.md:
# vgg width 0.25 415 img/s, resnet width 0.25 396; cnn-bn 113, vgg 0.5 113), around the CPU recipe's
# ingredients. Width is held at 0.25: a space cannot be conditional, and width 0.5 would bring in vgg 0.5
# and resnet 0.5 depth 2 (113 and 180 img/s) besides resnet 0.5 depth 1 (399). Depth 1 only makes a net
# faster. The recipe (`VGG_CPU_RECIPE`) is its first trial.
LAPTOP_SEARCH_SPACE: dict[str, Any] = {
    "arch": {"choice": ["vgg", "resnet"]},
    "width": 0.25,
    "depth": {"choice": [1, 2]},
    "optimizer": {"choice": ["adamw", "sgd"]},
    "lr": {"loguniform": [5e-4, 1e-2]},
    "weight_decay": {"loguniform": [1e-5, 2e-3]},
    "batch_size": {"choice": [64, 128]},
    "dropout": {"uniform": [0.1, 0.5]},
    "flip": True,
    "translate": {"choice": [2, 3, 4]},
    "rotate": {"uniform": [0.0, 15.0]},
    "scale": {"uniform": [0.0, 0.2]},
    "erase": {"uniform": [0.0, 0.3]},
    "label_smoothing": {"uniform": [0.0, 0.15]},
    "schedule": {"choice": ["onecycle", "cosine"]},
    "ema": {"choice": [0.0, 0.999]},
}


@dataclass(frozen=True)
class NamedSpace:
    """A search space shipped with the project (`--space NAME`), with the trial length and ASHA grace
    period it is meant for (flags override both), and the configurations its search tries first
    (`start_points`: flat configs inside the space, e.g. a shipped recipe)."""

    space: dict[str, Any]
    epochs: int
    grace_period: int
    start_points: tuple[dict[str, Any], ...] = ()


NAMED_SPACES: dict[str, NamedSpace] = {
    "default": NamedSpace(DEFAULT_SEARCH_SPACE, epochs=15, grace_period=2),  # = flags.DEFAULT_SEARCH_EPOCHS
    # Augmented nets learn slowly at first: 5 epochs before ASHA may stop one, 30 in all.
    "strong": NamedSpace(STRONG_SEARCH_SPACE, epochs=30, grace_period=5),
    # ASHA rungs 3 -> 9 -> 27 at most (a time budget may plan fewer: tuning.budget); the recipe first.
    "laptop": NamedSpace(LAPTOP_SEARCH_SPACE, epochs=27, grace_period=3, start_points=(VGG_CPU_RECIPE,)),
}

_KINDS = ("choice", "uniform", "loguniform", "randint")
_CHOICE_ONLY = {"conv3_channels", "hidden"}  # a few allowed widths, not a range


def load_space(path: str | Path, epochs: int | None = None) -> dict[str, Any]:
    """Read and validate a space file (for trials of `epochs`); any problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read space file {str(path)!r}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            space = json.loads(text)
        else:
            import yaml

            space = _numbers(yaml.safe_load(text))
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"space file {path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {exc}".splitlines()[0]) from None
    try:
        return validate_space(space, epochs)
    except ConfigError as exc:
        raise ConfigError(f"space file {path}: {exc}") from None


def _numbers(obj: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a space file means the number."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    if isinstance(obj, str):
        try:
            return float(obj) if obj.strip().lower() not in ("nan", "inf", "-inf", "infinity") else obj
        except ValueError:
            return obj
    return obj


def validate_space(space: Any, epochs: int | None = None) -> dict[str, Any]:
    """Check every key is a TrainConfig field and every range is possible; returns the space.

    `epochs`: the trials' (values such as ``warmup`` are bounded by it); None checks with TrainConfig's default.
    """
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("a space must be a non-empty mapping of TrainConfig fields to distributions")
    fields = set(flat_keys()) - {"epochs"}
    # Model options depend on the architecture: each value must suit every arch the space can produce
    # (a trial with arch cnn and a width would be refused when it starts, hours in).
    arch = space.get("arch", TrainConfig().to_dict()["arch"])
    archs = arch["choice"] if isinstance(arch, Mapping) and isinstance(arch.get("choice"), list) else [arch]
    for key, spec in space.items():
        if key == "epochs":
            raise ConfigError("epochs is not searched: set it with --epochs (ASHA's horizon follows it)")
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} (known: {', '.join(sorted(fields))})")
        if isinstance(spec, Mapping):
            if len(spec) != 1 or next(iter(spec)) not in _KINDS:
                raise ConfigError(f"{key}: give exactly one of {', '.join(_KINDS)}, got {dict(spec)}")
            kind, values = next(iter(spec.items()))
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{key}: {kind} needs a non-empty list")
            if kind != "choice":
                if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    raise ConfigError(f"{key}: {kind} needs [low, high] numbers, got {values}")
                low, high = values
                if not low < high:
                    raise ConfigError(f"{key}: {kind} range [{low}, {high}] is empty (low must be < high)")
                if kind == "loguniform" and low <= 0:
                    raise ConfigError(f"{key}: loguniform needs low > 0, got {low}")
                if kind != "randint" and _is_int_field(key):
                    raise ConfigError(f"{key} takes integers: use choice or randint, not {kind}")
                if kind == "randint" and (not _is_int_field(key) or key in _CHOICE_ONLY):
                    raise ConfigError(f"{key}: randint does not fit it; use choice")
            # Every value the space can produce must make a valid TrainConfig.
            for v in values:
                _check_value(key, v, archs, epochs)
        else:
            _check_value(key, spec, archs, epochs)
    return dict(space)


def outside(config: Mapping[str, Any], space: Mapping[str, Any]) -> list[str]:
    """The keys of `space` whose value in `config` (defaults filled in) the space cannot produce."""
    full = TrainConfig.from_dict(config).to_dict()
    keys = []
    for key, spec in space.items():
        value = full[key]
        if not isinstance(spec, Mapping):
            inside = value == spec
        else:
            kind, values = next(iter(spec.items()))
            inside = (value in values if kind == "choice" else values[0] <= value < values[1] if kind == "randint"
                      else values[0] <= value <= values[1])
        if not inside:
            keys.append(key)
    return keys


def _is_int_field(key: str) -> bool:
    default = {**TrainConfig().to_dict(), **_all_option_defaults()}[key]
    return isinstance(default, int) and not isinstance(default, bool)


def _all_option_defaults() -> dict[str, Any]:
    return {name: option(name).default for name in model_option_names()}


def _check_value(key: str, value: Any, archs: list[Any], epochs: int | None = None) -> None:
    for arch in archs if key != "arch" else [value]:
        try:
            TrainConfig.from_dict({"arch": arch, key: value, **({"epochs": epochs} if epochs is not None else {})})
        except (ConfigError, TypeError, ValueError, OverflowError) as exc:
            suffix = f" with arch {arch}" if key != "arch" and len(archs) > 1 else ""
            raise ConfigError(f"{key}: value {value!r} is not allowed{suffix} ({exc})") from None
