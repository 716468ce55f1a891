"""The study's CNN: exact parameter count, Model 1's softmax output, the factory."""

import pytest
import torch

from fer_model.config import ModelSpec
from fer_model.errors import ConfigError
from fer_model.model import build_model as build, count_parameters, forward_flops


def build_model(arch: str = "cnn", **options):
    return build(ModelSpec(arch, options))


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
    assert ModelSpec("cnn-softmax").outputs_probabilities and not ModelSpec("cnn").outputs_probabilities
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    assert (p >= 0).all()
    assert m2(x).shape == (5, 7) and not torch.allclose(m2(x).sum(1), torch.ones(5))


def test_unknown_architecture_and_options_are_refused():
    with pytest.raises(ConfigError, match="arch must be one of .*, got 'nope'"):
        ModelSpec("nope")
    with pytest.raises(ConfigError, match="arch cnn takes no option.* depth"):
        ModelSpec("cnn", {"depth": 3})
    with pytest.raises(ConfigError, match="dropout must be in \\[0, 1\\)"):
        ModelSpec("cnn", {"dropout": 1.0})


def test_forward_flops_of_the_study_cnn():
    # 2 x MACs: conv1 9*1*32*48*48, conv2 9*32*64*48*48, conv3 9*64*128*24*24, fc 18432*128 + 128*7.
    macs = 9 * 32 * 2304 + 9 * 32 * 64 * 2304 + 9 * 64 * 128 * 576 + 18432 * 128 + 128 * 7
    assert forward_flops(build_model("cnn")) == 2 * macs
