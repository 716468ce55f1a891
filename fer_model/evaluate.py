"""Test-set evaluation: numbers (scikit-learn) and figures (matplotlib), as in the study.

`evaluate` returns an `Evaluation`; `save_evaluation` writes it as JSON, text and PNG files.
Files are written only where a caller asks; nothing here knows about MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fer_model import metrics as M
from fer_model.config import ModelSpec
from fer_model.data import CLASS_NAMES, Split
from fer_model.inputs import predict_proba
from fer_model.sources import PRIVATE_TEST, PUBLIC_TEST

# File names of the evaluation artifacts (the tuning stages log them under evaluation/).
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curves.png"
LEARNING_CURVES_PNG = "learning_curves.png"
REPORT_TXT = "classification_report.txt"
REPORT_JSON = "classification_report.json"
METRICS_JSON = "metrics.json"


@dataclass
class Evaluation:
    """Everything measured on one labelled split."""

    metrics: dict[str, float]  # test_acc, test_macro_f1, test_public_acc, ..., test_f1_<class>
    report_text: str
    report: dict[str, Any]
    confusion: np.ndarray  # rows: true class, columns: predicted
    roc: dict[str, dict[str, list[float]]]  # class -> fpr, tpr, auc


def describe_test(metrics: dict[str, float]) -> str:
    """One line of test numbers: accuracy, each half where known, macro F1."""
    halves = "".join(f", {label} {100 * metrics[k]:.2f}%" for label, k in
                     (("PublicTest", M.TEST_PUBLIC_ACC), ("PrivateTest", M.TEST_PRIVATE_ACC)) if k in metrics)
    return f"test accuracy {100 * metrics[M.TEST_ACC]:.2f}%{halves}, macro F1 {metrics[M.TEST_MACRO_F1]:.4f}"


def evaluate(model: nn.Module, spec: ModelSpec, split: Split, device: torch.device | str | None = None,
             class_names: Sequence[str] = CLASS_NAMES, tta: str = "none") -> Evaluation:
    """Accuracy, macro F1, per-class report, confusion matrix and one-vs-rest ROC on `split`; with
    test-time augmentation `tta` (``flip``, ``tencrop``: `fer_model.inputs.tta_views`), of the
    probabilities averaged over each image's views."""
    probs = predict_proba(model, split.images, spec.outputs_probabilities, tta=tta, device=device).numpy()
    return evaluate_probabilities(probs, split.labels.cpu().numpy(), split.usage.cpu().numpy(), class_names)


def evaluate_probabilities(probs: np.ndarray, labels: np.ndarray, usage: np.ndarray | None = None,
                           class_names: Sequence[str] = CLASS_NAMES) -> Evaluation:
    """The numbers of `evaluate` from predicted probabilities (also used for ensembles)."""
    from sklearn.metrics import auc, classification_report, confusion_matrix, f1_score, roc_curve

    k = len(class_names)
    # A diverged model gives NaN: score it as the uniform guess it amounts to, rather than crash.
    probs = np.where(np.isfinite(probs), probs, 1.0 / k)
    pred = probs.argmax(1)
    correct = pred == labels
    metrics = {M.TEST_ACC: float(correct.mean()),
               M.TEST_MACRO_F1: float(f1_score(labels, pred, labels=range(k), average="macro", zero_division=0))}
    clipped = np.clip(probs, 1e-12, 1.0)
    metrics[M.TEST_LOSS] = float(-np.log(clipped[np.arange(len(labels)), labels]).mean())
    if usage is not None:
        for code, name in ((PUBLIC_TEST, M.TEST_PUBLIC_ACC), (PRIVATE_TEST, M.TEST_PRIVATE_ACC)):
            half = usage == code
            if half.any():
                metrics[name] = float(correct[half].mean())
    kw = dict(labels=list(range(k)), target_names=list(class_names), zero_division=0, digits=4)
    report = classification_report(labels, pred, output_dict=True, **kw)
    for name in class_names:
        metrics[M.test_f1_name(name)] = float(report[name]["f1-score"])
    roc = {}
    for i, name in enumerate(class_names):
        positives = labels == i
        if positives.any() and (~positives).any():
            fpr, tpr, _ = roc_curve(positives, probs[:, i])
            roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(auc(fpr, tpr))}
    return Evaluation(metrics=metrics, report_text=classification_report(labels, pred, **kw), report=report,
                      confusion=confusion_matrix(labels, pred, labels=list(range(k))), roc=roc)


def save_evaluation(ev: Evaluation, out_dir: str | Path, history: Sequence[dict[str, float]] | None = None,
                    title: str = "") -> list[Path]:
    """Write metrics.json, the classification report (txt, json) and the figures; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / METRICS_JSON, out / REPORT_TXT, out / REPORT_JSON]
    summary = {"metrics": ev.metrics, "confusion_matrix": ev.confusion.tolist(),
               "roc_auc": {k: v["auc"] for k, v in ev.roc.items()}, "class_names": list(CLASS_NAMES)}
    paths[0].write_text(json.dumps(summary, indent=2))
    paths[1].write_text(ev.report_text)
    paths[2].write_text(json.dumps(ev.report, indent=2))
    paths.append(plot_confusion(ev.confusion, out / CONFUSION_PNG, title))
    paths.append(plot_roc(ev.roc, out / ROC_PNG, title))
    if history:
        paths.append(plot_learning_curves({"": list(history)}, out / LEARNING_CURVES_PNG, title))
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: np.ndarray, path: Path, title: str = "") -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > threshold else "black", fontsize=8)
    ax.set_title(f"Confusion matrix {title}".strip())
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(roc: dict[str, dict[str, list[float]]], path: Path, title: str = "") -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for name, r in roc.items():
        ax.plot(r["fpr"], r["tpr"], label=f"{name} (AUC {r['auc']:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"One-vs-rest ROC {title}".strip())
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(histories: dict[str, Sequence[dict[str, float]]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch (train dashed, validation solid), one colour per run."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, hist) in enumerate(histories.items()):
        epochs = range(1, len(hist) + 1)
        color = f"C{i % 10}"
        for ax, train_key, val_key in ((ax_loss, M.TRAIN_LOSS, M.VAL_LOSS), (ax_acc, M.TRAIN_ACC, M.VAL_ACC)):
            ax.plot(epochs, [h[train_key] for h in hist], "--", color=color, alpha=0.6)
            ax.plot(epochs, [h[val_key] for h in hist], "-", color=color, label=label or "validation")
    ax_loss.set(xlabel="epoch", ylabel="loss (dashed: train)", title=f"Loss {title}".strip())
    ax_acc.set(xlabel="epoch", ylabel="accuracy (dashed: train)", title=f"Accuracy {title}".strip())
    ax_acc.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
