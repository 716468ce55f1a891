"""`--ensemble K|auto`: the final stage retrains the best trials by validation accuracy and registers
their averaged probabilities as one model version. Real sqlite MLflow stores; the finished grid whose
trials an ensemble retrains is written as its trials write their runs (`TrialTracker`), without Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import PROB_ATOL, artifact_names

from fer_model import metrics as M
from fer_model.config import TrainConfig
from fer_model.errors import ConfigError
from tuning import final, grid, pipeline
from tuning import options as flags
from tuning import names as N
from tuning.trials.rows import TrialRow, ensemble_candidates, ranked, trial_rows
from tuning.stages.resume import check_unchanged
from tuning.options import given_flags
from tuning.tracking.store import client_for, create_run, ensure_experiment, record_best, set_tags
from tuning.tracking.trial_log import TrialTracker

BASE = {"batch_size": 64, "epochs": 1, "optimizer": "adam", "schedule": "none", "seed": 0, "lr": 1e-3}
MAX_SAMPLES = 100  # of the tiny set's 280 training images: each member's epoch takes about a second
EVALUATION_FILES = {"confusion_matrix.png", "roc_curves.png", "classification_report.txt", "learning_curves.png", "metrics.json"}


def finished_grid(uri: str, trials: list[tuple[dict, list[float], str]], best: int, decoy_test_acc=None) -> tuple[str, list[str]]:
    """A finished grid run as the grid stage leaves one: its trial runs (params, val_acc per epoch,
    outcome) and its best configuration (trial `best`). `decoy_test_acc`: a test_acc metric on each
    trial run, which nothing may read."""
    client = client_for(uri)
    experiment_id = ensure_experiment(client, N.DEFAULT_EXPERIMENT)
    parent = create_run(client, experiment_id, "grid (test)", {N.TAG_STAGE: N.STAGE_GRID})
    run_ids = []
    for i, (config, val_accs, outcome) in enumerate(trials):
        cfg = TrainConfig.from_dict(config)
        tracker = TrialTracker.open(uri, experiment_id, parent, f"0a1b2_{i:05d}", f"trial {i}", cfg.to_dict(), {})
        for epoch, acc in enumerate(val_accs, 1):
            tracker.log_epoch(epoch, {M.VAL_ACC: acc, M.TRAIN_LOSS: 1.0})
        assert tracker.close()
        if decoy_test_acc is not None:
            client.log_metric(tracker.run_id, M.TEST_ACC, decoy_test_acc[i])
        set_tags(client, tracker.run_id, {N.TAG_OUTCOME: outcome})
        client.set_terminated(tracker.run_id, "FINISHED")
        run_ids.append(tracker.run_id)
    record_best(client, parent, trials[best][0], run_ids[best])
    client.set_terminated(parent, "FINISHED")
    return parent, run_ids


# Ranked by last-epoch validation accuracy: c .48, b .45, f .45 (tied: trial order), g .44 (c's configuration
# again), a .40. Ranked by best epoch, a (.50) would lead; by the decoy test accuracy, a, e, d. The stopped-early
# d (.60) and the diverged e are not ranked while completed trials exist.
TRIALS = [  # (config, val_acc per epoch, outcome, decoy test accuracy)
    ({**BASE, "dropout": 0.1}, [0.50, 0.40], N.Outcome.COMPLETED, 0.90),   # a
    ({**BASE, "dropout": 0.2}, [0.30, 0.45], N.Outcome.COMPLETED, 0.10),   # b
    ({**BASE, "dropout": 0.3}, [0.30, 0.48], N.Outcome.COMPLETED, 0.20),   # c: the best
    ({**BASE, "dropout": 0.4}, [0.60], N.Outcome.STOPPED_EARLY, 0.70),     # d
    ({**BASE, "dropout": 0.5}, [0.20, math.nan], N.Outcome.DIVERGED, 0.80),  # e
    ({**BASE, "dropout": 0.6}, [0.20, 0.45], N.Outcome.COMPLETED, 0.30),   # f
    ({**BASE, "dropout": 0.3}, [0.10, 0.44], N.Outcome.COMPLETED, 0.40),   # g: c's configuration
]


def test_members_are_the_next_trials_by_validation_accuracy_never_by_test(workdir):
    rows = [TrialRow(name, config, outcome, [{M.VAL_ACC: v, M.TEST_ACC: decoy} for v in accs], run_id=f"run-{name}")
            for name, (config, accs, outcome, decoy) in zip("abcdefg", TRIALS)]
    assert [r.trial_id for r in ranked(rows)] == ["c", "b", "f", "g", "a"]
    best = rows[2]
    assert [r.trial_id for r in ensemble_candidates(rows, best.config, best.run_id, 4)] == ["b", "f", "a"]
    assert [r.trial_id for r in ensemble_candidates(rows, best.config, best.run_id, 2)] == ["b"]
    assert ensemble_candidates(rows, best.config, best.run_id, 99)[-1].trial_id == "a"  # all there are: 3 more

    # The same trials as a finished grid's runs in MLflow (what `tuning.final --run-id` reads): the same
    # members, with configurations read back exactly.
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, run_ids = finished_grid(uri, [t[:3] for t in TRIALS], best=2, decoy_test_acc=[t[3] for t in TRIALS])
    client = client_for(uri)
    read = trial_rows(client, client.get_run(parent).info.experiment_id, parent)
    assert [r.run_id for r in read] == run_ids and [r.outcome for r in read] == [t[2] for t in TRIALS]
    assert [TrainConfig.from_dict(r.config) for r in read] == [TrainConfig.from_dict(t[0]) for t in TRIALS]
    chosen = ensemble_candidates(read, TRIALS[2][0], run_ids[2], 4)
    assert [r.run_id for r in chosen] == [run_ids[1], run_ids[5], run_ids[0]]
    assert [r.val_acc for r in chosen] == [0.45, 0.45, 0.40]


def test_ensemble_flag_is_validated_refused_without_a_final_stage_and_kept_by_resume():
    def options(*argv):
        return flags.final_options(final.build_parser().parse_args(["--run-id", "x", *argv]))

    assert options().ensemble is None and options().ensemble_candidates == 1
    assert options("--ensemble", "3").ensemble == "3" and options("--ensemble", "auto").ensemble_candidates == 5
    for bad in ("1", "0", "-2", "many", "2.5"):
        with pytest.raises(ConfigError, match="--ensemble must be an integer >= 2 or auto"):
            options("--ensemble", bad)
    args = grid.build_parser().parse_args(["--no-final", "--ensemble", "3"])
    with pytest.raises(ConfigError, match="--ensemble need"):
        flags.final_options(args)
    # A resumed grid chain keeps the ensemble it started with.
    started = {"chain": pipeline.Chain(None, flags.FinalOptions(ensemble="3")).to_dict()}
    for asked, ok in (("3", True), ("auto", False)):
        given = given_flags(grid.build_parser().parse_args(["--ensemble", asked]), grid.RESUME_KEYS)
        assert given == {"--ensemble": "chain.final.ensemble"}
        if ok:
            check_unchanged("r", started, {"chain": pipeline.Chain(None, flags.FinalOptions(ensemble=asked)).to_dict()}, given)
        else:
            with pytest.raises(ConfigError, match="--ensemble was 3, now auto"):
                check_unchanged("r", started, {"chain": pipeline.Chain(None, flags.FinalOptions(ensemble=asked)).to_dict()}, given)


PREDICT = """
import sys, numpy as np, pandas as pd, mlflow.pyfunc
images = np.load(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"image": [im.tobytes() for im in images]}))
np.save(sys.argv[3], out[[c for c in out.columns if c.startswith("p_")]].to_numpy())
"""


@pytest.mark.e2e
def test_tuning_final_registers_an_ensemble_that_loads_in_a_fresh_process(workdir, tiny_folder, capsys, precision):
    from fer_model.ensemble import average

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    trials = [({**BASE, "dropout": d}, [acc], N.Outcome.COMPLETED) for d, acc in ((0.5, 0.4), (0.3, 0.5), (0.7, 0.3))]
    parent, run_ids = finished_grid(uri, trials, best=1)
    argv = ["--run-id", parent, "--data", tiny_folder, "--max-samples", MAX_SAMPLES, "--final-epochs", 1, "--ensemble", 3,
            "--tta", "flip", "--tracking-uri", uri]
    result = pipeline.retrain(final.command_options(final.build_parser().parse_args([str(a) for a in argv])), parent)
    out = capsys.readouterr().out

    # Members in rank order; member 1 is the best trial (the single model's), each retrained for the final epochs.
    assert [m.rank for m in result.members] == [1, 2, 3]
    assert [m.trial_run_id for m in result.members] == [run_ids[1], run_ids[0], run_ids[2]]
    assert [m.config.model.options["dropout"] for m in result.members] == [0.3, 0.5, 0.7]
    assert all(m.config.epochs == 1 for m in result.members) and result.members[0].model is result.model
    ensemble_acc = result.evaluation.metrics[M.TEST_ACC]
    assert f"ensemble of 3: test accuracy {100 * ensemble_acc:.2f}% (members " in out
    # The final line's accuracy is the ensemble's, not member 1's beside which it stands.
    assert f"; the ensemble: test accuracy {100 * ensemble_acc:.2f}%" in out
    # tuning.final ends as every command does: its wall time and run, the inspect and training-runs lines.
    assert f"s; final run {result.run_id}\ninspect: mlflow ui" in out and "\ntraining runs: http://" in out
    assert ", ".join(f"{100 * m.test_acc:.2f}%" for m in result.members) in out

    client = client_for(uri)
    run = client.get_run(result.run_id)
    metrics, params = run.data.metrics, run.data.params
    assert metrics[M.ENSEMBLE_SIZE] == 3 and metrics[M.TEST_ACC] == ensemble_acc  # the registered model's
    assert [metrics[M.member_metric(k, M.TEST_ACC)] for k in (1, 2, 3)] == pytest.approx([m.test_acc for m in result.members])
    assert M.member_metric(3, M.TEST_ACC_TTA) in metrics
    # With TTA, every headline test number the plain evaluation has is logged beside it, and printed.
    tta = result.tta_evaluation.metrics
    assert {k: metrics[k + M.TTA_SUFFIX] for k in M.TEST_HEADLINE if k in metrics} == pytest.approx(
        {k: tta[k] for k in M.TEST_HEADLINE if k in metrics}) and M.TEST_MACRO_F1 + M.TTA_SUFFIX in metrics
    assert f"with TTA flip: test accuracy {100 * tta[M.TEST_ACC]:.2f}%" in out
    assert [m.step for m in client.get_metric_history(result.run_id, M.member_metric(2, M.VAL_ACC))] == [1]
    assert json.loads(params[M.member_metric(2, "config")])["dropout"] == 0.5 and params["ensemble"] == "3"
    assert params["dropout"] == "0.3"  # member 1's configuration, as a single final run's
    assert "ensemble of 3" in run.info.run_name and run.data.tags[N.TAG_MEMBER_TRIAL_RUNS] == ",".join(
        run_ids[i] for i in (1, 0, 2))
    assert artifact_names(client, result.run_id, "evaluation") >= EVALUATION_FILES

    # One version, tagged with its size; in a fresh process it predicts the ensemble's averaged probabilities.
    (version,) = client.search_model_versions(f"name = '{N.DEFAULT_MODEL_NAME}'")
    assert version.tags[M.ENSEMBLE_SIZE] == "3" and version.tags["tta"] == "flip"
    assert float(version.tags[M.TEST_ACC]) == pytest.approx(ensemble_acc, abs=1e-4)
    np.save(workdir / "images.npy", _data(tiny_folder).test.images[:, 0].numpy())  # what the stage evaluated on
    proc = subprocess.run([sys.executable, "-c", PREDICT, str(workdir / "images.npy"),
                           f"models:/{N.DEFAULT_MODEL_NAME}/{version.version}", str(workdir / "probs.npy")],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(workdir / "probs.npy")
    in_process = average([m.test_probs_tta for m in result.members]).numpy()  # the stage's own, with its TTA
    # Equal to fp32 rounding, whether the members trained in bf16 or not (inference is fp32 either way): the
    # trained networks are channels_last in memory, the loaded ones are not, so their convolutions round
    # differently. Same labels, so the served model's accuracy is the stage's, exactly.
    np.testing.assert_allclose(served, in_process, rtol=0, atol=PROB_ATOL)
    assert (served.argmax(1) == in_process.argmax(1)).all()
    labels = _data(tiny_folder).test.labels.numpy()
    assert (served.argmax(1) == labels).mean() == result.tta_evaluation.metrics[M.TEST_ACC]


def _data(tiny_folder):
    """The data the final stage trained and evaluated on (the same flags' defaults)."""
    from fer_model import data as fdata
    from fer_model.config import DataConfig

    return fdata.load(DataConfig(str(tiny_folder), max_samples=MAX_SAMPLES), progress=False)


def test_ensemble_auto_is_sized_on_validation_from_at_most_five_of_the_best(workdir, tiny_folder, capsys):
    from fer_model.ensemble import choose_size

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    trials = [({**BASE, "dropout": d, "seed": i}, [0.5 - i / 100], N.Outcome.COMPLETED)
              for i, d in enumerate((0.3, 0.4, 0.5, 0.6, 0.7, 0.2))]
    parent, run_ids = finished_grid(uri, trials, best=0)
    argv = ["--run-id", parent, "--data", tiny_folder, "--max-samples", MAX_SAMPLES, "--final-epochs", 1,
            "--ensemble", "auto", "--tracking-uri", uri]
    result = pipeline.retrain(final.command_options(final.build_parser().parse_args([str(a) for a in argv])), parent)
    out = capsys.readouterr().out
    assert "ensemble auto: up to 5 members" in out
    assert [c.trial_run_id for c in result.inputs.candidates] == run_ids[1:5]  # the sixth is never a candidate

    client = client_for(uri)
    tried = [m.value for m in sorted(client.get_metric_history(result.run_id, M.ENSEMBLE_VAL_ACC), key=lambda m: m.step)]
    size = int(client.get_run(result.run_id).data.metrics[M.ENSEMBLE_SIZE])
    # The validation accuracy of each number of members tried: it rose up to the size chosen, and the member
    # after it (if one was tried) did not raise it: choose_size's rule, on validation only.
    assert len(result.members) == size and 1 <= size <= 5 and len(tried) in (size, size + 1)
    assert all(b > a for a, b in zip(tried[:size], tried[1:size]))
    assert len(tried) == size or tried[size] <= tried[size - 1]
    assert choose_size([m.val_probs for m in result.members], _data(tiny_folder).val.labels) == (size, tried[:size])
    assert f"ensemble of {size}: test accuracy" in out and "sized on validation accuracy: " in out
