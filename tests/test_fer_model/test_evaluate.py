"""Evaluation numbers on a case small enough to check by hand, and the files it writes."""

import json

import numpy as np
import pytest

from fer_model import metrics as M
from fer_model.data import PRIVATE_TEST, PUBLIC_TEST
from fer_model.evaluate import evaluate_probabilities, save_evaluation


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
