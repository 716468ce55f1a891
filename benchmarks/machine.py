"""The machine a benchmark ran on, printed and recorded beside every figure: the CPU, its cores, and
whether it has native bf16 (AVX512-BF16 or AMX), which decides the trainer's precision on a CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_flags() -> dict[str, object]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return {"cpu": model or "unknown", "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}
