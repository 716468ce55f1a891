"""Models registered before tuning/ was split into packages still load and answer the same.

`tests/data/model-2026-12-01` was saved by `tuning.pyfunc.save` as it was before the split (a cnn-bn at
width 0.25, flip TTA); its python_model.pkl names the class `tuning.pyfunc.FerClassifier`. In a process
that has imported today's `tuning` (as `tuning.predict` has when it loads a model), that name must
resolve to today's class, through the one-line re-export in `tuning/pyfunc.py`.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from fer_model.config import ModelSpec
from fer_model.model import build_model
from tuning.registry import pyfunc

DATA = Path(__file__).resolve().parents[1] / "data"
LOAD = """
import sys
import numpy as np, pandas as pd
import mlflow.pyfunc
from tuning.registry import pyfunc  # today's code first, as in tuning.predict
model = mlflow.pyfunc.load_model(sys.argv[1])
inner = model.unwrap_python_model()
assert type(inner) is pyfunc.FerClassifier, (type(inner).__module__, type(inner).__qualname__)
check = np.load(sys.argv[2])
frame = model.predict(pd.DataFrame({"image": [pyfunc.png_bytes(i) for i in check["images"]]}))
np.save(sys.argv[3], frame[pyfunc.PROB_COLUMNS].to_numpy())
"""


@pytest.mark.e2e  # a real process or the real data, seconds each: not in the -m 'not e2e' minute
def test_a_model_saved_before_the_split_loads_and_predicts_as_it_did(tmp_path):
    model = shutil.copytree(DATA / "model-2026-12-01", tmp_path / "model")
    out = tmp_path / "probs.npy"
    proc = subprocess.run([sys.executable, "-c", LOAD, str(model), str(DATA / "model-2026-12-01-check.npz"), str(out)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = np.load(DATA / "model-2026-12-01-check.npz")["probs"]
    # Inference is fp32 on every CPU (fer_model.device.fp32): the same weights give the same numbers.
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    assert (np.load(out).argmax(1) == expected.argmax(1)).all()


# --------------------------------------------------------------------------- faces first


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    import mlflow.pyfunc

    torch.manual_seed(0)
    spec = ModelSpec("cnn-bn", {"width": 0.25})
    path = pyfunc.save(tmp_path_factory.mktemp("model") / "model", [(build_model(spec).eval(), spec)],
                       np.zeros((48, 48), np.uint8))
    return mlflow.pyfunc.load_model(str(path))


def _photos() -> list[bytes]:
    return [(DATA / "astronaut-256.jpg").read_bytes(), (DATA / "coffee-300.jpg").read_bytes(),
            pyfunc.png_bytes(np.full((48, 48), 90, np.uint8))]


def test_a_row_per_face_with_its_input_row_and_box_and_a_no_face_row_never_a_guess(saved_model):
    frame = saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: _photos()}))
    assert list(frame[pyfunc.ROW]) == [0, 1, 2] and list(frame[pyfunc.FACE_FOUND]) == [True, False, True]
    face, none, crop = (frame.iloc[i] for i in range(3))
    assert abs(face["x"] - 88) < 8 and abs(face["y"] - 41) < 8 and face[pyfunc.FACE_SCORE] > 0
    assert face[pyfunc.PROB_COLUMNS].sum() == pytest.approx(1.0, abs=1e-6) and 0 <= face[pyfunc.LABEL] < 7
    assert none[pyfunc.EMOTION] == pyfunc.NO_FACE and none[pyfunc.LABEL] == -1 and (none[pyfunc.PROB_COLUMNS] == 0).all()
    assert (crop["x"], crop["y"], crop["w"], crop["h"]) == (0, 0, 48, 48) and crop[pyfunc.FACE_SCORE] == pyfunc.NOT_DETECTED
    assert not frame.isna().any().any()  # a served answer must be valid JSON: no NaN
    # The 48x48 path is the network on the image itself, as before faces were looked for.
    alone = saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: _photos()[2:]}))
    np.testing.assert_array_equal(alone[pyfunc.PROB_COLUMNS].to_numpy()[0], crop[pyfunc.PROB_COLUMNS].to_numpy(dtype=float))


def test_whole_image_takes_every_image_as_one_face(saved_model):
    frame = saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: _photos()}), params={pyfunc.WHOLE_IMAGE_PARAM: True})
    assert list(frame[pyfunc.ROW]) == [0, 1, 2] and frame[pyfunc.FACE_FOUND].all()


def test_base64_strings_are_images_too_and_a_bad_one_is_named(saved_model):
    photos = _photos()
    as_text = saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: [base64.b64encode(p).decode() for p in photos]}))
    as_bytes = saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: photos}))
    pd.testing.assert_frame_equal(as_text, as_bytes)
    # base64 text handed over as bytes (MLflow does so for an inputs/instances body) is decoded too; raw grey levels are not
    as_b64_bytes = saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: [base64.b64encode(p) for p in photos]}))
    pd.testing.assert_frame_equal(as_b64_bytes, as_bytes)
    raw = np.full((48, 48), ord("A"), np.uint8).tobytes()  # 2,304 bytes that are also valid base64 text
    assert pyfunc.values_from_frame(pd.DataFrame({pyfunc.IMAGE_COLUMN: [raw]})) == [raw]
    with pytest.raises(MlflowException, match="row 1: a string must be a base64-encoded image") as exc:
        pyfunc.values_from_frame(pd.DataFrame({pyfunc.IMAGE_COLUMN: [base64.b64encode(photos[0]).decode(), "no!"]}))
    assert exc.value.get_http_status_code() == 400


def test_work_stops_at_the_deadline_with_a_504():
    members = [(build_model(ModelSpec("cnn-bn", {"width": 0.25})).eval(), ModelSpec("cnn-bn", {"width": 0.25}))]
    with pytest.raises(MlflowException, match="longer than 0 s and was stopped") as exc:
        pyfunc.predict_faces(members, _photos(), deadline_s=0.0)
    assert exc.value.get_http_status_code() == 504
    assert len(pyfunc.predict_faces(members, _photos(), deadline_s=60.0)) == 3


def test_a_prediction_runs_on_its_share_of_torch_threads_and_leaves_them_as_they_were(saved_model, monkeypatch):
    share = pyfunc.ThreadShare(cores=4)
    assert share.share(1) == share.share(pyfunc.SMALL_BATCH - 1) == 1  # small: one thread, however idle
    share.in_flight = 1
    assert share.share(pyfunc.SMALL_BATCH) == 4  # large and alone: every core
    share.in_flight = 3
    assert share.share(64) == 1 and pyfunc.ThreadShare(cores=8).share(64) == 8
    share.in_flight = 0

    # Through the served path, from worker threads as MLflow's scoring server calls the model.
    seen: list[int] = []
    real = pyfunc.predict_frame
    monkeypatch.setattr(pyfunc, "predict_frame", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    inner = saved_model.unwrap_python_model()
    before = torch.get_num_threads()
    crop = pyfunc.png_bytes(np.full((48, 48), 90, np.uint8))
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for n in (1, pyfunc.SMALL_BATCH):
            pool.submit(saved_model.predict, pd.DataFrame({pyfunc.IMAGE_COLUMN: [crop] * n})).result()
    assert seen == [1, inner.threads.cores] and inner.threads.in_flight == 0
    assert torch.get_num_threads() == before


def test_a_large_request_hands_free_memory_back_and_a_small_one_does_not(saved_model, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(pyfunc, "release_memory", lambda: calls.append(1))
    crop = pyfunc.png_bytes(np.full((48, 48), 90, np.uint8))
    saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: [crop]}))
    assert calls == []
    saved_model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: [crop] * pyfunc.SMALL_BATCH}))
    assert calls == [1]
    monkeypatch.undo()
    pyfunc.release_memory()  # the real one runs without error, glibc or not
