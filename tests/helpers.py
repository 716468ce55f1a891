"""Plain helpers for tests (fixtures live in the conftest.py files)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
SHARED_TARBALL = SHARED_DATA / "fer2013-msambare.tar.gz"
SHARED_CSV_HEAD = SHARED_DATA / "fer2013-csv-head1167.csv.gz"

# Tolerance for class probabilities computed in fp32 by two routes over the same weights (inference is
# always fp32: fer_model.device): each of 7 probabilities, and their sum, within a few fp32 ulps per
# class. A bf16 result would miss it by ~100x (bf16 keeps 8 bits: steps of 2**-8 near 1).
PROB_ATOL = 8 * 7 * float(np.finfo(np.float32).eps)  # 6.7e-6


def requires_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real FER2013 not found at {path} (../shared is absent)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(main, argv) -> int:
    """An entry point as the shell runs it (user errors -> exit 2), but in this process."""
    from fer_model.cli import run_cli

    return run_cli(main, [str(a) for a in argv])


def artifact_names(client, run_id: str, path: str | None = None) -> set[str]:
    return {Path(f.path).name for f in client.list_artifacts(run_id, path)}
