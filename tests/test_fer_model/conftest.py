"""Fixtures of the fer_model tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fer_model import data as D


@pytest.fixture(scope="module")
def small():
    """Learnable like `tiny` but a quarter of its size (56 train, 28 validation images): fast epochs."""
    from synthetic import make_images

    def split(per_class: int, seed: int) -> D.Split:
        labels = np.repeat(np.arange(7), per_class)
        return D.Split(torch.from_numpy(make_images(labels, seed))[:, None], torch.from_numpy(labels),
                       torch.zeros(len(labels), dtype=torch.int8))

    return D.FerData(split(8, 0), split(4, 1), split(4, 2), "synthetic", "small")
