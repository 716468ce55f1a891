"""The study's CNN: exact parameter count, Model 1's softmax output, the factory."""

import pytest
import torch

from fer_model.errors import ConfigError
from fer_model.model import build_model, count_parameters, outputs_probabilities


def test_default_has_the_studys_parameter_count():
    assert count_parameters(build_model("cnn")) == 2_452_999
    assert count_parameters(build_model("cnn-softmax")) == 2_452_999


def test_narrow_variants():
    # conv3 64, hidden 64: 320 + 18,496 + 36,928 + 9216*64+64 + 64*7+7
    assert count_parameters(build_model("cnn", conv3_channels=64, hidden=64)) == 320 + 18496 + 36928 + 589888 + 455


def test_model1_outputs_sum_to_one_and_model2_gives_logits():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 48, 48)
    m1, m2 = build_model("cnn-softmax").eval(), build_model("cnn").eval()
    p = m1(x)
    assert outputs_probabilities(m1) and not outputs_probabilities(m2)
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    assert (p >= 0).all()
    assert m2(x).shape == (5, 7) and not torch.allclose(m2(x).sum(1), torch.ones(5))


def test_unknown_architecture():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet'"):
        build_model("resnet")
