"""Where training runs: the device, and whether bfloat16 autocast is native (and so fast) there."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from fer_model.errors import ConfigError, first_line


@functools.lru_cache(maxsize=None)
def fast_bf16(device_type: str) -> bool:
    """Whether bfloat16 autocast speeds training up on this kind of device.

    CUDA GPUs (Ampere and later) and x86 CPUs with AVX512-BF16 or AMX run bf16 natively: on a
    2-core AMD EPYC with AVX512-BF16 it trains the study's CNN about 2x faster than fp32.
    Elsewhere bf16 is emulated and slower, so it stays off.
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


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bfloat16 autocast when asked for and native on `device`; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and fast_bf16(device.type))


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
