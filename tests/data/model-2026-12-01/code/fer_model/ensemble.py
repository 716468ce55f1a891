"""Ensembles: several networks' class probabilities averaged, and how many members to keep.

Members are ranked before they get here (the tuning stage ranks trials by validation accuracy);
`choose_size` then decides on validation data only how many of the ranked members to keep, so the
test set never picks the ensemble it is used to measure.
"""

from __future__ import annotations

from typing import Sequence

import torch


def average(probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    """The members' mean class probabilities: (N, C) from K tensors of (N, C)."""
    if not probabilities:
        raise ValueError("an ensemble needs at least one member")
    return torch.stack([p.float() for p in probabilities]).mean(dim=0)


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of (N, C) probabilities against (N,) labels."""
    return (probabilities.argmax(dim=1) == labels.to(probabilities.device)).float().mean().item()


def choose_size(val_probabilities: Sequence[torch.Tensor], val_labels: torch.Tensor) -> tuple[int, list[float]]:
    """How many of the ranked members to keep: add them in rank order while the averaged validation
    accuracy rises (strictly); returns that count and the accuracy of every prefix tried.

    Greedy and in rank order, as `--ensemble auto` promises: a member that does not help ends the
    ensemble, rather than a search over subsets that would overfit the validation split.
    """
    tried: list[float] = []
    best_k, best = 0, -1.0
    for k in range(1, len(val_probabilities) + 1):
        acc = accuracy(average(val_probabilities[:k]), val_labels)
        tried.append(acc)
        if acc > best:
            best_k, best = k, acc
        else:
            break
    return best_k, tried
