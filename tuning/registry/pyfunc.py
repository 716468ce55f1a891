"""The registered model: an MLflow pyfunc that takes images as users hold them and returns emotions.

Input: a DataFrame with a column ``image`` of encoded image bytes (PNG, JPEG, BMP; base64 in a JSON
request to `mlflow models serve`), or the 2,304 raw bytes of a 48x48 uint8 array. Any size or colour
mode becomes 48x48 grayscale as the data layer converts odd training images (`fer_model.inputs`).
At most `MAX_IMAGES` (4,096) images a request, each of at most `fer_model.inputs.MAX_PIXELS` (40 Mpx):
beyond either, or for a value that is not an image, the request is refused as INVALID_PARAMETER_VALUE
(a 400 when served), naming the row or the limit.
Output: one row per image: ``label`` (0-6), ``emotion`` and ``p_<class>`` for each class, summing to 1
whether a member network outputs logits (Model 2) or probabilities (Model 1).

One class holds one or more member networks (their probabilities averaged), so an ensemble registers
the same way. A model saved with a test-time augmentation (``tta``: flip, tencrop; in its MLmodel's
model_config) averages each member's probabilities over the views of every image, as the final stage's
evaluation with ``--tta`` did; models saved before it existed have none. Members are plain PyTorch
files (`fer_model.model.save_network`: spec and state_dict, read with ``weights_only=True``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import fer_model
import tuning
from fer_model.config import CLASS_NAMES, check_tta
from fer_model.ensemble import average
from fer_model.inputs import ImageError, image_batch, predict_proba
from fer_model.model import load_network, save_network

IMAGE_COLUMN = "image"
LABEL, EMOTION = "label", "emotion"
PROB_COLUMNS = [f"p_{name}" for name in CLASS_NAMES]
MEMBER_PREFIX = "member_"
# Images a request may hold: bounds one request's decoding time (each image is decoded in turn, so
# memory stays one image's); tuning.predict sends larger sets in requests of this size.
MAX_IMAGES = 4096
TTA_CONFIG = "tta"  # model_config key: the test-time augmentation predictions average over


class FerClassifier(mlflow.pyfunc.PythonModel):
    """Images in, emotions out; the mean of its members' class probabilities."""

    def load_context(self, context) -> None:
        keys = sorted((k for k in context.artifacts if k.startswith(MEMBER_PREFIX)), key=lambda k: int(k[len(MEMBER_PREFIX):]))
        self.members = [load_network(context.artifacts[k]) for k in keys]
        self.tta = check_tta((context.model_config or {}).get(TTA_CONFIG, "none"))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_frame(self.members, images_from_frame(model_input), self.tta)


def images_from_frame(frame: Any):
    """The ``image`` column as uint8 (N, 1, 48, 48); a bad value is a 400-class error naming its row, more
    than `MAX_IMAGES` rows one naming the limit."""
    if not isinstance(frame, pd.DataFrame) or IMAGE_COLUMN not in frame.columns:
        raise MlflowException(f"the input needs a column {IMAGE_COLUMN!r} of encoded images (base64 in JSON)",
                              error_code=INVALID_PARAMETER_VALUE)
    if len(frame) > MAX_IMAGES:
        raise MlflowException(f"a request holds at most {MAX_IMAGES} images, got {len(frame)}: send them in "
                              f"requests of {MAX_IMAGES} or fewer", error_code=INVALID_PARAMETER_VALUE)
    try:
        return image_batch(frame[IMAGE_COLUMN])
    except ImageError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def member_probabilities(members: Sequence, images, tta: str = "none") -> np.ndarray:
    """The members' mean class probabilities (N, 7) for uint8 images, each with test-time augmentation `tta`
    (averaged as the final stage evaluated the ensemble: `fer_model.ensemble.average`)."""
    return average([predict_proba(model, images, spec.outputs_probabilities, tta=tta, device="cpu")
                    for model, spec in members]).numpy()


def predict_frame(members: Sequence, images, tta: str = "none") -> pd.DataFrame:
    probs = member_probabilities(members, images, tta) if len(images) else np.zeros((0, len(CLASS_NAMES)))
    labels = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    frame = pd.DataFrame({LABEL: labels.astype(np.int64), EMOTION: [CLASS_NAMES[i] for i in labels]})
    for j, column in enumerate(PROB_COLUMNS):
        frame[column] = probs[:, j].astype(np.float64)
    return frame


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (48, 48) image as PNG bytes (the model's input example)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("long", LABEL), ColSpec("string", EMOTION), *[ColSpec("double", c) for c in PROB_COLUMNS]]))


def save(path: Path, networks: Sequence[tuple[Any, Any]], example_image: np.ndarray, tta: str = "none") -> Path:
    """Save an MLflow pyfunc model of `networks` ((module, ModelSpec) pairs) at `path`; its predictions
    average over the views of test-time augmentation `tta` (`fer_model.inputs.tta_views`)."""
    import shutil
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as d:
        code = []
        for package in (fer_model, tuning):  # the sources only: no __pycache__ in the model
            src = Path(package.__file__).parent
            code.append(str(shutil.copytree(src, Path(d) / "code" / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))))
        artifacts = {}
        for i, (model, spec) in enumerate(networks):
            artifacts[f"{MEMBER_PREFIX}{i}"] = str(Path(d) / f"{MEMBER_PREFIX}{i}.pt")
            save_network(model, spec, artifacts[f"{MEMBER_PREFIX}{i}"])
        mlflow.pyfunc.save_model(
            path, python_model=FerClassifier(), artifacts=artifacts, signature=signature(),
            input_example=pd.DataFrame({IMAGE_COLUMN: [png_bytes(example_image)]}),
            model_config={TTA_CONFIG: check_tta(tta)},
            # The project's code travels with the model: it loads where only the runtime needs are installed.
            code_paths=code,
            # Stated, not inferred: inference would load the model in a subprocess (~20 s a stage).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy",
                              "pandas", "pillow", "scikit-learn"])
    return path
