"""The study's CNN: exact parameter count, Model 1's softmax output, the factory."""

import pytest
import torch

from fer_model.config import ModelSpec
from fer_model.errors import ConfigError
from fer_model.model import build_model as build, count_parameters, forward_flops


def build_model(arch: str = "cnn", **options):
    return build(ModelSpec(arch, options))


def test_default_has_the_studys_parameter_count():
    # The notebook study's count, layer by layer: three 3x3 convolutions (32, 64, 128 channels), a
    # 128-unit layer on the 128 x 12 x 12 map, 7 outputs; weights plus biases.
    conv1, conv2, conv3 = 9 * 1 * 32 + 32, 9 * 32 * 64 + 64, 9 * 64 * 128 + 128
    fc, out = 128 * 12 * 12 * 128 + 128, 128 * 7 + 7
    assert conv1 + conv2 + conv3 + fc + out == 320 + 18_496 + 73_856 + 2_359_424 + 903 == 2_452_999
    assert count_parameters(build_model("cnn")) == 2_452_999
    assert count_parameters(build_model("cnn-softmax")) == 2_452_999


def test_narrow_variants():
    # conv3 64, hidden 64: 320 + 18,496 + 36,928 + 9216*64+64 + 64*7+7
    assert count_parameters(build_model("cnn", conv3_channels=64, hidden=64)) == 320 + 18496 + 36928 + 589888 + 455


def test_count_parameters_of_small_layers_counted_by_hand():
    assert count_parameters(torch.nn.Linear(3, 4)) == 3 * 4 + 4 == 16
    assert count_parameters(torch.nn.Linear(3, 4, bias=False)) == 12
    assert count_parameters(torch.nn.Conv2d(2, 5, 3)) == 3 * 3 * 2 * 5 + 5 == 95
    assert count_parameters(torch.nn.Conv2d(2, 5, (1, 3), bias=False)) == 1 * 3 * 2 * 5 == 30
    # BatchNorm: its weight and bias only (its running statistics are buffers, not parameters).
    assert count_parameters(torch.nn.BatchNorm2d(5)) == 10
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(5 * 4 * 4, 3))
    assert count_parameters(net) == 95 + 10 + 0 + 0 + (80 * 3 + 3) == 348
    shared = torch.nn.Linear(4, 4)  # one layer used twice holds its 20 parameters once
    assert count_parameters(torch.nn.Sequential(shared, torch.nn.Tanh(), shared)) == 20
    assert count_parameters(torch.nn.ReLU()) == 0


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


# --------------------------------------------------------------------------- the added architectures

def _conv(cin, cout, k=3, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def _bn(c):
    return 2 * c


def _expected_parameters(arch):
    """Each network's parameter count written out from its description (width 1.0, default options)."""
    if arch in ("cnn", "cnn-softmax"):
        return 2_452_999
    if arch == "cnn-bn":  # the study's net plus a BatchNorm (weight and bias) per convolution
        return 2_452_999 + _bn(32) + _bn(64) + _bn(128)
    if arch == "vgg":  # 4 stages x 2 conv-BN, 48 -> 3 pixels, FC 4608-4096-4096-7
        chans = [1, 64, 64, 128, 128, 256, 256, 512, 512]
        convs = sum(_conv(a, b, bias=False) + _bn(b) for a, b in zip(chans, chans[1:]))
        return convs + (512 * 9 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 7 + 7)
    if arch == "resnet":  # stem, 4 stages x 2 basic blocks, 1x1 shortcuts where the shape changes, FC
        total, cin = _conv(1, 32, bias=False) + _bn(32), 32
        for c in (32, 64, 128, 256):
            for i in range(2):
                total += _conv(cin, c, bias=False) + _bn(c) + _conv(c, c, bias=False) + _bn(c)
                if cin != c:
                    total += _conv(cin, c, k=1, bias=False) + _bn(c)
                cin = c
        return total + 256 * 7 + 7
    raise AssertionError(arch)


ALL_ARCHS = ["cnn", "cnn-softmax", "cnn-bn", "vgg", "resnet"]
# Small variants for the training and checkpoint tests (seconds on a busy 2-core CPU).
SMALL = {"cnn": {"conv3_channels": 64, "hidden": 64}, "cnn-softmax": {"conv3_channels": 64, "hidden": 64},
         "cnn-bn": {"width": 0.25}, "vgg": {"width": 0.25}, "resnet": {"width": 0.25, "depth": 1}}


def test_every_declared_architecture_is_tested():
    from fer_model.config import ARCHITECTURES

    assert sorted(ARCHITECTURES) == sorted(ALL_ARCHS)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_parameter_count_and_output_shape(arch):
    torch.manual_seed(0)
    model = build_model(arch)
    assert count_parameters(model) == _expected_parameters(arch)  # written out by hand above
    assert forward_flops(model) > 0
    out = model.eval()(torch.rand(2, 1, 48, 48))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_width_and_depth_scale_the_networks():
    assert count_parameters(build_model("cnn-bn", width=1.0)) == _expected_parameters("cnn-bn")
    for arch in ("cnn-bn", "vgg", "resnet"):
        narrow, wider = build_model(arch, width=0.25), build_model(arch, width=0.5)
        assert count_parameters(narrow) < count_parameters(wider) < _expected_parameters(arch)
        assert forward_flops(narrow) < forward_flops(wider)
    for arch in ("vgg", "resnet"):
        shallow, deep = build_model(arch, width=0.25, depth=1), build_model(arch, width=0.25, depth=3)
        assert count_parameters(shallow) < count_parameters(deep)
        assert deep.eval()(torch.rand(1, 1, 48, 48)).shape == (1, 7)
    # Channels are multiples of 8, at least 8.
    convs = [m for m in build_model("resnet", width=0.3).modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 and m.out_channels >= 8 for m in convs)


def test_width_and_depth_are_validated_flat_keys():
    from fer_model.config import TrainConfig, flat_keys

    assert {"width", "depth"} <= set(flat_keys())
    cfg = TrainConfig.from_dict({"arch": "resnet", "width": 0.5, "depth": 3})
    assert cfg.model.options == {"dropout": 0.5, "width": 0.5, "depth": 3}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict({"arch": "vgg", "depth": 2.0}).model.options["depth"] == 2  # YAML / numpy values
    for bad in ({"width": 0.1}, {"width": 3}, {"depth": 0}, {"depth": 5}, {"depth": 1.5}):
        with pytest.raises(ConfigError):
            ModelSpec("resnet", bad)
    with pytest.raises(ConfigError, match="arch cnn-bn takes no option.* depth"):
        ModelSpec("cnn-bn", {"depth": 2})
    # The study's networks take no new option: their flat dicts (MLflow params, checkpoints) are unchanged.
    assert ModelSpec("cnn").to_dict() == {"arch": "cnn", "dropout": 0.5, "conv3_channels": 128, "hidden": 128}


def test_the_train_command_takes_the_new_flags():
    from fer_model.cli import given
    from fer_model.config import TrainConfig, flat_keys
    from fer_model.train import build_parser

    args = build_parser().parse_args(["--arch", "vgg", "--width", "0.5", "--depth", "1", "--rotate", "10",
                                      "--scale", "0.1", "--erase", "0.25"])
    cfg = TrainConfig.from_dict(given(args, flat_keys()))
    assert cfg.model.to_dict() == {"arch": "vgg", "dropout": 0.5, "width": 0.5, "depth": 1}
    assert (cfg.rotate, cfg.scale, cfg.erase) == (10.0, 0.1, 0.25)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(arch):
    torch.manual_seed(0)
    model = build_model(arch, **SMALL[arch], dropout=0.0).train()  # no dropout: the loss is not noisy
    x, y = torch.rand(8, 1, 48, 48), torch.arange(8) % 7
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_checkpoint_round_trip_gives_identical_outputs(arch, tmp_path):
    from fer_model.model import load_network, save_network

    torch.manual_seed(0)
    spec = ModelSpec(arch, SMALL[arch])
    model = build(spec)
    model.train()(torch.rand(4, 1, 48, 48))  # moves BatchNorm's running statistics off their start
    model.eval()
    save_network(model, spec, tmp_path / "net.pt")
    loaded, loaded_spec = load_network(tmp_path / "net.pt")
    assert loaded_spec == spec and not loaded.training
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
