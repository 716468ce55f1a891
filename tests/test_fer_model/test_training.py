"""fit(): it learns, it is deterministic, it resumes exactly, it reports divergence as a result."""

from __future__ import annotations

import math

import pytest
import torch

from fer_model import data as D
from fer_model import metrics as M
from fer_model.augment import augment_batch
from fer_model.errors import ConfigError
from fer_model.config import TrainConfig
from fer_model.training import fit, load_checkpoint, lr_factor, make_optimizer, save_checkpoint

def config(**values) -> TrainConfig:
    """A config from flat keys, as Tune and presets give them."""
    return TrainConfig.from_dict(values)


FAST = dict(batch_size=32, lr=2e-3, dropout=0.3, conv3_channels=64, hidden=64)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return D.load(D.DataConfig(path=str(tiny_folder), val_fraction=0.25), progress=False)


def test_a_short_run_really_learns(tiny):
    seen = []
    result = fit(config(epochs=6, **FAST), tiny, on_epoch=lambda r: seen.append(r.epoch), device="cpu")
    assert result.status == "completed" and seen == [1, 2, 3, 4, 5, 6]
    first, last = result.history[0], result.history[-1]
    assert set(M.EPOCH_METRICS) <= set(last)
    assert last[M.TRAIN_LOSS] < first[M.TRAIN_LOSS]
    assert last[M.VAL_ACC] >= 0.6, result.history  # chance is 1/7


def test_same_seed_same_metrics_and_other_seed_differs(tiny):
    cfg = config(epochs=2, **FAST)
    a = fit(cfg, tiny, device="cpu").history
    b = fit(cfg, tiny, device="cpu").history
    c = fit(config(epochs=2, seed=1, **{k: v for k, v in FAST.items()}), tiny, device="cpu").history
    strip = lambda h: [{k: v for k, v in row.items() if k not in (M.EPOCH_SECONDS, M.IMAGES_PER_SECOND)} for row in h]
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny, tmp_path):
    cfg = config(epochs=3, schedule="cosine", flip=True, translate=2, **FAST)
    full = fit(cfg, tiny, device="cpu")
    path = tmp_path / "ckpt.pt"
    # Interrupt after epoch 2: the callback saves a checkpoint and asks to stop.
    part = fit(cfg, tiny, device="cpu", on_epoch=lambda r: (save_checkpoint(r.state(), path), r.epoch == 2)[1])
    assert part.status == "stopped" and part.epochs_completed == 2
    resumed = fit(cfg, tiny, device="cpu", resume=load_checkpoint(path))
    assert resumed.epochs_completed == 3
    key = lambda h: [(r[M.TRAIN_LOSS], r[M.VAL_ACC]) for r in h]
    assert key(resumed.history) == key(full.history)
    for p, q in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        torch.testing.assert_close(p, q)


def test_checkpoint_of_another_config_is_refused(tiny, tmp_path):
    path = tmp_path / "c.pt"
    fit(config(epochs=1, **FAST), tiny, device="cpu", on_epoch=lambda r: save_checkpoint(r.state(), path))
    with pytest.raises(ConfigError, match="lr"):
        fit(config(epochs=2, **{**FAST, "lr": 0.5}), tiny, device="cpu", resume=load_checkpoint(path))


def test_divergence_is_a_result_not_a_crash(tiny):
    result = fit(config(epochs=5, optimizer="sgd", lr=1e6, batch_size=16, dropout=0.0), tiny, device="cpu")
    assert result.status == "diverged"
    assert result.epochs_completed < 5 or not math.isfinite(result.history[-1][M.TRAIN_LOSS])
    assert not math.isfinite(result.history[-1][M.TRAIN_LOSS])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_trains(tiny, optimizer):
    result = fit(config(epochs=1, optimizer=optimizer, lr=1e-3, batch_size=64, conv3_channels=64, hidden=64), tiny, device="cpu")
    assert result.status == "completed" and math.isfinite(result.history[0][M.TRAIN_LOSS])


@pytest.mark.parametrize("bad", [dict(lr=0), dict(lr=-1e-3), dict(dropout=1.0), dict(dropout=-0.1),
                                 dict(optimizer="lbfgs"), dict(batch_size=0), dict(schedule="exp"), dict(epochs=0)])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ConfigError):
        config(**bad)


def test_unknown_optimizer_is_refused_by_make_optimizer_too():
    cfg = config()
    object.__setattr__(cfg, "optimizer", "lbfgs")  # past TrainConfig's own check, as a new name would be
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])


def test_flat_dict_round_trip_and_model_options():
    cfg = TrainConfig.from_dict({"dropout": 0.3, "lr": 1e-2, "hidden": 64})
    assert cfg.model.options == {"dropout": 0.3, "conv3_channels": 128, "hidden": 64}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["arch"] == "cnn" and cfg.to_dict()["lr"] == 1e-2
    with pytest.raises(ConfigError, match="hidden must be one of 128, 64"):
        TrainConfig.from_dict({"hidden": 100})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown TrainConfig key.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    assert TrainConfig.from_dict({"lr": 0.01}).lr == 0.01


def test_schedules():
    assert lr_factor("none", 500, 10, 100) == 1.0
    assert lr_factor("step", 69, 10, 150) == 1.0 and lr_factor("step", 70, 10, 150) == pytest.approx(0.1)
    assert lr_factor("cosine", 0, 10, 100) == 1.0 and lr_factor("cosine", 100, 10, 100) == pytest.approx(0.0)
    assert lr_factor("onecycle", 0, 10, 100) == pytest.approx(0.04) and lr_factor("onecycle", 30, 10, 100) == pytest.approx(1.0)


def test_augmentation_flips_and_translates_whole_batches():
    x = torch.arange(4 * 48 * 48, dtype=torch.float32).reshape(4, 1, 48, 48)
    # The flip mask for seed 0 comes from torch.rand on the same generator: recompute it independently.
    expected_flip = torch.rand(4, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < int(expected_flip.sum()) < 4, "seed 0 flips some images and keeps others"
    flipped = augment_batch(x, flip=True, translate=0, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        want = x[i].flip(2) if expected_flip[i] else x[i]
        assert torch.equal(flipped[i], want), i
        assert flipped[i, 0, 0, 0] == (x[i, 0, 0, 47] if expected_flip[i] else x[i, 0, 0, 0])

    # Shifts for seed 1: offsets in [0, 2t] per image, rows then columns; output[r, c] = input[r + dy, c + dx].
    t = 3
    offsets = torch.randint(0, 2 * t + 1, (2, 4), generator=torch.Generator().manual_seed(1)) - t
    assert (offsets != 0).any(), "seed 1 moves at least one image"
    shifted = augment_batch(x, flip=False, translate=t, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape
    for i in range(4):
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        assert shifted[i, 0, 10, 20] == x[i, 0, 10 + dy, 20 + dx]  # an inside pixel moved by (dy, dx)
        if dy > 0:
            assert (shifted[i, 0, 48 - dy:] == 0).all()  # zero-filled where the image moved away
        if dy < 0:
            assert (shifted[i, 0, :-dy] == 0).all()


def test_a_file_that_is_not_a_checkpoint_is_a_data_error(tmp_path):
    from fer_model.errors import DataError

    (tmp_path / "x.pt").write_bytes(b"hello")
    with pytest.raises(DataError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        fit(config(epochs=1), None, resume=load_checkpoint(tmp_path / "y.pt"))  # refused before touching data
