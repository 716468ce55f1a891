"""fit(): it learns, it is deterministic, it resumes exactly, it reports divergence as a result;
its schedules (plateau, warm-up) and the best epoch's weights."""

from __future__ import annotations

import math

import pytest
import torch

from fer_model import data as D
from fer_model import metrics as M
from fer_model.augment import augment_batch
from fer_model.errors import ConfigError
from fer_model.config import TrainConfig
from fer_model.inputs import predict_outputs
from fer_model.training import (FitStatus, PLATEAU_FACTOR, PLATEAU_PATIENCE, Plateau, _check_resumable, fit, load_checkpoint,
                                lr_factor, make_optimizer, save_checkpoint)

def config(**values) -> TrainConfig:
    """A config from flat keys, as Tune and presets give them."""
    return TrainConfig.from_dict(values)


FAST = dict(batch_size=32, lr=2e-3, dropout=0.3, conv3_channels=64, hidden=64)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return D.load(D.DataConfig(path=str(tiny_folder), val_fraction=0.25), progress=False)


def lrs(history) -> list[float]:
    """The lr of each epoch's first step."""
    return [row[M.LR] for row in history]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


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
    assert part.status == FitStatus.STOPPED_EARLY == "stopped_early" and part.epochs_completed == 2
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
                                 dict(optimizer="lbfgs"), dict(batch_size=0), dict(schedule="exp"), dict(epochs=0),
                                 dict(warmup=-1), dict(warmup=1.5), dict(warmup=11, epochs=10), dict(warmup="two")])
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
    assert lr_factor("plateau", 500, 10, 100) == 1.0  # per step; its cuts come per epoch (Plateau)
    assert config(schedule="plateau", warmup=3, epochs=3).to_dict()["warmup"] == 3


def test_warmup_multiplies_the_schedule_by_a_linear_ramp():
    assert [lr_factor("none", s, 10, 100, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("cosine", 1, 10, 100, warmup_steps=4) == pytest.approx(0.5 * lr_factor("cosine", 1, 10, 100))
    assert lr_factor("step", 80, 10, 150, warmup_steps=20) == pytest.approx(0.1)  # over: the schedule alone
    for schedule in ("none", "step", "cosine", "onecycle", "plateau"):  # warmup 0 changes nothing
        assert all(lr_factor(schedule, s, 10, 100, warmup_steps=0) == lr_factor(schedule, s, 10, 100)
                   for s in range(120))


def test_warmup_ramps_the_optimizer_lr_over_its_first_steps(small):
    # batch 28: 2 steps an epoch; warm-up 2 epochs = 4 steps, so epochs start at lr/4, 3lr/4, then lr.
    cfg = config(epochs=3, warmup=2, **{**FAST, "batch_size": 28})
    assert lrs(fit(cfg, small, device="cpu").history) == pytest.approx([cfg.lr / 4, 3 * cfg.lr / 4, cfg.lr])
    assert lrs(fit(cfg.replace(warmup=0), small, device="cpu").history) == [cfg.lr] * 3
    assert TrainConfig().warmup == 0  # the presets and the study's grid do not move


def test_plateau_cuts_after_patience_epochs_without_improvement():
    assert (PLATEAU_FACTOR, PLATEAU_PATIENCE) == (0.5, 2)
    p = Plateau()
    cuts = [p.step(acc) for acc in (0.5, 0.6, 0.6, 0.55, 0.7, 0.65, 0.7, 0.71)]
    assert cuts == [False, False, False, True, False, False, True, False]  # equal is no improvement
    assert p.factor == 0.25 and (p.best, p.bad_epochs) == (0.71, 0)


# An lr this small leaves validation accuracy as it is after the first epoch: every epoch after it is "no
# improvement". Batch 28: 2 steps an epoch, so a 1-epoch warm-up starts at half the lr.
STILL = dict(epochs=4, schedule="plateau", warmup=1, lr=1e-9, batch_size=28, conv3_channels=64, hidden=64)


def test_plateau_in_fit_cuts_the_lr_and_resumes_exactly(small, tmp_path):
    cfg = config(**STILL)
    full = fit(cfg, small, device="cpu")
    assert len({row[M.VAL_ACC] for row in full.history}) == 1, "the validation accuracy must not move"
    # Warm-up in epoch 1, which sets the best; epochs 2 and 3 do not beat it: the lr halves after epoch 3.
    assert lrs(full.history) == [5e-10, 1e-9, 1e-9, 5e-10]
    for stop_after in (2, 3):  # mid-count, and just after the cut
        path = tmp_path / f"ckpt{stop_after}.pt"
        part = fit(cfg, small, device="cpu",
                   on_epoch=lambda r: (save_checkpoint(r.state(), path), r.epoch == stop_after)[1])
        assert part.epochs_completed == stop_after
        ckpt = load_checkpoint(path)
        assert ckpt["plateau"]["bad_epochs"] == (stop_after - 1) % PLATEAU_PATIENCE
        resumed = fit(cfg, small, device="cpu", resume=ckpt)
        assert lrs(resumed.history) == lrs(full.history), stop_after
        assert same_weights(resumed.model.state_dict(), full.model.state_dict())


def test_a_checkpoint_from_before_warmup_still_resumes():
    cfg = TrainConfig()
    old = {k: v for k, v in cfg.to_dict().items() if k != "warmup"}
    ckpt = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [], "rng": {}, "config": old}
    _check_resumable(cfg, ckpt)  # a missing training key is its default: no error
    with pytest.raises(ConfigError, match="warmup"):
        _check_resumable(cfg.replace(warmup=1), ckpt)


def _zero_at(epoch: int, snapshots: dict):
    """An epoch callback that keeps each epoch's weights and, after `epoch`, zeroes the model (the state's
    tensors are the live ones): the epochs after it fall to about chance, below the ones before."""
    def on_epoch(r):
        weights = r.state()["model"]
        snapshots[r.epoch] = {k: v.clone() for k, v in weights.items()}
        if r.epoch == epoch:
            for v in weights.values():
                v.zero_()
    return on_epoch


def test_keep_best_returns_and_evaluates_the_best_validation_epoch(small):
    cfg = config(epochs=3, **FAST)
    seen: dict = {}
    best = fit(cfg, small, device="cpu", on_epoch=_zero_at(2, seen), keep_best=True)
    acc = [row[M.VAL_ACC] for row in best.history]
    assert acc[2] < max(acc[:2]), acc
    assert best.best_epoch == best.model_epoch == 1 + acc.index(max(acc)) < 3
    assert same_weights(best.model.state_dict(), seen[best.best_epoch])
    out = predict_outputs(best.model, small.val.images, "cpu", channels_last=cfg.channels_last)
    assert (out.argmax(1) == small.val.labels).float().mean().item() == acc[best.best_epoch - 1]

    last = fit(cfg, small, device="cpu", on_epoch=_zero_at(2, seen))  # the default: the last epoch, as before
    assert (last.model_epoch, last.best_epoch) == (3, best.best_epoch)
    assert same_weights(last.model.state_dict(), seen[3])


def test_keep_best_survives_a_resume(small, tmp_path):
    # Zeroed after epoch 2, stopped after 3: the best (epoch 1 or 2) is only in the checkpoint.
    cfg = config(epochs=4, **FAST)
    full = fit(cfg, small, device="cpu", on_epoch=_zero_at(2, {}), keep_best=True)
    assert full.model_epoch <= 2
    path = tmp_path / "ckpt.pt"
    zero = _zero_at(2, {})
    part = fit(cfg, small, device="cpu", keep_best=True,
               on_epoch=lambda r: (zero(r), save_checkpoint(r.state(), path), r.epoch == 3)[2])
    assert part.epochs_completed == 3
    ckpt = load_checkpoint(path)
    assert ckpt["best"]["epoch"] == full.model_epoch
    resumed = fit(cfg, small, device="cpu", resume=ckpt, keep_best=True)
    assert resumed.model_epoch == full.model_epoch
    assert same_weights(resumed.model.state_dict(), full.model.state_dict())
    # A checkpoint without the best weights (older, or written without keep_best): the best among its epoch and later.
    del ckpt["best"]
    older = fit(cfg, small, device="cpu", resume=ckpt, keep_best=True)
    assert older.model_epoch in (3, 4) and older.best_epoch == full.model_epoch


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
