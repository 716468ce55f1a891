"""Architectures by name. `build_model` is the one factory, so search spaces can include `arch`.

* ``cnn``          the study's "Model 2": logits out (the default).
* ``cnn-softmax``  the study's "Model 1": the same net ending in Softmax, whose probabilities the
                   study fed to CrossEntropyLoss (so softmax is applied twice): 54.22% vs 57.72%.
"""

from __future__ import annotations

import torch
from torch import nn

from fer_model.data import IMAGE_SIZE, NUM_CLASSES
from fer_model.errors import ConfigError


class StudyCNN(nn.Module):
    """Conv(1→32)–ReLU–Conv(32→64)–ReLU–Pool–Conv(64→C3)–ReLU–Pool–FC(C3·12·12→H)–ReLU–Dropout–FC(H→7).

    With C3 = H = 128 it has exactly the study's 2,452,999 parameters. Input: float (B, 1, 48, 48)
    scaled to [0, 1].
    """

    def __init__(self, dropout: float = 0.5, conv3_channels: int = 128, hidden: int = 128, softmax_output: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, conv3_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = IMAGE_SIZE // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(conv3_channels * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.softmax_output = softmax_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.features(x))
        return out.softmax(dim=1) if self.softmax_output else out


ARCHITECTURES = ("cnn", "cnn-softmax")
CONV3_CHOICES = (128, 64)
HIDDEN_CHOICES = (128, 64)


def build_model(arch: str = "cnn", dropout: float = 0.5, conv3_channels: int = 128, hidden: int = 128) -> nn.Module:
    """The network called `arch`, with the study's width options."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    if conv3_channels not in CONV3_CHOICES or hidden not in HIDDEN_CHOICES:
        raise ConfigError(f"conv3_channels must be in {CONV3_CHOICES} and hidden in {HIDDEN_CHOICES}")
    return StudyCNN(dropout, conv3_channels, hidden, softmax_output=arch == "cnn-softmax")


def outputs_probabilities(model: nn.Module) -> bool:
    """True when the model already ends in Softmax (Model 1); predictions must not re-apply it."""
    return bool(getattr(model, "softmax_output", False))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
