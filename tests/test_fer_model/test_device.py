"""Precision: training may use bf16 autocast (FER_BF16 decides where), inference is fp32 on every machine.

Each test here runs both precisions on whatever CPU runs it: bf16 forced on is emulated where not native
(slow, but on tiny inputs), so a machine without native bf16 checks the bf16 path too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PROB_ATOL

from fer_model import data as D
from fer_model.config import ModelSpec, TrainConfig
from fer_model.device import BF16_ENV, native_bf16, training_bf16
from fer_model.errors import ConfigError
from fer_model.inputs import predict_outputs, predict_proba, to_input, to_probabilities
from fer_model.model import build_model
from fer_model.training import fit

SMALL_NET = {"conv3_channels": 64, "hidden": 64}


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, 48, 48), dtype=np.uint8))


def test_fer_bf16_decides_where_training_uses_bf16(monkeypatch):
    monkeypatch.delenv(BF16_ENV, raising=False)
    assert training_bf16("cpu") == native_bf16("cpu")  # unset: auto, where native
    monkeypatch.setenv(BF16_ENV, "auto")
    assert training_bf16("cpu") == native_bf16("cpu")
    monkeypatch.setenv(BF16_ENV, "on")
    assert training_bf16("cpu") and not training_bf16("cpu", requested=False)  # --no-bf16 always wins
    monkeypatch.setenv(BF16_ENV, "OFF")
    assert not training_bf16("cpu")
    monkeypatch.setenv(BF16_ENV, "fast")
    with pytest.raises(ConfigError, match="FER_BF16='fast': use one of auto, on, off"):
        training_bf16("cpu")


@pytest.mark.parametrize("arch", ["cnn", "cnn-softmax"])
def test_inference_is_fp32_even_inside_a_bf16_autocast(arch):
    spec = ModelSpec(arch, SMALL_NET)
    torch.manual_seed(0)
    net = build_model(spec).eval()
    images = _images()
    plain = predict_outputs(net, images, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a validation pass inside a bf16 training step
        inside = predict_outputs(net, images, "cpu")
    assert plain.dtype == inside.dtype == torch.float32 and torch.equal(plain, inside)
    probs = predict_proba(net, images, spec.outputs_probabilities, device="cpu")
    assert torch.allclose(probs.sum(1), torch.ones(len(images)), rtol=0, atol=PROB_ATOL)

    # The tolerance tells the precisions apart: the same net under bf16 autocast misses it.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = to_probabilities(net(to_input(images)).float(), spec.outputs_probabilities)
    assert (bf16 - probs).abs().max().item() > PROB_ATOL


def test_bf16_changes_training_but_never_a_models_predictions(monkeypatch):
    """FER_BF16=on really trains in bf16 (other weights than fp32 training), and one trained model's
    probabilities are bit-identical whichever mode inference runs under."""
    from synthetic import make_images

    labels = np.repeat(np.arange(7), 4)
    split = D.Split(torch.from_numpy(make_images(labels, 0))[:, None], torch.from_numpy(labels),
                    torch.zeros(len(labels), dtype=torch.int8))
    data = D.FerData(split, split, split, "synthetic", "small")
    cfg = TrainConfig.from_dict({"epochs": 1, "batch_size": 14, "lr": 2e-3, **SMALL_NET})

    models = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(BF16_ENV, mode)
        models[mode] = fit(cfg, data, device="cpu").model
    a, b = (models[m].state_dict() for m in ("on", "off"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "FER_BF16=on trained exactly as fp32: bf16 was not used"

    images = _images(9, seed=1)
    probs = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(BF16_ENV, mode)
        probs[mode] = predict_proba(models["on"], images, False, tta="flip", device="cpu")
    assert torch.equal(probs["on"], probs["off"])
