"""benchmarks/gpu_packing.py and benchmarks/gpu_session.sh need a GPU to measure anything: here, that
they parse, and that without a GPU (or its packages) they end at once in one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmarks would run for minutes")


def test_gpu_packing_answers_help():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_packing.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--shares" in proc.stdout and "--data" in proc.stdout


@no_gpu
def test_gpu_packing_without_a_gpu_is_one_line(tiny_folder):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_packing.py", "--data", str(tiny_folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: no CUDA GPU here (torch.cuda.is_available() is False); this benchmark measures GPU packing"]


@no_gpu
def test_gpu_session_without_a_gpu_is_one_line(tiny_folder, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(tiny_folder)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: torch sees no CUDA GPU here (torch.cuda.is_available() is False)"]
    assert (tmp_path / "out" / "summary.txt").read_text().strip() == proc.stderr.strip()
