"""What a person reads in the MLflow UI: run names, the Markdown descriptions of stage runs, final runs,
the registered model and its versions, and the link that opens an experiment on its training runs.

Text only, from the pipeline's own results (rows, configs, metrics): nothing here trains or starts
Ray. A run's description is its tag ``mlflow.note.content`` (`tuning.names.TAG_NOTE`), Markdown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fer_model import metrics as M
from fer_model.config import ARCHITECTURES, CLASS_NAMES
from fer_model.presets import STUDY_TEST_ACC
from fer_model.training import FitStatus
from tuning import names as N
from tuning.names import FINAL_NAME_KEYS, config_name, value_text
from tuning.registry.pyfunc import EMOTION, IMAGE_COLUMN, LABEL, PROB_COLUMNS
from tuning.reporting import report
from tuning.spaces import STUDY_GRID_TEST_ACC
from tuning.trials.rows import TrialRow

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

WORKFLOW_TRAINING = "workflowType=machine_learning"  # in a page's URL: the UI in its "Model training" mode
# The runs page flat (a sort other than by time turns off nesting under parent runs), best first.
RUNS_BEST_FIRST = "orderByKey=metrics.%60val_acc%60&orderByAsc=false"

def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's page on its training runs: every run (trials, stages, final) in one list by
    validation accuracy, best first. MLflow 3.17 needs the URL to say so: its experiment page ignores
    the experiment's kind and would open a new browser on the GenAI overview (see EXPERIMENT_KIND_TAG)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW_TRAINING}&{RUNS_BEST_FIRST}"


# --------------------------------------------------------------------------- stage runs


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _config_table(config: Mapping[str, Any], first: Sequence[str] = ()) -> str:
    """Key | value, the keys in `first` (what the stage varied) first and in bold."""
    keys = [k for k in first if k in config] + [k for k in config if k not in first]
    lines = ["| key | value |", "|---|---|"]
    for k in keys:
        v = config[k]
        value = f"`{v:g}`" if isinstance(v, float) else f"`{v}`"
        lines.append(f"| **{k}** | **{value}** |" if k in first else f"| {k} | {value} |")
    return "\n".join(lines)


def _best_lines(best: "TrialRow", keys: Sequence[str]) -> str:
    return (f"**Best trial** `{_row_name(best, keys)}`: validation accuracy {_pct(best.val_acc)} at its last epoch "
            f"(its best epoch {_pct(best.best_val_acc)}); run `{best.run_id or '-'}`. The final stage retrains it.\n\n"
            f"**Best configuration**\n\n{_config_table(best.config, keys)}")


def _row_name(row: "TrialRow", keys: Sequence[str]) -> str:
    return row.run_name or config_name(row.config, keys) or row.trial_id


def _outcomes(rows: Sequence["TrialRow"]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    return ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(counts.items()))


def _headline(stage: str, rows: Sequence["TrialRow"], best: "TrialRow", keys: Sequence[str]) -> str:
    """The first line (what the run page shows before "Show more"): the stage, its size, its best."""
    return (f"**{stage.capitalize()}** of {len(rows)} trial{'s' if len(rows) != 1 else ''}: best `{_row_name(best, keys)}`, "
            f"validation accuracy **{_pct(best.val_acc)}**.")


def grid_description(rows: Sequence["TrialRow"], best: "TrialRow", dropouts: Sequence[float] | None = None,
                     lrs: Sequence[float] | None = None, full_data: bool = True) -> str:
    """The grid run's description: the dropout x lr table of final validation accuracy (the study's
    test accuracy beside it on the full data), then the best trial and its configuration."""
    keys = ("dropout", "lr")
    axes = report.grid_axes(rows)
    dropouts, lrs = list(dropouts or axes[0]), list(lrs or axes[1])
    text = [_headline(N.STAGE_GRID, rows, best, keys), "",
            "| dropout \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for d, line in zip(dropouts, report.grid_cells(rows, dropouts, lrs)):
        cells = []
        for lr, row in zip(lrs, line):
            ours = _pct(row.val_acc) if row else "n/a"
            ours = f"**{ours}**" if row is not None and row is best else ours
            study = STUDY_GRID_TEST_ACC.get((d, lr))
            cells.append(f"{ours} ({_pct(study)})" if full_data and study is not None else ours)
        text.append(f"| {d:g} | " + " | ".join(cells) + " |")
    epochs = max((r.epochs for r in rows), default=0)
    text += ["", f"Validation accuracy at each trial's last epoch ({_epochs(epochs)}; {_outcomes(rows)}): what picks "
             "the best; test data is never looked at here. "
             + ("In brackets: the study's test accuracy for the same cell (10 epochs; it had no validation split)."
                if full_data else "The trials saw a subset of the data (--max-samples): the study's full-data numbers "
                "are left out."), "", _best_lines(best, keys)]
    return "\n".join(text)


def search_description(rows: Sequence["TrialRow"], best: "TrialRow", study_name: str | None = None, top: int = 5) -> str:
    """The search run's description: its top trials by validation accuracy, then the best configuration."""
    keys = report.varying_keys(rows)
    ranked = sorted((r for r in rows if math.isfinite(r.val_acc)), key=lambda r: -r.val_acc)[:top]
    text = [_headline(N.STAGE_SEARCH, rows, best, keys), "",
            "| # | run | val acc | best val acc | epochs | outcome | " + " | ".join(keys) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(keys)]
    for i, r in enumerate(ranked, 1):
        values = " | ".join(value_text(k, r.config.get(k)) for k in keys)
        text.append(f"| {i} | `{_row_name(r, keys)}` | {_pct(r.val_acc)} | {_pct(r.best_val_acc)} | {r.epochs} | "
                    f"{r.outcome.replace('_', ' ')} | {values} |")
    text += ["", f"The top {len(ranked)} by validation accuracy at their last epoch"
             + (f", of Optuna study `{study_name}`" if study_name else "")
             + f" ({_outcomes(rows)}); searched: {', '.join(keys) or 'nothing'}.", "", _best_lines(best, keys)]
    return "\n".join(text)


def stage_description(stage: str, rows: Sequence["TrialRow"], best: "TrialRow", study_name: str | None = None,
                      full_data: bool = True) -> str:
    return grid_description(rows, best, full_data=full_data) if stage == N.STAGE_GRID \
        else search_description(rows, best, study_name)


def set_stage_description(client: "MlflowClient", run_id: str, stage: str, rows: Sequence["TrialRow"], best: "TrialRow",
                          study_name: str | None = None, full_data: bool = True) -> None:
    """Write a grid or search run's description (its page's Markdown)."""
    client.set_tag(run_id, N.TAG_NOTE, stage_description(stage, rows, best, study_name, full_data))


# --------------------------------------------------------------------------- the final run


def _model_options(config: Mapping[str, Any]) -> str:
    """The architecture's options as set, e.g. ``dropout 0.3, conv3_channels 128, hidden 128``."""
    arch = ARCHITECTURES.get(config.get("arch"))
    keys = list(arch.options) if arch else ["dropout"]
    return ", ".join(f"{k} {value_text(k, config[k])}" for k in keys if k in config)


def _training_line(config: Mapping[str, Any]) -> str:
    return (f"{config.get('optimizer')} lr {value_text('lr', config.get('lr'))}, batch {config.get('batch_size')}, "
            f"weight decay {value_text('weight_decay', config.get('weight_decay'))}, schedule {config.get('schedule')}, "
            f"{_epochs(config.get('epochs'))}")


def _config_line(config: Mapping[str, Any]) -> str:
    return f"{config.get('arch')} ({_model_options(config)}), {_training_line(config)}"


def _epochs(n: Any) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def test_table(metrics: Mapping[str, float], full_data: bool = True,
               study_acc: float = STUDY_TEST_ACC["seed-best"]) -> str:
    """Test accuracy, its PublicTest/PrivateTest halves and macro F1; the study's 57.80% beside on the full data."""
    rows = [("test accuracy", _pct(metrics.get(M.TEST_ACC)), _pct(study_acc))]
    rows += [(label, _pct(metrics[k]), "-") for label, k in (("PublicTest half", M.TEST_PUBLIC_ACC),
                                                            ("PrivateTest half", M.TEST_PRIVATE_ACC)) if k in metrics]
    rows.append(("macro F1", _f1(metrics), "-"))
    if full_data:
        return "\n".join(["| | this model | the study (seed-best, 15 epochs) |", "|---|---|---|",
                          *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    return "\n".join(["| | this model |", "|---|---|", *(f"| {a} | {b} |" for a, b, _ in rows)])


def _f1(metrics: Mapping[str, float]) -> str:
    f1 = metrics.get(M.TEST_MACRO_F1)
    return "n/a" if f1 is None or not math.isfinite(f1) else f"{f1:.4f}"


def final_description(config: Mapping[str, Any], metrics: Mapping[str, float], *, source_run_id: str,
                      best_trial_run_id: str | None, status: str, train_seconds: float, test_size: int,
                      fingerprint: str, full_data: bool = True, epochs_run: int | None = None,
                      study_acc: float = STUDY_TEST_ACC["seed-best"]) -> str:
    """The final run's description: its test numbers beside the study's, what it retrained, where from."""
    beside = f" (the study: {_pct(study_acc)})" if full_data else ""
    text = [f"**Test accuracy {_pct(metrics.get(M.TEST_ACC))}**{beside}, macro F1 {_f1(metrics)}: the final retrain of "
            f"`{config_name(config, FINAL_NAME_KEYS)}` for {_epochs(config.get('epochs'))}.", ""]
    if status == FitStatus.DIVERGED:
        text += [f"**Training diverged** after {_epochs(epochs_run)}: this model is not registered.", ""]
    text += [test_table(metrics, full_data, study_acc), "",
             f"Retrained: {_config_line(config)}, in {train_seconds:.0f} s; the best configuration of run "
             f"`{source_run_id}`" + (f" (best trial run `{best_trial_run_id}`)" if best_trial_run_id else "") + ".", "",
             f"Test set: {test_size:,} images, data fingerprint `{fingerprint[:16]}`."
             + ("" if full_data else " A subset of the data (--max-samples): the study's number is left out.")]
    return "\n".join(text)


# --------------------------------------------------------------------------- the registered model


MODEL_HEADING = "**FER2013 emotion classifier**"  # a description starting so is ours to rewrite


def model_io_lines() -> str:
    """What the registered pyfunc takes and returns (`tuning.pyfunc`)."""
    return (f"**Input**: a DataFrame with a column `{IMAGE_COLUMN}` of encoded image bytes (PNG, JPEG, BMP; base64 in a "
            "JSON request to `mlflow models serve`), or the 2,304 raw bytes of a 48x48 uint8 array; any size or colour "
            "becomes 48x48 grayscale.\n\n"
            f"**Output**: one row per image: `{LABEL}` (0-{len(CLASS_NAMES) - 1}), `{EMOTION}` "
            f"({', '.join(CLASS_NAMES)}) and `{PROB_COLUMNS[0]}` ... `{PROB_COLUMNS[-1]}`, class probabilities summing to 1.")


def model_line(config: Mapping[str, Any], parameters: int, outputs_probabilities: bool) -> str:
    """The network (its architecture, options and size) and how it was trained."""
    arch = config.get("arch")
    what = ARCHITECTURES[arch].description if arch in ARCHITECTURES else "a network"
    out = "" if "out" in what else f", {'probabilities' if outputs_probabilities else 'logits'} out"
    return f"`{arch}` ({_model_options(config)}), {what}{out}: {parameters:,} parameters; trained with {_training_line(config)}."


def _members_text(members: int) -> str:
    """``ensemble of 3, member 1: `` before a member's model line; nothing for a single model."""
    return f"ensemble of {members}, member 1: " if members else ""


def ensemble_text(ensemble: str) -> str:
    """An ensemble's paragraph (`FinalResult.ensemble_line`); empty for a single model."""
    return (f"**Ensemble**: {ensemble}. Member 1 is the network described here; each member's configuration is "
            "a param `member<k>_config` of the final run, their class probabilities are averaged.") if ensemble else ""


def version_description(config: Mapping[str, Any], parameters: int, outputs_probabilities: bool,
                        metrics: Mapping[str, float], *, run_id: str, source_run_id: str, best_trial_run_id: str | None,
                        test_size: int, fingerprint: str, full_data: bool = True, members: int = 0,
                        ensemble: str = "") -> str:
    """A model version's description: the model, its input and output, its test numbers and data, its run;
    for an ensemble of `members` networks (`ensemble`: its line), member 1's model and the ensemble's numbers."""
    f1 = metrics.get(M.TEST_MACRO_F1, float("nan"))
    return "\n\n".join(filter(None, [  # the first line plain: the versions table shows its beginning
        f"Test accuracy {_pct(metrics.get(M.TEST_ACC))}, macro F1 {f1:.4f}; {_members_text(members)}"
        f"{config.get('arch')}, {parameters:,} parameters, "
        f"{config.get('optimizer')} lr {value_text('lr', config.get('lr'))}, {_epochs(config.get('epochs'))}; "
        f"final run {run_id}.",
        f"{MODEL_HEADING}: {model_line(config, parameters, outputs_probabilities)}",
        ensemble_text(ensemble),
        model_io_lines(),
        test_table(metrics, full_data),
        f"Test set: {test_size:,} images, data fingerprint `{fingerprint[:16]}`.",
        f"Made by final run `{run_id}`, which retrained the best of run `{source_run_id}`"
        + (f" (best trial run `{best_trial_run_id}`)" if best_trial_run_id else "") + "."]))


def registered_model_description(name: str, version: str, config: Mapping[str, Any], parameters: int,
                                 outputs_probabilities: bool, metrics: Mapping[str, float], *, run_id: str,
                                 test_size: int, fingerprint: str, members: int = 0) -> str:
    """The registered model's description: what every version is, and the newest version's numbers."""
    return "\n\n".join([
        f"{MODEL_HEADING}: 7 facial expressions from 48x48 grayscale faces (FER2013), "
        "a CNN trained by this project's grid and search stages (`tuning`). Each version's description "
        "and tags carry its own test numbers; promotion moves the `champion` alias.",
        model_io_lines(),
        f"**Newest version {version}**: {_members_text(members)}"
        f"{model_line(config, parameters, outputs_probabilities)} "
        f"Test accuracy {_pct(metrics.get(M.TEST_ACC))}, macro F1 "
        f"{metrics.get(M.TEST_MACRO_F1, float('nan')):.4f} on {test_size:,} test images "
        f"(data fingerprint `{fingerprint[:16]}`); run `{run_id}`. See `models:/{name}/{version}`."])


def update_registered_model_description(client: "MlflowClient", name: str, description: str) -> None:
    """Set the registered model's description unless someone wrote their own there (theirs is kept)."""
    current = (client.get_registered_model(name).description or "").strip()
    if not current or current.startswith(MODEL_HEADING):
        client.update_registered_model(name, description=description)
