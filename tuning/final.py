"""The final stage: retrain the best configuration, evaluate on test, log artifacts, register.

    python -m tuning.final --run-id PARENT_RUN_ID [--final-epochs 15] [--data PATH] ...

runs it on its own for a finished grid or search run (its parent run's `best_config` tag).
The grid and search stages call `run_final` themselves.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import fer_model
from fer_model import data as fdata
from fer_model.cli import Parser, run_cli
from fer_model.data import CLASS_NAMES, FerData
from fer_model.errors import UserError
from fer_model.evaluate import describe_test, evaluate, save_evaluation
from fer_model.model import outputs_probabilities
from fer_model.presets import STUDY_TEST_ACC
from fer_model.training import STATUS_DIVERGED, TrainConfig, fit, to_input
from tuning import names as N
from tuning.options import CommonOptions, add_common_flags, common_options
from tuning.tracking import client_for, log_files, log_metrics, read_best_config, start_run

EVALUATION_DIR = "evaluation"
MODEL_ARTIFACT = "model"


@dataclass
class FinalResult:
    run_id: str
    config: TrainConfig
    test_metrics: dict[str, float]
    model_version: str | None
    train_seconds: float


def run_final(opts: CommonOptions, data: FerData, experiment_id: str, parent_run_id: str,
              best_config: dict[str, Any], best_trial_run_id: str | None = None) -> FinalResult:
    """Retrain `best_config` for `opts.final_epochs`, evaluate on test, log it all, register the model."""
    client = client_for(opts.tracking_uri)
    cfg = TrainConfig.from_dict({**best_config, "epochs": opts.final_epochs})
    tags = {N.TAG_PARENT: parent_run_id, N.TAG_STAGE: N.STAGE_FINAL}
    if best_trial_run_id:
        tags[N.TAG_BEST_TRIAL_RUN] = best_trial_run_id
    run_id = start_run(client, experiment_id, "final", tags, cfg.to_dict())
    try:
        device = torch.device(opts.device) if opts.device else None
        t0 = time.perf_counter()
        result = fit(cfg, data, device=device,
                     on_epoch=lambda r: log_metrics(client, run_id, r.metrics, step=r.epoch))
        train_seconds = time.perf_counter() - t0
        ev = evaluate(result.model, data.test, device)
        log_metrics(client, run_id, {**ev.metrics, "train_seconds": train_seconds})
        with tempfile.TemporaryDirectory() as d:
            paths = save_evaluation(ev, d, result.history, title="(final)")
            log_files(client, run_id, paths, EVALUATION_DIR)
        version = None
        if result.status == STATUS_DIVERGED:  # a result to look at, never a model to serve
            print(f"final: training diverged (non-finite loss) after {result.epochs_completed} epochs; "
                  "the model is not registered", file=sys.stderr)
        else:
            version = _log_and_register(opts, run_id, parent_run_id, best_trial_run_id, result.model, data, ev.metrics)
        client.set_tag(run_id, N.TAG_OUTCOME, result.status)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return FinalResult(run_id, cfg, ev.metrics, version, train_seconds)


def _log_and_register(opts: CommonOptions, run_id: str, parent_run_id: str, best_trial_run_id: str | None,
                      model: torch.nn.Module, data: FerData, test_metrics: dict[str, float]) -> str | None:
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    # Input: float32 (N, 1, 48, 48) grey levels scaled to [0, 1], as fer_model.training.to_input makes.
    example = to_input(data.test.images[:2], channels_last=False).numpy()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    mlflow.set_tracking_uri(opts.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name=MODEL_ARTIFACT, signature=signature, input_example=example,
            registered_model_name=opts.model_name,
            # Ship fer_model with the model so it loads where only MLflow and torch are installed.
            code_paths=[str(Path(fer_model.__file__).parent)],
            # Stated, not inferred: inference loads the model in a subprocess (~20 s a stage).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "scikit-learn"],
        )
    version = getattr(info, "registered_model_version", None)
    if version is not None:
        client = client_for(opts.tracking_uri)
        tags = {k: f"{v:.4f}" for k, v in test_metrics.items()}
        tags.update({"source_run_id": run_id, "parent_run_id": parent_run_id,
                     N.TAG_MODEL_OUTPUT: "probabilities" if outputs_probabilities(model) else "logits",
                     "class_names": ",".join(CLASS_NAMES)})
        if best_trial_run_id:
            tags[N.TAG_BEST_TRIAL_RUN] = best_trial_run_id
        for k, v in tags.items():
            client.set_model_version_tag(opts.model_name, str(version), k, v)
    return None if version is None else str(version)


def final_stage(opts: CommonOptions, data: FerData, experiment_id: str, parent_run_id: str,
                best_config: dict[str, Any], best_trial_run_id: str | None) -> FinalResult | None:
    """The stages' last step: `run_final` and its summary, unless --no-final."""
    if not opts.run_final:
        return None
    final = run_final(opts, data, experiment_id, parent_run_id, best_config, best_trial_run_id)
    print(describe_final(final, opts.model_name))
    return final


def describe_final(final: FinalResult, model_name: str, study_acc: float = STUDY_TEST_ACC["seed-best"]) -> str:
    return (f"final: {final.config.epochs} epochs in {final.train_seconds:.0f} s; "
            f"{describe_test(final.test_metrics)} (the study: {100 * study_acc:.2f}%)\n"
            + (f"registered: {model_name} version {final.model_version} (run {final.run_id})" if final.model_version
               else f"not registered (run {final.run_id})"))


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.final", description="Retrain, evaluate and register the best configuration of a finished grid or search run.")
    p.add_argument("--run-id", required=True, help="the grid or search parent run")
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = common_options(args)
    client = client_for(opts.tracking_uri)
    try:
        parent = client.get_run(args.run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own error types for unknown ids
        raise UserError(f"no run {args.run_id!r} in {opts.tracking_uri}: {str(exc).splitlines()[0]}") from None
    best = read_best_config(client, args.run_id)
    data = fdata.load(opts.data)
    print(f"data: {fdata.describe(data)}")
    final = run_final(opts, data, parent.info.experiment_id, args.run_id, best,
                      parent.data.tags.get(N.TAG_BEST_TRIAL_RUN))
    print(describe_final(final, opts.model_name))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
