"""Shared fixtures. Each test works in its own temporary folder; the decoded-data cache too."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keep threads low: the suite runs on 2-core CI machines, often beside Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# A decoded-data cache for the whole session, set before any fixture runs: processes started before a
# test's own cache is set (the session's Ray raylet, whose workers decode data for trials) inherit this
# one, never the user's ~/.cache/fer2013. Each test still gets its own (`_isolated_cache`).
os.environ["FER2013_CACHE"] = tempfile.mkdtemp(prefix="fer-test-cache-")
atexit.register(shutil.rmtree, os.environ["FER2013_CACHE"], ignore_errors=True)
# The same for what the project keeps under the user's cache folder (tuning.trials.runner's records of the
# local Rays its drivers started): the suite's own, never the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = os.path.join(os.environ["FER2013_CACHE"], "xdg")

# Precision: `FER_BF16` (auto, on, off; see fer_model.device) reaches every process the suite starts, so
# `FER_BF16=on python -m pytest` runs every training path in bf16 (emulated where not native) and
# `FER_BF16=off` none. Precision-sensitive tests also run both ways themselves (`precision` below).
BF16_MODES = ("on", "off")


@pytest.fixture(params=BF16_MODES, ids=lambda m: f"bf16-{m}")
def precision(request, monkeypatch) -> str:
    """Run the test once with bf16 training forced on (emulated on CPUs without native bf16: slow, but
    the same code path as on a bf16 machine) and once forced off, whatever machine runs it."""
    monkeypatch.setenv("FER_BF16", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FER2013_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("FER2013_DATA", raising=False)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A learnable 7-class folder dataset: 40 train and 8 test images per class."""
    from synthetic import write_folder

    return write_folder(tmp_path_factory.mktemp("tiny") / "fer2013", per_class_train=40, per_class_test=8)
