"""Building typed configs from plain dicts (Tune's config, a preset, parsed flags)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from fer_model.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build dataclass `cls` from `values`, rejecting keys it does not have.

    Unknown keys are an error rather than ignored: a typo in a search space or preset would
    otherwise silently train the default and report it as the value the user asked for.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
        )
    return cls(**dict(values))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The flat dict of a config dataclass (for params, checkpoints and presets)."""
    return dataclasses.asdict(cfg)
