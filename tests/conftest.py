"""Shared fixtures. Each test works in its own temporary folder; the decoded-data cache too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep threads low: the suite runs on 2-core CI machines, often beside Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FER2013_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("FER2013_DATA", raising=False)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A learnable 7-class folder dataset: 40 train and 8 test images per class."""
    from synthetic import write_folder

    return write_folder(tmp_path_factory.mktemp("tiny") / "fer2013", per_class_train=40, per_class_test=8)
