"""Rotation, scaling and random erasing on whole batches: shape and dtype kept, the same for a seed,
the identity at strength 0, and what each does to an image."""

from __future__ import annotations

import pytest
import torch

from fer_model.augment import augment_batch, augmenting, random_erase, rotate_scale, shift_batch
from fer_model.config import TrainConfig
from fer_model.errors import ConfigError

STRENGTHS = [dict(rotate=15.0), dict(scale=0.2), dict(rotate=10.0, scale=0.1), dict(erase=0.5),
             dict(rotate=10.0, scale=0.1, erase=1.0)]


def batch(dtype=torch.uint8, n=6):
    x = torch.randint(0, 256, (n, 1, 48, 48), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("strength", STRENGTHS, ids=lambda s: ",".join(s))
def test_shape_dtype_kept_and_deterministic_for_a_seed(dtype, strength):
    x = batch(dtype)
    a = augment_batch(x, False, 0, gen(1), **strength)
    b = augment_batch(x, False, 0, gen(1), **strength)
    c = augment_batch(x, False, 0, gen(2), **strength)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)
    if dtype == torch.float32:
        assert a.min() >= 0 and a.max() <= 1  # bilinear mixes and zeros stay within the input's range


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_strength_zero_is_the_identity_and_draws_nothing(dtype):
    x = batch(dtype)
    g = gen(3)
    state = g.get_state()
    assert augment_batch(x, False, 0, g, rotate=0.0, scale=0.0, erase=0.0) is x
    assert rotate_scale(x, 0.0, 0.0, g) is x and random_erase(x, 0.0, g) is x
    assert torch.equal(g.get_state(), state)
    # flip and translate draw the same numbers as before: the new options off leave their results alone.
    assert torch.equal(augment_batch(x, True, 2, gen(4)), augment_batch(x, True, 2, gen(4), rotate=0, scale=0, erase=0))


def test_rotation_by_ninety_degrees_and_zoom():
    # An image turned by exactly 90 degrees is the transposed-and-flipped image (no interpolation).
    x = batch(torch.float32, n=1)
    g = gen(0)
    u = torch.rand(2, 1, generator=gen(0)) * 2 - 1  # what rotate_scale draws first
    out = rotate_scale(x, 90.0 / float(u[0, 0].abs()), 0.0, g)  # an angle of exactly +-90 degrees
    quarter = torch.rot90(x, 1 if u[0, 0] > 0 else -1, dims=(2, 3))
    alt = torch.rot90(x, -1 if u[0, 0] > 0 else 1, dims=(2, 3))
    assert min((out - quarter).abs().max(), (out - alt).abs().max()) < 1e-4
    # A zoom below 1 shrinks the image: its border becomes the zero padding, its centre stays.
    ones = torch.ones(4, 1, 48, 48)
    shrunk = rotate_scale(ones, 0.0, 0.5, gen(5))
    zooms = 1 + (torch.rand(2, 4, generator=gen(5))[1] * 2 - 1) * 0.5
    for i in range(4):
        assert shrunk[i, 0, 24, 24] == pytest.approx(1.0)
        if zooms[i] < 0.9:
            assert shrunk[i, 0, 0, 0] == 0


def test_random_erasing_zeroes_one_rectangle_per_chosen_image():
    x = torch.full((64, 1, 48, 48), 7, dtype=torch.uint8)
    out = random_erase(x, 0.5, gen(6))
    erased = (out == 0)
    hit = erased.flatten(1).any(1)
    assert 10 < int(hit.sum()) < 54  # about half of 64
    assert ((out == 0) | (out == 7)).all()
    for i in torch.nonzero(hit).flatten():
        rows, cols = erased[i, 0].any(1).nonzero().flatten(), erased[i, 0].any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # one rectangle ...
        assert int(erased[i].sum()) == h * w  # ... filled
        assert 0.01 <= h * w / (48 * 48) <= 0.36
    assert (random_erase(x, 1.0, gen(7)) == 0).flatten(1).any(1).all()


def test_shift_batch_moves_each_image_by_its_own_offsets_zero_filled():
    x = batch(n=3)
    dy, dx = torch.tensor([0, 2, -3]), torch.tensor([0, -2, 1])
    out = shift_batch(x, dy, dx, pad=3)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[0], x[0])
    for i in (1, 2):
        y, z = int(dy[i]), int(dx[i])
        assert torch.equal(out[i, 0, 5:40, 5:40], x[i, 0, 5 + y:40 + y, 5 + z:40 + z])  # out[r, c] = x[r + dy, c + dx]
    assert (out[1, 0, -2:] == 0).all() and (out[1, 0, :, :2] == 0).all()  # where image 1 moved away from
    assert (out[2, 0, :3] == 0).all() and (out[2, 0, :, -1:] == 0).all()


def test_the_options_are_validated_train_config_keys():
    cfg = TrainConfig.from_dict({"rotate": 15, "scale": 0.1, "erase": 0.5})
    assert (cfg.rotate, cfg.scale, cfg.erase) == (15.0, 0.1, 0.5) and isinstance(cfg.rotate, float)
    assert augmenting(cfg) and not augmenting(TrainConfig())
    assert TrainConfig().to_dict()["rotate"] == 0.0 and TrainConfig().to_dict()["erase"] == 0.0
    for bad in ({"rotate": -1}, {"rotate": 46}, {"scale": 0.6}, {"erase": 1.5}, {"erase": float("nan")}):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict(bad)


def test_a_checkpoint_from_before_the_options_still_resumes():
    from fer_model.training import _check_resumable

    cfg = TrainConfig()
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("rotate", "scale", "erase")}
    ckpt = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [], "rng": {}, "config": old}
    _check_resumable(cfg, ckpt)  # no error
    with pytest.raises(ConfigError, match="rotate"):
        _check_resumable(cfg.replace(rotate=5), ckpt)


def test_fit_trains_with_the_new_augmentations():
    from fer_model.data import FerData, Split
    from fer_model.training import fit

    g = gen(8)
    def split(n):
        return Split(torch.randint(0, 256, (n, 1, 48, 48), generator=g, dtype=torch.uint8),
                     torch.arange(n) % 7, torch.zeros(n, dtype=torch.int8))
    data = FerData(split(16), split(7), split(7), "synthetic", "x")
    cfg = TrainConfig.from_dict({"arch": "cnn-bn", "width": 0.25, "batch_size": 8, "epochs": 1,
                                 "rotate": 10, "scale": 0.1, "erase": 0.5, "bf16": False})
    a, b = fit(cfg, data, device="cpu").history, fit(cfg, data, device="cpu").history
    assert a[0]["train_loss"] == b[0]["train_loss"]  # the augmentation generator is seeded
    # ... and the augmentations are applied: the same run with their strengths at 0 trains on other pixels.
    plain = fit(cfg.replace(rotate=0.0, scale=0.0, erase=0.0), data, device="cpu").history
    assert plain[0]["train_loss"] != a[0]["train_loss"]
    assert plain[0]["val_loss"] != a[0]["val_loss"]  # so the weights after the epoch differ too
