"""Ensembles: probabilities averaged, accuracy, and how many ranked members `choose_size` keeps."""

from __future__ import annotations

import pytest
import torch

from fer_model.config import ConfigError, TrainConfig
from fer_model.ensemble import accuracy, average, choose_size


def test_average_is_the_mean_of_the_members_probabilities_and_can_change_the_label():
    a = torch.tensor([[0.6, 0.4, 0.0], [0.2, 0.8, 0.0]])
    b = torch.tensor([[0.2, 0.2, 0.6], [0.4, 0.6, 0.0]])
    mean = average([a, b])
    assert torch.allclose(mean, torch.tensor([[0.4, 0.3, 0.3], [0.3, 0.7, 0.0]]))
    labels = torch.tensor([0, 1])
    # Alone, b gets image 0 wrong (class 2); averaged with a, class 0 wins.
    assert accuracy(a, labels) == 1.0 and accuracy(b, labels) == 0.5 and accuracy(mean, labels) == 1.0
    assert torch.equal(average([a]), a)  # one member: its own probabilities, exactly
    with pytest.raises(ValueError):
        average([])


def test_choose_size_adds_members_while_validation_accuracy_rises_and_stops_at_the_first_that_does_not():
    labels = torch.tensor([0, 1, 1, 0])
    # Member 1 gets images 0 and 1 right (50%). Member 2 is sure about images 2 and 3 and unsure about 0 and 1:
    # averaged with member 1, all four right (100%). Member 3 is sure and wrong about image 0 (three averaged: 75%),
    # and member 4 would be perfect: it is never tried, since member 3 ended the ensemble.
    m1 = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.2, 0.8]])
    m2 = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0]])
    m3 = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    m4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert accuracy(average([m1, m2]), labels) == 1.0
    size, tried = choose_size([m1, m2, m3, m4], labels)
    assert size == 2 and tried == pytest.approx([0.5, 1.0, 0.75])
    # A member that leaves the accuracy where it was does not join (strictly rising).
    assert choose_size([m1, m1, m2], labels) == (1, pytest.approx([0.5, 0.5]))
    assert choose_size([m1], labels) == (1, pytest.approx([0.5]))


def test_a_config_reads_back_exactly_from_its_params_as_strings():
    cfg = TrainConfig.from_dict({"arch": "cnn-bn", "width": 0.75, "dropout": 0.41234567890123, "lr": 3.2e-4, "batch_size": 64,
                                 "flip": True, "bf16": False, "translate": 2, "weight_decay": 1.5e-6, "schedule": "cosine"})
    params = {k: str(v) for k, v in cfg.to_dict().items()}  # as MLflow stores a trial run's params
    assert TrainConfig.from_params(params) == cfg
    assert TrainConfig.from_params(params).flip is True and TrainConfig.from_params(params).bf16 is False
    with pytest.raises(ConfigError, match="flip must be True or False"):
        TrainConfig.from_params({**params, "flip": "yes"})
    with pytest.raises(ConfigError, match="unknown TrainConfig key"):
        TrainConfig.from_params({**params, "colour": "red"})
