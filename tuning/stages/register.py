"""Registration: log a final stage's model on its run and register it as a new version, tags and all.

The model is the pyfunc of `tuning.pyfunc` (images in, emotions out): the final stage's network with the
weights of its best validation epoch (with ``--ensemble``, each member's, their probabilities averaged),
and its test-time augmentation (``--tta``), if any. Everything goes through the explicit client: the model
is saved to a temporary folder, uploaded as the run's ``model`` artifact, and the version is created with
its tags in one call, so a version never exists without them. Promotion is a further step (the registry's aliases).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from fer_model import metrics as M
from fer_model.config import CLASS_NAMES
from fer_model.model import count_parameters
from tuning import names as N
from tuning.registry import pyfunc
from tuning.reporting import describe
from tuning.stages.context import StageContext
from tuning.stages.final import TTA_PARAM, FinalResult
from tuning.tracking.store import versions_of_run

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"


def version_tags(ctx: StageContext, final: FinalResult) -> dict[str, str]:
    """What a version carries: its test numbers, where it came from, what its output is, its test data."""
    tags = {k: f"{v:.4f}" for k, v in final.evaluation.metrics.items()}
    specs = [spec for _, spec in final.networks]  # one; an ensemble's members may differ (each value named once)
    outputs = dict.fromkeys("probabilities" if spec.outputs_probabilities else "logits" for spec in specs)
    tags.update({N.TAG_SOURCE_RUN: final.run_id, N.TAG_PARENT_RUN: final.inputs.source_run_id,
                 N.TAG_MODEL_OUTPUT: ",".join(outputs), "class_names": ",".join(CLASS_NAMES),
                 "arch": ",".join(dict.fromkeys(spec.arch for spec in specs)),
                 N.TAG_DATA_FINGERPRINT: ctx.data.fingerprint[:16], N.TAG_TEST_SIZE: str(len(ctx.data.test))})
    if final.inputs.best_trial_run_id:
        tags[N.TAG_BEST_TRIAL_RUN] = final.inputs.best_trial_run_id
    # What the version answers with: which epoch's weights, and the TTA its predictions average over.
    tags.update({M.BEST_EPOCH: str(final.model_epoch), TTA_PARAM: final.inputs.tta})
    if final.tta_evaluation is not None:
        tags[M.TEST_ACC_TTA] = f"{final.tta_evaluation.metrics[M.TEST_ACC]:.4f}"
    if final.ensemble:  # how many networks it averages, and which trials they retrained
        tags.update({M.ENSEMBLE_SIZE: str(len(final.members)),
                     N.TAG_MEMBER_TRIAL_RUNS: ",".join(m.trial_run_id or "" for m in final.members)})
    return tags


def register(ctx: StageContext, final: FinalResult) -> ModelVersion | None:
    """A new version of `ctx.tracking.model_name` from `final`; None (and no version) if it diverged."""
    if final.diverged:  # a result to look at, never a model to serve
        return None
    existing = versions_of_run(ctx.client, final.run_id, ctx.tracking.model_name)
    if existing:  # registered already (a retried step): one version per final run
        return existing[0]
    with tempfile.TemporaryDirectory() as d:
        path = pyfunc.save(Path(d) / MODEL_ARTIFACT, final.networks, ctx.data.test.images[0, 0].cpu().numpy(),
                           tta=final.inputs.tta)
        ctx.client.log_artifacts(final.run_id, str(path), MODEL_ARTIFACT)
    name = ctx.tracking.model_name
    if not ctx.client.search_registered_models(f"name = '{name}'", max_results=1):
        try:
            ctx.client.create_registered_model(name)
        except Exception:  # noqa: BLE001 - created meanwhile by another driver
            pass
    version = ctx.client.create_model_version(
        name, f"runs:/{final.run_id}/{MODEL_ARTIFACT}", run_id=final.run_id, tags=version_tags(ctx, final),
        description=version_description(ctx, final))
    try:  # the model's page says what the newest version is; a failure here loses no version
        describe.update_registered_model_description(ctx.client, name, describe.registered_model_description(
            name, str(version.version), **_model_facts(final), metrics=final.evaluation.metrics, run_id=final.run_id,
            test_size=len(ctx.data.test), fingerprint=ctx.data.fingerprint))
    except Exception as exc:  # noqa: BLE001 - e.g. a registry that refuses the update
        log.warning("registered model %s: description not updated: %s", name, exc)
    return version


def _model_facts(final: FinalResult) -> dict:
    return {"config": final.inputs.config.to_dict(), "parameters": count_parameters(final.model),
            "outputs_probabilities": final.inputs.config.model.outputs_probabilities,
            "members": len(final.members) if final.ensemble else 0}


def version_description(ctx: StageContext, final: FinalResult) -> str:
    """A version's Markdown: the model (architecture, parameters), its input and output, its data and
    test numbers, and the run that made it."""
    return describe.version_description(
        **_model_facts(final), metrics=final.evaluation.metrics, run_id=final.run_id,
        source_run_id=final.inputs.source_run_id, best_trial_run_id=final.inputs.best_trial_run_id,
        test_size=len(ctx.data.test), fingerprint=ctx.data.fingerprint, full_data=ctx.data_config.max_samples is None,
        ensemble=final.ensemble_line())
