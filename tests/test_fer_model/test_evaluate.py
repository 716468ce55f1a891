"""Evaluation numbers on a case small enough to check by hand, and the files it writes."""

import json

import numpy as np
import pytest

from fer_model import metrics as M
from fer_model.evaluate import evaluate_probabilities, save_evaluation
from fer_model.sources import PRIVATE_TEST, PUBLIC_TEST


def test_hand_computable_case(tmp_path):
    # 8 images: true labels and predicted labels; probabilities are one-hot-ish on the prediction.
    labels = np.array([0, 0, 1, 2, 3, 3, 4, 5])
    pred = np.array([0, 1, 1, 2, 3, 0, 4, 6])
    probs = np.full((8, 7), 0.01)
    probs[np.arange(8), pred] = 0.94
    usage = np.array([PUBLIC_TEST] * 4 + [PRIVATE_TEST] * 4)
    ev = evaluate_probabilities(probs, labels, usage)
    assert ev.metrics[M.TEST_ACC] == pytest.approx(5 / 8)
    assert ev.metrics[M.TEST_PUBLIC_ACC] == pytest.approx(3 / 4)  # 0->0, 0->1 wrong, 1->1, 2->2
    assert ev.metrics[M.TEST_PRIVATE_ACC] == pytest.approx(2 / 4)  # 3->3, 3->0 wrong, 4->4, 5->6 wrong
    # Per-class F1: angry P=1/2 R=1/2 -> 0.5; disgust P=1/2 R=1 -> 2/3; fear 1; happy P=1 R=1/2 -> 2/3;
    # sad 1; surprise 0; neutral 0 (no support, one false positive). Macro over the 7 classes:
    f1 = [0.5, 2 / 3, 1.0, 2 / 3, 1.0, 0.0, 0.0]
    assert ev.metrics[M.TEST_MACRO_F1] == pytest.approx(sum(f1) / 7)
    assert ev.metrics[M.test_f1_name("disgust")] == pytest.approx(2 / 3)
    assert ev.confusion[3].tolist() == [1, 0, 0, 1, 0, 0, 0]
    assert ev.confusion.sum() == 8
    assert ev.roc["fear"]["auc"] == pytest.approx(1.0)
    assert "neutral" not in ev.roc  # no positives: no ROC curve
    paths = save_evaluation(ev, tmp_path, history=[{M.TRAIN_LOSS: 1.0, M.VAL_LOSS: 1.1, M.TRAIN_ACC: 0.5, M.VAL_ACC: 0.4}])
    names = {p.name for p in paths}
    assert names == {"metrics.json", "classification_report.txt", "classification_report.json",
                     "confusion_matrix.png", "roc_curves.png", "learning_curves.png"}
    for p in paths:
        assert p.stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"][M.TEST_ACC] == pytest.approx(0.625)
    assert "surprise" in (tmp_path / "classification_report.txt").read_text()
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- test-time augmentation


def network(arch: str = "cnn"):
    import torch

    from fer_model.config import ModelSpec
    from fer_model.model import build_model

    torch.manual_seed(0)
    spec = ModelSpec(arch, {"conv3_channels": 64, "hidden": 64})
    return build_model(spec).eval(), spec


def symmetric_images(n: int = 5):
    """uint8 images equal to their own mirror."""
    import torch

    half = torch.randint(0, 256, (n, 1, 48, 24), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return torch.cat([half, half.flip(3)], dim=3)


def test_flip_tta_of_mirror_symmetric_images_is_no_tta():
    import torch

    from fer_model.data import Split
    from fer_model.evaluate import evaluate
    from fer_model.inputs import predict_proba

    model, spec = network()
    x = symmetric_images()
    plain = predict_proba(model, x, False, device="cpu")
    assert torch.equal(predict_proba(model, x, False, tta="flip", device="cpu"), plain)
    labels = torch.arange(len(x)) % 7
    split = Split(x, labels, torch.full((len(x),), PUBLIC_TEST, dtype=torch.int8))
    assert evaluate(model, spec, split, "cpu", tta="flip").metrics == evaluate(model, spec, split, "cpu").metrics


@pytest.mark.parametrize("arch", ["cnn", "cnn-softmax"])
def test_tencrop_averages_the_probabilities_of_ten_views_in_batches(arch):
    import torch

    from fer_model.inputs import predict_proba, to_input, tta_views

    model, spec = network(arch)
    x = torch.randint(0, 256, (7, 1, 48, 48), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    probs = predict_proba(model, x, spec.outputs_probabilities, tta="tencrop", device="cpu", batch_size=3)
    assert probs.shape == (7, 7) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(7))
    # The mean of the views' probabilities (not of their logits), whatever the batching.
    with torch.no_grad():
        views = [model(to_input(v)) for v in tta_views(x, "tencrop")]
    expected = torch.stack([v if spec.outputs_probabilities else v.softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(probs, expected)


def test_tencrop_views_are_five_shifts_and_their_mirrors():
    import torch

    from fer_model.inputs import TENCROP_OFFSETS, tta_views

    x = torch.arange(2 * 48 * 48, dtype=torch.int64).reshape(2, 1, 48, 48).remainder(251).to(torch.uint8)
    views = tta_views(x, "tencrop")
    assert len(views) == 10 and all(v.shape == x.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(3))
    for (dy, dx), shifted, mirrored in zip(TENCROP_OFFSETS, views[0::2], views[1::2]):
        assert torch.equal(mirrored, shifted.flip(3))
        assert shifted[0, 0, 20, 20] == x[0, 0, 20 + dy, 20 + dx]
        if dy > 0:
            assert (shifted[:, :, -dy:] == 0).all()  # zero filled where the image moved away
    assert [len(tta_views(x, t)) for t in ("none", "flip")] == [1, 2]


def test_an_unknown_tta_is_a_config_error():
    import torch

    from fer_model.data import Split
    from fer_model.errors import ConfigError
    from fer_model.evaluate import evaluate
    from fer_model.inputs import predict_proba, tta_views

    model, spec = network()
    x = symmetric_images(2)
    split = Split(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.int8))
    for call in (lambda: tta_views(x, "mirror"), lambda: predict_proba(model, x, False, tta="mirror"),
                 lambda: evaluate(model, spec, split, "cpu", tta="10crop")):
        with pytest.raises(ConfigError, match="tta must be one of none, flip, tencrop"):
            call()
