"""The registered model: an MLflow pyfunc that takes images as users hold them and returns emotions.

Input: a DataFrame with a column ``image`` of encoded image bytes (PNG, JPEG, BMP, TIFF; base64 in a JSON
request to `mlflow models serve`, also as plain base64 strings in an ``inputs`` or ``instances`` body or a
CSV), or the 2,304 raw bytes of a 48x48 uint8 array. Every colour mode becomes grayscale as the data
layer converts odd training images (`fer_model.inputs`).
Faces first (`fer_model.faces`): a 48x48 image is a FER2013 crop already, the whole image its face; in
any other image the faces are found and each is cropped as FER2013 cropped its faces. The param
``whole_image=True`` resizes every image whole instead (the behaviour before faces were looked for).
At most `MAX_IMAGES` (4,096) images a request, each of at most `fer_model.inputs.MAX_PIXELS` (40 Mpx):
beyond either, or for a value that is not an image, the request is refused as INVALID_PARAMETER_VALUE
(a 400 when served), naming the row or the limit. Work stops once `DEADLINE_ENV` seconds have passed
(`tuning.serve` sets it to the server's request timeout): a 504 the model's own, not work left running.
Output: one row per face: ``row`` (the input row it came from), ``face_found``, its box ``x``, ``y``,
``w``, ``h`` in the input's pixels and the detector's ``face_score`` (-1: not detected, a 48x48 crop), then
``label`` (0-6), ``emotion`` and ``p_<class>`` for each class, summing to 1 whether a member network
outputs logits (Model 2) or probabilities (Model 1). An input with no face gives one row with
``face_found`` false, ``emotion`` "no face", ``label`` -1 and probabilities 0: never a guess. (No NaN
anywhere: a served answer is JSON that every parser reads.) Images go through the network `SERVE_BATCH` at a
time, which bounds a request's memory. Each request runs on its share of torch's threads (`ThreadShare`): one
for a small request, all of them for a large one alone, the cores divided among requests in flight.

One class holds one or more member networks (their probabilities averaged), so an ensemble registers
the same way. A model saved with a test-time augmentation (``tta``: flip, tencrop; in its MLmodel's
model_config) averages each member's probabilities over the views of every image, as the final stage's
evaluation with ``--tta`` did; models saved before it existed have none. Members are plain PyTorch
files (`fer_model.model.save_network`: spec and state_dict, read with ``weights_only=True``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import io
import math
import os
import threading
import time
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE

import fer_model
import tuning
from fer_model.config import CLASS_NAMES, check_tta
from fer_model.ensemble import average
from fer_model.faces import face_batch
from fer_model.inputs import ImageError, predict_proba
from fer_model.model import load_network, save_network

IMAGE_COLUMN = "image"
LABEL, EMOTION = "label", "emotion"
ROW, FACE_FOUND, FACE_SCORE = "row", "face_found", "face_score"
BOX_COLUMNS = ["x", "y", "w", "h"]
NO_FACE = "no face"  # the emotion of an input in which no face was found
WHOLE_IMAGE_PARAM = "whole_image"  # predict param: resize each image whole, look for no face
DEADLINE_ENV = "FER_PREDICT_DEADLINE_S"  # seconds a predict call may work (unset: no limit)
NOT_DETECTED = -1.0  # the face_score of a face no detector found (a 48x48 crop, a whole image): dlib's are >= 0
# Images through the network at a time: a served request of 512 images at 16 clients peaked at 4.6 GB with
# batches of 1,024 (fer_model.inputs.EVAL_BATCH); in process, batches of 64 and 512 ran at similar speeds.
SERVE_BATCH = 64
PROB_COLUMNS = [f"p_{name}" for name in CLASS_NAMES]
MEMBER_PREFIX = "member_"
# Images a request may hold: bounds one request's decoding time (each image is decoded in turn, so
# memory stays one image's); tuning.predict sends larger sets in requests of this size.
MAX_IMAGES = 4096
TTA_CONFIG = "tta"  # model_config key: the test-time augmentation predictions average over
# Images a forward pass below which a request runs on one torch thread (each TTA view and member is a pass
# of the request's images). From a worker thread, as MLflow's scoring server calls the model (bf16 Xeon,
# 2 cores, vgg 0.25 with tencrop), one thread against two: 47.3 / 20.9 img/s at 1 image a request, 102.0 /
# 81.8 at 8, 114.1 / 121.7 at 16, 107.5 / 149.0 at 64 (benchmarks/serve_threads.py; docs/results.md
# "Serving threads: each request its share"): for a small pass, waking the second thread for each layer
# costs more than it brings.
SMALL_BATCH = 16


class FerClassifier(mlflow.pyfunc.PythonModel):
    """Images in, emotions out; the mean of its members' class probabilities."""

    def load_context(self, context) -> None:
        keys = sorted((k for k in context.artifacts if k.startswith(MEMBER_PREFIX)), key=lambda k: int(k[len(MEMBER_PREFIX):]))
        self.members = [load_network(context.artifacts[k]) for k in keys]
        self.tta = check_tta((context.model_config or {}).get(TTA_CONFIG, "none"))
        self.threads = ThreadShare()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        deadline = float(os.environ[DEADLINE_ENV]) if os.environ.get(DEADLINE_ENV) else None
        whole = bool((params or {}).get(WHOLE_IMAGE_PARAM, False))
        values = values_from_frame(model_input)
        try:
            return predict_faces(self.members, values, self.tta, whole, deadline, self.threads)
        finally:
            if len(values) >= SMALL_BATCH:
                release_memory()


def release_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere): after a
    large request the server otherwise kept them."""
    try:
        trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:  # not glibc (macOS, musl): nothing to do
        return
    if trim is not None:
        trim(0)


class ThreadShare:
    """Each prediction's torch threads: one for fewer than `SMALL_BATCH` images, else this process's
    threads (torch's default, or OMP_NUM_THREADS: `tuning.serve --threads`) divided among the predictions
    in flight, at least one each. `torch.set_num_threads` from the predicting thread sets that thread's
    OpenMP team, so concurrent requests each run on their own share."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or torch.get_num_threads()
        self._lock = threading.Lock()
        self.in_flight = 0

    def share(self, images: int) -> int:
        """The threads a prediction of `images` gets now, with `in_flight` predictions running (itself too)."""
        if images < SMALL_BATCH:
            return 1
        return max(1, self.cores // max(1, self.in_flight))

    @contextlib.contextmanager
    def threads_for(self, images: int):
        """Run the block on this prediction's share of threads (yielded); torch's setting is restored after."""
        with self._lock:
            self.in_flight += 1
            n = self.share(images)
        torch.set_num_threads(n)
        try:
            yield n
        finally:
            with self._lock:
                self.in_flight -= 1
            torch.set_num_threads(self.cores)


def values_from_frame(frame: Any) -> list[Any]:
    """The ``image`` column's values, plain base64 strings decoded (an ``inputs``/``instances`` body or a
    CSV passes them undecoded); no such column, or more than `MAX_IMAGES` rows, is a 400-class error."""
    if not isinstance(frame, pd.DataFrame) or IMAGE_COLUMN not in frame.columns:
        raise MlflowException(f"the input needs a column {IMAGE_COLUMN!r} of encoded images (base64 in JSON)",
                              error_code=INVALID_PARAMETER_VALUE)
    if len(frame) > MAX_IMAGES:
        raise MlflowException(f"a request holds at most {MAX_IMAGES} images, got {len(frame)}: send them in "
                              f"requests of {MAX_IMAGES} or fewer", error_code=INVALID_PARAMETER_VALUE)
    return [_decoded(i, v) for i, v in enumerate(frame[IMAGE_COLUMN])]


# How encoded images begin (PNG, JPEG, GIF, BMP, TIFF both byte orders, WebP's RIFF): base64 text decoded to
# one of these is an image an ``inputs``/``instances`` body sent as text (MLflow hands it over as bytes).
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _decoded(row: int, value: Any) -> Any:
    """A value as an image: base64 text (a str, or bytes that are base64 of an image) decoded; else as it is."""
    if isinstance(value, (bytes, bytearray)) and not bytes(value[:4]).startswith(_IMAGE_MAGIC):
        try:
            decoded = base64.b64decode(bytes(value), validate=True)
        except (binascii.Error, ValueError):
            return value
        return decoded if decoded.startswith(_IMAGE_MAGIC) else value
    if not isinstance(value, str):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MlflowException(f"row {row}: a string must be a base64-encoded image", error_code=INVALID_PARAMETER_VALUE) from None


def member_probabilities(members: Sequence, images, tta: str = "none") -> np.ndarray:
    """The members' mean class probabilities (N, 7) for uint8 images, each with test-time augmentation `tta`
    (averaged as the final stage evaluated the ensemble: `fer_model.ensemble.average`)."""
    return average([predict_proba(model, images, spec.outputs_probabilities, tta=tta, device="cpu", batch_size=SERVE_BATCH)
                    for model, spec in members]).numpy()


def predict_frame(members: Sequence, images, tta: str = "none") -> pd.DataFrame:
    probs = member_probabilities(members, images, tta) if len(images) else np.zeros((0, len(CLASS_NAMES)))
    labels = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    frame = pd.DataFrame({LABEL: labels.astype(np.int64), EMOTION: [CLASS_NAMES[i] for i in labels]})
    for j, column in enumerate(PROB_COLUMNS):
        frame[column] = probs[:, j].astype(np.float64)
    return frame


def predict_faces(members: Sequence, values: Sequence[Any], tta: str = "none", whole_image: bool = False,
                  deadline_s: float | None = None, threads: ThreadShare | None = None) -> pd.DataFrame:
    """One row per face of `values` (images as users hold them), then one per input without a face, in
    input order (see the module docstring). Past `deadline_s` seconds the work stops with a 504-class error.
    With `threads`, the networks run on the share of torch's threads it gives this many faces."""
    start = time.monotonic()

    def check_time() -> None:
        if deadline_s is not None and time.monotonic() - start > deadline_s:
            raise MlflowException(f"the prediction took longer than {deadline_s:g} s and was stopped: send fewer or "
                                  "smaller images a request", error_code=DEADLINE_EXCEEDED)

    try:  # the deadline is checked before each image is decoded
        batch = face_batch(values, whole_image, before_each=check_time)
    except ImageError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
    check_time()
    with threads.threads_for(len(batch.images)) if threads is not None else contextlib.nullcontext():
        frame = predict_frame(members, batch.images, tta)
    boxes = batch.faces
    frame.insert(0, ROW, np.asarray(batch.rows, dtype=np.int64))
    frame.insert(1, FACE_FOUND, True)
    for j, key in enumerate(BOX_COLUMNS):
        frame.insert(2 + j, key, np.asarray([getattr(b, key) for b in boxes], dtype=np.int64))
    frame.insert(6, FACE_SCORE, np.asarray([NOT_DETECTED if math.isnan(b.score) else b.score for b in boxes], dtype=np.float64))
    if batch.no_face:
        none = pd.DataFrame({ROW: np.asarray(batch.no_face, dtype=np.int64), FACE_FOUND: False,
                             **{k: np.int64(-1) for k in BOX_COLUMNS}, FACE_SCORE: NOT_DETECTED, LABEL: np.int64(-1),
                             EMOTION: NO_FACE, **{c: 0.0 for c in PROB_COLUMNS}})
        frame = pd.concat([frame, none], ignore_index=True).sort_values(ROW, kind="stable", ignore_index=True)
    return frame


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (48, 48) image as PNG bytes (the model's input example)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def signature():
    """Images in; a row per face out; the ``whole_image`` param (see the module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("long", ROW), ColSpec("boolean", FACE_FOUND), *[ColSpec("long", c) for c in BOX_COLUMNS],
                        ColSpec("double", FACE_SCORE), ColSpec("long", LABEL), ColSpec("string", EMOTION),
                        *[ColSpec("double", c) for c in PROB_COLUMNS]]),
        params=ParamSchema([ParamSpec(WHOLE_IMAGE_PARAM, "boolean", False)]))


def save(path: Path, networks: Sequence[tuple[Any, Any]], example_image: np.ndarray, tta: str = "none") -> Path:
    """Save an MLflow pyfunc model of `networks` ((module, ModelSpec) pairs) at `path`; its predictions
    average over the views of test-time augmentation `tta` (`fer_model.inputs.tta_views`)."""
    import shutil
    import tempfile


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
                              "pandas", "pillow", "scikit-learn", f"dlib-bin=={_version('dlib-bin')}"])  # dlib: faces
    return path
