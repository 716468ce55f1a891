"""Where training runs: the device, and whether training uses bfloat16 autocast there.

Precision has one rule. **Training** may use bf16 autocast (a speed-up where the hardware has it
natively); **inference** (validation, evaluation, TTA, ensembles, the registered model, prediction,
serving) always computes in fp32, so one set of weights gives the same probabilities on every
machine: a model promoted on a CPU with native bf16 scores the same on one without.

The environment variable ``FER_BF16`` overrides where training uses bf16, for tests and diagnosis:
``auto`` (the default) where native, ``on`` everywhere (emulated where not native: slower, same
code path), ``off`` nowhere. A config with ``bf16=False`` (``--no-bf16``) never uses it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from fer_model.errors import ConfigError, first_line

BF16_ENV = "FER_BF16"
BF16_MODES = ("auto", "on", "off")


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether this kind of device runs bfloat16 natively (and so fast).

    CUDA GPUs (Ampere and later) and x86 CPUs with AVX512-BF16 or AMX do: on a 2-core AMD EPYC with
    AVX512-BF16 it trains the study's CNN about 2x faster than fp32. Elsewhere bf16 is emulated and
    slower than fp32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def bf16_mode() -> str:
    """``FER_BF16`` (auto, on, off; unset is auto); another value is a ConfigError."""
    mode = os.environ.get(BF16_ENV, "auto").strip().lower() or "auto"
    if mode not in BF16_MODES:
        raise ConfigError(f"{BF16_ENV}={os.environ[BF16_ENV]!r}: use one of {', '.join(BF16_MODES)}")
    return mode


def training_bf16(device_type: str, requested: bool = True) -> bool:
    """Whether training on `device_type` runs under bf16 autocast: when `requested` (the config's
    ``bf16``) and native there, or everywhere with ``FER_BF16=on``, nowhere with ``FER_BF16=off``."""
    mode = bf16_mode()
    if not requested or mode == "off":
        return False
    return mode == "on" or native_bf16(device_type)


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """The training step's autocast: bfloat16 where `training_bf16` says so, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=training_bf16(device.type, bf16))


def fp32() -> contextlib.AbstractContextManager:
    """Inference's context: autocast off on every device type, also inside a caller's autocast (a
    validation pass run from a bf16 training loop), so outputs are fp32 computed in fp32."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device called `name` (cpu, cuda, cuda:N), or the default; one that is not here is a ConfigError."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r}: {first_line(exc)}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {name!r}: no such CUDA device here")
    return device
