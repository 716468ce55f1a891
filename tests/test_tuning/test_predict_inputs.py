"""`tuning.predict` and the registered pyfunc on real inputs: oversized files skipped, request size
bounded, and a labelled test/-only folder scored, against a real sqlite registry and a real pyfunc."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import run_main
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from synthetic import make_images, png_bytes, write_folder
from test_fer_model.test_inputs import png_header

from fer_model.config import ModelSpec
from fer_model.model import build_model
from tuning import names as N
from tuning import predict
from tuning.registry import pyfunc


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, model URI) of a real CNN pyfunc registered as version 1 in a sqlite store."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(root / "art").as_uri())
    client.create_registered_model(N.DEFAULT_MODEL_NAME)
    spec = ModelSpec("cnn")
    path = pyfunc.save(root / "model", [(build_model(spec).eval(), spec)], np.zeros((48, 48), np.uint8))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(path), "model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(N.DEFAULT_MODEL_NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return uri, f"models:/{N.DEFAULT_MODEL_NAME}/{version.version}"


def test_a_request_beyond_max_images_is_a_400_naming_the_limit():
    assert pyfunc.MAX_IMAGES == 4096
    one = png_bytes(np.zeros((48, 48), np.uint8))
    assert len(pyfunc.values_from_frame(pd.DataFrame({pyfunc.IMAGE_COLUMN: [one] * 4096}))) == 4096
    with pytest.raises(MlflowException, match="at most 4096 images, got 4097") as info:
        pyfunc.values_from_frame(pd.DataFrame({pyfunc.IMAGE_COLUMN: [one] * 4097}))
    assert info.value.error_code == "INVALID_PARAMETER_VALUE" and info.value.get_http_status_code() == 400
    spec = ModelSpec("cnn")
    members = [(build_model(spec).eval(), spec)]
    values = pyfunc.values_from_frame(pd.DataFrame({pyfunc.IMAGE_COLUMN: [one, png_header(10000, 10000)]}))
    with pytest.raises(MlflowException, match="row 1: image of 10000 x 10000 = 100.0 Mpx exceeds the limit of 40 Mpx") as info:
        pyfunc.predict_faces(members, values)
    assert info.value.get_http_status_code() == 400
    assert pyfunc.predict_faces(members, values[:1])[pyfunc.FACE_SCORE].tolist() == [pyfunc.NOT_DETECTED]  # the crop alone


def test_predict_skips_an_oversized_file_and_predicts_the_rest(registered, tmp_path, capsys, caplog):
    uri, model = registered
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(make_images(np.arange(3))):
        (folder / f"face{i}.png").write_bytes(png_bytes(image))
    (folder / "huge.png").write_bytes(png_header(20000, 20000))  # 400 Mpx declared, a few bytes stored
    (folder / "big.png").write_bytes(png_header(7000, 7000))  # 49 Mpx: beyond ours, within Pillow's limit
    assert run_main(predict.main, [folder, "--model", model, "--tracking-uri", uri, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in rows] == [str(folder / f"face{i}.png") for i in range(3)]
    assert "skipped 2 unreadable file(s)" in caplog.text
    assert f"{folder / 'huge.png'} (image of 400.0 Mpx exceeds the limit of 40 Mpx" in caplog.text
    assert f"{folder / 'big.png'} (image of 7000 x 7000 = 49.0 Mpx exceeds the limit of 40 Mpx" in caplog.text


def test_predict_scores_a_test_only_folder_as_the_full_source(registered, tmp_path, capsys, monkeypatch):
    """test/<class>/*.jpg without train/ is scored; its numbers are the full folder's, read by the data layer."""
    uri, model = registered
    full = write_folder(tmp_path / "full", per_class_train=2, per_class_test=4, fmt="jpg")
    shutil.copytree(full / "test", tmp_path / "only" / "test")
    common = ["--model", model, "--tracking-uri", uri, "--cache-dir", tmp_path / "cache"]
    assert run_main(predict.main, [full, *common]) == 0
    expected = capsys.readouterr().out.split("labelled test images: ")[1]
    monkeypatch.setattr(pyfunc, "MAX_IMAGES", 5)  # 28 images in requests of 5: the chunks join in order
    assert run_main(predict.main, [tmp_path / "only", *common, "--format", "csv", "--out", tmp_path / "p.csv"]) == 0
    out = capsys.readouterr().out
    assert "28 labelled test images: " in out and out.split("labelled test images: ")[1] == expected
    assert "PublicTest" in expected and "PrivateTest" in expected  # halves placed by file name, as the data layer does
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 29 and lines[0].endswith(",label") and "/only/test/angry/" in lines[1]
