"""`TrainConfig.ema`: a moving average of the weights beside the raw ones in `fit`. Off (0), training is
unchanged; on, the average is the hand-computed EMA, validated each epoch, kept in checkpoints (a resumed
run equals an uninterrupted one), and `fit(keep_best=True)` returns the better of an epoch's two."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fer_model import metrics as M
from fer_model.config import TrainConfig
from fer_model.errors import ConfigError
from fer_model.training import (VAL_ACC_EMA, VAL_LOSS_EMA, WeightAverage, _best_of_epoch, fit, load_checkpoint,
                                save_checkpoint)

# A net with BatchNorm (its buffers are copied, not averaged), small enough for fast epochs.
NET = dict(arch="resnet", width=0.25, depth=1, dropout=0.1, batch_size=16, lr=3e-3, optimizer="adamw")


def config(**values) -> TrainConfig:
    return TrainConfig.from_dict({**NET, **values})


def states(cfg, data, **kw):
    """fit's result and the checkpoint state of every epoch."""
    seen = []
    result = fit(cfg, data, device="cpu", on_epoch=lambda r: seen.append(r.state()), **kw)
    return result, seen


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def strip(history):
    return [{k: v for k, v in row.items() if k not in (M.EPOCH_SECONDS, M.IMAGES_PER_SECOND, VAL_LOSS_EMA, VAL_ACC_EMA)}
            for row in history]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_the_decay_must_be_in_0_1(bad):
    with pytest.raises(ConfigError, match="ema must be a decay in"):
        config(ema=bad)
    assert TrainConfig().ema == 0.0 and config(ema=0.999).ema == 0.999


def test_the_average_is_the_hand_computed_ema_and_buffers_are_copied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    decay = 0.9
    average = WeightAverage(model, decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w = [{k: v.detach().clone() for k, v in model.named_parameters()}]
    for _ in range(2):
        loss = model(torch.randn(8, 3)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        average.update(model)
        w.append({k: v.detach().clone() for k, v in model.named_parameters()})
    got = dict(average.model.named_parameters())
    for k in w[0]:
        e1 = decay * w[0][k] + (1 - decay) * w[1][k]
        e2 = decay * e1 + (1 - decay) * w[2][k]
        torch.testing.assert_close(got[k], e2, rtol=0, atol=1e-6)
        if not torch.allclose(w[2][k], w[0][k]):  # (a bias before BatchNorm gets no real gradient)
            assert not torch.allclose(got[k], w[2][k])  # the average is not the raw weights
    assert sum(not torch.allclose(w[2][k], w[0][k]) for k in w[0]) >= 4
    raw_buffers, avg_buffers = dict(model.named_buffers()), dict(average.model.named_buffers())
    assert same(raw_buffers, avg_buffers) and int(avg_buffers["1.num_batches_tracked"]) == 2
    assert all(not p.requires_grad for p in average.model.parameters())


def test_off_it_adds_nothing_and_on_it_does_not_change_the_raw_training(small):
    off, off_states = states(config(epochs=2), small)
    on, on_states = states(config(epochs=2, ema=0.9), small)
    assert not off.averaged and "ema" not in off_states[-1]
    assert all(VAL_ACC_EMA not in row and VAL_LOSS_EMA not in row for row in off.history)
    # The raw weights follow the same path, bit for bit: the average draws no random numbers and changes no weight.
    assert strip(off.history) == strip(on.history)
    assert all(same(a["model"], b["model"]) for a, b in zip(off_states, on_states))
    assert all(0 <= row[VAL_ACC_EMA] <= 1 for row in on.history)
    # The average differs from the raw weights it follows (float parameters; buffers are the raw ones).
    raw, avg = on_states[-1]["model"], on_states[-1]["ema"]
    assert raw.keys() == avg.keys()
    floats = [k for k in raw if raw[k].is_floating_point() and "running" not in k]
    assert floats and all(not torch.equal(raw[k], avg[k]) for k in floats)
    assert all(torch.equal(raw[k], avg[k]) for k in raw if "running" in k or "num_batches" in k)


def test_the_model_returned_is_the_better_of_the_best_epochs_raw_and_averaged_weights(small):
    result, seen = states(config(epochs=3, ema=0.5), small, keep_best=True)
    score = lambda row: max(row[M.VAL_ACC], row[VAL_ACC_EMA])
    best = max(range(3), key=lambda i: (score(result.history[i]), -i))
    assert result.model_epoch == best + 1
    row = result.history[best]
    assert result.averaged == (row[VAL_ACC_EMA] > row[M.VAL_ACC])
    expected = seen[best]["ema" if result.averaged else "model"]
    assert same({k: v.cpu() for k, v in result.model.state_dict().items()}, expected)


def test_an_epoch_keeps_its_averaged_weights_only_where_they_validated_better():
    raw, avg = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    row = {M.VAL_ACC: 0.5, M.VAL_LOSS: 1.0, VAL_ACC_EMA: 0.6, VAL_LOSS_EMA: 0.9}
    assert _best_of_epoch(2, row, raw, avg) == {"epoch": 2, "val_acc": 0.6, "model": avg, "averaged": True}
    for worse in ({VAL_ACC_EMA: 0.5}, {VAL_ACC_EMA: 0.4}, {VAL_LOSS_EMA: float("nan")}):  # a tie keeps the raw
        kept = _best_of_epoch(2, {**row, **worse}, raw, avg)
        assert not kept["averaged"] and kept["val_acc"] == 0.5 and torch.equal(kept["model"]["w"], raw["w"])
    assert not _best_of_epoch(1, {M.VAL_ACC: 0.5, M.VAL_LOSS: 1.0}, raw, None)["averaged"]
    # The same rule ranks trials: the accuracy an epoch keeps, and the best epoch by it.
    assert M.kept_val_acc(row) == 0.6 and M.kept_val_acc({**row, VAL_LOSS_EMA: float("nan")}) == 0.5
    assert M.kept_val_acc({M.VAL_ACC: 0.5}) == 0.5
    history = [{**row, M.VAL_ACC: 0.58, VAL_ACC_EMA: 0.55}, row]  # .58 raw, then .5 raw but .6 averaged
    assert (M.best_epoch(history), M.best_val_acc(history), M.last_val_acc(history)) == (2, 0.6, 0.6)


@pytest.mark.parametrize("keep_best", [False, True])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(small, tmp_path, keep_best):
    cfg = config(epochs=3, ema=0.8, schedule="cosine", flip=True, translate=2)
    full, full_states = states(cfg, small, keep_best=keep_best)
    path = tmp_path / "ckpt.pt"
    fit(cfg, small, device="cpu", keep_best=keep_best,
        on_epoch=lambda r: (save_checkpoint(r.state(), path), r.epoch == 2)[1])
    ckpt = load_checkpoint(path)
    assert "ema" in ckpt and ckpt["epoch"] == 2
    resumed, resumed_states = states(cfg, small, keep_best=keep_best, resume=ckpt)
    assert strip(resumed.history) == strip(full.history)
    assert [r[VAL_ACC_EMA] for r in resumed.history] == [r[VAL_ACC_EMA] for r in full.history]
    assert same(resumed_states[-1]["ema"], full_states[-1]["ema"])
    assert (resumed.model_epoch, resumed.averaged) == (full.model_epoch, full.averaged)
    assert same(resumed.model.state_dict(), full.model.state_dict())


def test_a_checkpoint_without_the_average_is_refused_by_a_run_with_it(small, tmp_path):
    path = tmp_path / "c.pt"
    fit(config(epochs=1), small, device="cpu", on_epoch=lambda r: save_checkpoint(r.state(), path))
    with pytest.raises(ConfigError, match="ema"):
        fit(config(epochs=2, ema=0.9), small, device="cpu", resume=load_checkpoint(path))
