"""The MLflow UI as a person sees it: a real headless Chromium renders a real `mlflow server` holding a
tiny grid's runs and model. The experiment opens on its training runs, runs are named by what they
are, run pages carry their Markdown descriptions, the registered model's page says what it is.

Chromium is driven as a plain process (``--dump-dom``, ``--screenshot``): no Python browser package.
Without a Chromium the browser test is skipped; `.ci/run` installs one.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import run_main
from mlflow.tracking import MlflowClient

from fer_model import metrics as M
from tuning import grid
from tuning.reporting import describe
from tuning import names as N
from tuning.tracking.store import ensure_experiment
from tuning.trials.trainable import run_name

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (chromium, chromium-browser or google-chrome on PATH); .ci/run installs it")
# Virtual time (ms) the page gets to fetch and render; a second, longer try when text is still missing.
BUDGETS_MS = (15_000, 45_000)


def test_trial_runs_are_named_by_their_configuration():
    assert run_name({"dropout": 0.3, "lr": 1e-3}, ["dropout", "lr"]) == "d0.3 lr1e-3"
    searched = {"optimizer": "adamw", "batch_size": 64, "lr": 3.2e-4, "dropout": 0.4123}
    assert run_name(searched, ["optimizer", "batch_size", "lr", "dropout"]) == "adamw b64 lr3.2e-4 d0.41"
    assert run_name({"weight_decay": 0.0, "lr": 1e-2}, ["weight_decay", "lr"]) == "wd0 lr1e-2"
    assert run_name({}, []) == "trial"
    assert N.final_run_name({"optimizer": "adam", "batch_size": 32, "lr": 1e-3, "dropout": 0.3, "epochs": 15}) \
        == "final adam b32 lr1e-3 d0.3 (15 epochs)"
    assert re.fullmatch(r"grid \d{4}-\d\d-\d\d \d\d:\d\d \(9 trials\)", N.stage_run_name(N.STAGE_GRID, 9))


def test_experiments_are_marked_training_unless_someone_chose_a_kind(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    created = ensure_experiment(client, "new")
    assert client.get_experiment(created).tags[N.EXPERIMENT_KIND_TAG] == N.EXPERIMENT_KIND_TRAINING
    older = client.create_experiment("older")  # made before the kind was set: marked when reused
    assert ensure_experiment(client, "older") == older
    assert client.get_experiment(older).tags[N.EXPERIMENT_KIND_TAG] == N.EXPERIMENT_KIND_TRAINING
    chosen = client.create_experiment("chosen", tags={N.EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(client, "chosen") == chosen
    assert client.get_experiment(chosen).tags[N.EXPERIMENT_KIND_TAG] == "genai_development"


def render(url: str, out: Path, name: str, expect: tuple[str, ...] = (), screenshot: bool = False,
           height: int = 900) -> tuple[str, str]:
    """The page's rendered DOM and its visible text, as headless Chromium gives them after running its
    scripts; retried once with more time while an `expect`ed text is missing. Saved under `out`."""
    for budget in BUDGETS_MS:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--user-data-dir={out / ('profile-' + name)}", f"--window-size=1440,{height}",
               f"--virtual-time-budget={budget}", "--dump-dom", url]
        if screenshot:
            cmd.insert(-2, f"--screenshot={out / (name + '.png')}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"chromium failed on {url}: {proc.stderr[-1500:]}"
        dom = proc.stdout
        text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))
        if all(e in text for e in expect):
            break
    (out / f"{name}.html").write_text(dom)
    (out / f"{name}.txt").write_text(text)
    return dom, text


def title(dom: str) -> str:
    found = re.search(r"<title>(.*?)</title>", dom, flags=re.S)
    return html.unescape(found.group(1)) if found else ""


@pytest.mark.e2e
@needs_chromium
def test_mlflow_ui_shows_training_runs_descriptions_and_the_model(ray_session, workdir, tiny_folder, mlflow_server, tmp_path):
    argv = ["--data", tiny_folder, "--dropouts", "0.3,0.5", "--lrs", "1e-3", "--epochs", 1, "--final-epochs", 1,
            "--tracking-uri", mlflow_server]
    assert run_main(grid.main, argv) == 0
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    assert exp.tags[N.EXPERIMENT_KIND_TAG] == N.EXPERIMENT_KIND_TRAINING
    runs = client.search_runs([exp.experiment_id], max_results=50)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags[N.TAG_STAGE], []).append(r)
    (parent,), (final,), trials = by_stage[N.STAGE_GRID], by_stage[N.STAGE_FINAL], by_stage[N.STAGE_TRIAL]

    # What the store holds: names by configuration (Tune's trial id a tag), summary metrics, descriptions.
    assert sorted(t.info.run_name for t in trials) == ["d0.3 lr1e-3", "d0.5 lr1e-3"]
    for t in trials:
        assert t.data.tags[N.TAG_TRIAL_ID] and {M.BEST_VAL_ACC, M.FINAL_VAL_ACC} <= set(t.data.metrics)
    best = client.get_run(parent.data.tags[N.TAG_BEST_TRIAL_RUN])
    assert parent.data.metrics[M.VAL_ACC] == best.data.metrics[M.VAL_ACC]
    assert re.fullmatch(r"grid \d{4}-\d\d-\d\d \d\d:\d\d \(2 trials\)", parent.info.run_name)
    assert final.info.run_name == f"final adam b32 lr1e-3 d{best.data.params['dropout']} (1 epoch)"
    assert "| dropout \\ lr | 0.001 |" in parent.data.tags[N.TAG_NOTE]
    assert "the final retrain of `adam b32 lr1e-3 d" in final.data.tags[N.TAG_NOTE]
    model = client.get_registered_model(N.DEFAULT_MODEL_NAME)
    assert model.description.startswith(describe.MODEL_HEADING) and "Newest version 1" in model.description

    base, out = mlflow_server.rstrip("/"), tmp_path / "pages"
    out.mkdir()

    # The experiment page, by the link the pipeline hands out: training runs, not the GenAI overview,
    # every run in one list (stage runs, trials, final) named by what it is. A fresh browser profile:
    # nothing remembered from an earlier visit decides the mode.
    url = describe.experiment_url(base, exp.experiment_id)
    names = (parent.info.run_name, final.info.run_name, "d0.3 lr1e-3", "d0.5 lr1e-3")
    dom, text = render(url, out, "experiment", names, screenshot=True)
    assert title(dom).startswith("Runs - "), f"{url} opened on {title(dom)!r}: {text[:600]}"
    for genai in ("Detect Issues", "Token Usage", "No data available for the selected time range", "Training runs"):
        assert genai not in text, f"{url} shows the GenAI overview ({genai!r}): {text[:600]}"
    for name in names:
        assert name in text, f"run {name!r} not on {url}: {text[:1500]}"
    assert "4 matching runs" in text and "Sort: val_acc" in text
    assert (out / "experiment.png").stat().st_size > 10_000

    # The grid run's page: its child runs by name, its Markdown description rendered as tables.
    ml = f"?{describe.WORKFLOW_TRAINING}"
    dom, text = render(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}{ml}", out, "grid_run",
                       ("Best configuration",), screenshot=True, height=2400)
    for part in ("Child runs", final.info.run_name, "d0.3 lr1e-3", "d0.5 lr1e-3", "dropout \\ lr", "(57.30%)",
                 "Best configuration"):
        assert part in text, f"grid run page lacks {part!r}: {text[:2500]}"
    assert dom.count("<table") >= 2  # the grid and the best configuration, rendered from Markdown

    # The final run's page: test numbers beside the study's 57.80%.
    dom, text = render(f"{base}/#/experiments/{exp.experiment_id}/runs/{final.info.run_id}{ml}", out, "final_run",
                       ("final retrain",), screenshot=True, height=2400)
    for part in ("final retrain", "test accuracy", "PublicTest half", "PrivateTest half", "macro F1", "57.80%"):
        assert part in text, f"final run page lacks {part!r}: {text[:2500]}"

    # The registered model, and its version: what the model is, its input and output, its numbers and run.
    dom, text = render(f"{base}/#/models/{N.DEFAULT_MODEL_NAME}{ml}", out, "model", ("FER2013 emotion classifier",),
                       screenshot=True, height=1400)
    for part in ("FER2013 emotion classifier", "Newest version 1", "2,452,999 parameters", "p_angry", "Version 1"):
        assert part in text, f"registered model page lacks {part!r}: {text[:2500]}"
    dom, text = render(f"{base}/#/models/{N.DEFAULT_MODEL_NAME}/versions/1{ml}", out, "version", ("data fingerprint",),
                       height=1400)
    for part in ("Version 1", final.info.run_name, "FER2013 emotion classifier", "Input", "p_angry", "data fingerprint",
                 "macro F1", final.info.run_id):
        assert part in text, f"model version page lacks {part!r}: {text[:2500]}"
