"""What a stage shows: the trials table (CSV and text), the grid heatmap, all learning curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from fer_model import metrics as M
from fer_model.evaluate import plot_learning_curves, pyplot
from tuning.spaces import STUDY_GRID_TEST_ACC
from tuning.trials.rows import TrialRow, ties_at_top


def varying_keys(rows: Sequence[TrialRow]) -> list[str]:
    keys = sorted({k for r in rows for k in r.config})
    return [k for k in keys if len({repr(r.config.get(k)) for r in rows}) > 1]


def write_table(rows: Sequence[TrialRow], path: Path) -> Path:
    """One line per trial: id, outcome, epochs, last and best val accuracy, every hyperparameter."""
    keys = sorted({k for r in rows for k in r.config})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "run_id", "outcome", "epochs", M.VAL_ACC, M.BEST_VAL_ACC, *keys])
        for r in rows:
            w.writerow([r.trial_id, r.run_id or "", r.outcome, r.epochs, f"{r.val_acc:.4f}", f"{r.best_val_acc:.4f}",
                        *[r.config.get(k, "") for k in keys]])
    return path


def trials_text(rows: Sequence[TrialRow], limit: int = 15) -> str:
    keys = varying_keys(rows)
    ranked = sorted(rows, key=lambda r: -r.val_acc if np.isfinite(r.val_acc) else 1.0)[:limit]
    lines = [f"{'val acc':>8} {'epochs':>6} {'outcome':<14} " + " ".join(f"{k:>12}" for k in keys)]
    for r in ranked:
        cells = " ".join(f"{_fmt(r.config.get(k)):>12}" for k in keys)
        lines.append(f"{100 * r.val_acc:7.2f}% {r.epochs:>6} {r.outcome:<14} {cells}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def grid_axes(rows: Sequence[TrialRow]) -> tuple[list[float], list[float]]:
    """The grid's dropouts and lrs in the order its trials were made (Tune's trial order: the order the
    flags gave them), for a table made from the rows alone (a run's MLflow description)."""
    axis = lambda key: list(dict.fromkeys(float(r.config[key]) for r in rows if key in r.config))
    return axis("dropout"), axis("lr")


def grid_cells(rows: Sequence[TrialRow], dropouts: Sequence[float], lrs: Sequence[float]) -> list[list[TrialRow | None]]:
    """The trial of each (dropout, lr) cell, dropouts down and lrs across: what both the console's table
    and the grid run's MLflow description lay out, in one order."""
    at = {(float(r.config.get("dropout", np.nan)), float(r.config.get("lr", np.nan))): r for r in rows}
    return [[at.get((float(d), float(lr))) for lr in lrs] for d in dropouts]


def grid_matrix(rows: Sequence[TrialRow], dropouts: Sequence[float], lrs: Sequence[float]) -> np.ndarray:
    """Each cell's last-epoch validation accuracy (NaN: no trial), as `grid_cells` lays them out."""
    return np.array([[np.nan if r is None else r.val_acc for r in line] for line in grid_cells(rows, dropouts, lrs)],
                    dtype=float).reshape(len(dropouts), len(lrs))


def grid_text(rows: Sequence[TrialRow], dropouts: Sequence[float], lrs: Sequence[float], study: bool = True) -> str:
    """The dropout x lr table laid out like the study's; with `study`, the study's numbers beside ours.

    Pass ``study=False`` when the trials saw a subset of the data (--max-samples): the study's
    full-data accuracies would then read as a target the run was never meant to reach.
    """
    m = grid_matrix(rows, dropouts, lrs)
    label, width = ("val (study test)", 27) if study else ("val", 15)
    head = f"{'dropout':>8} | " + " | ".join(f"lr {lr:<8g} {label}" for lr in lrs)
    lines = [head, "-" * len(head)]
    for i, d in enumerate(dropouts):
        cells = []
        for j, lr in enumerate(lrs):
            ours = "   n/a" if np.isnan(m[i, j]) else f"{100 * m[i, j]:5.2f}%"
            theirs = STUDY_GRID_TEST_ACC.get((d, lr))
            cells.append(f"{ours:>14} ({'  -  ' if theirs is None else f'{100 * theirs:5.2f}%'})" if study else ours)
        lines.append(f"{d:>8g} | " + " | ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def tie_line(rows: Sequence[TrialRow]) -> str | None:
    """One line when several trials share the top validation accuracy (the pick is the first in
    Tune's trial order, see `outcomes.best_row`), naming them; None when one trial leads."""
    tied = ties_at_top(list(rows))
    if len(tied) < 2:
        return None
    return (f"{len(tied)} trials tie at {100 * tied[0].val_acc:.2f}% validation accuracy; picked the first in trial order "
            f"({', '.join(r.run_name or r.trial_id for r in tied)})")


def plot_grid_heatmap(rows: Sequence[TrialRow], dropouts: Sequence[float], lrs: Sequence[float], path: Path) -> Path:
    plt = pyplot()
    m = grid_matrix(rows, dropouts, lrs)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(m, cmap="viridis", vmin=np.nanmin(m) if np.isfinite(m).any() else 0, vmax=np.nanmax(m) if np.isfinite(m).any() else 1)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(dropouts)), [f"{d:g}" for d in dropouts])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("dropout")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, "n/a" if np.isnan(v) else f"{100 * v:.1f}%", ha="center", va="center", color="w")
    ax.set_title("Validation accuracy, dropout x learning rate")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all_learning_curves(rows: Sequence[TrialRow], path: Path) -> Path:
    keys = varying_keys(rows)
    label = lambda r: ", ".join(f"{k}={_fmt(r.config.get(k))}" for k in keys) or r.trial_id
    return plot_learning_curves({label(r): r.history for r in rows if r.history}, path, title="(all trials)")


def mlflow_ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"
