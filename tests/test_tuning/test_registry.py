"""Promotion, prediction and serving against a real sqlite MLflow registry, a real pyfunc and a real
`mlflow models serve` process."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import PROB_ATOL, free_port, run_main
from mlflow.tracking import MlflowClient
from PIL import Image

from fer_model import metrics as M
from fer_model.config import CLASS_NAMES, ModelSpec
from fer_model.inputs import open_image, predict_proba, to_gray48
from fer_model.model import build_model
from tuning import names as N
from tuning import predict, promote
from tuning.registry import promotion as registry, pyfunc

NAME = N.DEFAULT_MODEL_NAME


@pytest.fixture
def store(workdir):
    """A real sqlite store with a registered model; `add(test_acc, test_size)` registers a version."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(workdir / "art").as_uri())
    client.create_registered_model(NAME)

    def add(test_acc: float, test_size: int = 56) -> str:
        run = client.create_run(exp, tags={N.TAG_STAGE: N.STAGE_FINAL})
        client.log_metric(run.info.run_id, M.TEST_ACC, test_acc)
        client.log_metric(run.info.run_id, M.TEST_LOSS, 1.0 - test_acc)
        client.set_terminated(run.info.run_id)  # a final run that ended: promotion refuses any other
        tags = {N.TAG_DATA_FINGERPRINT: "abc" if test_size == 56 else "sub", N.TAG_TEST_SIZE: str(test_size)}
        return str(client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags=tags).version)

    return client, add


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def test_guarded_promotion_and_rollback(store, capsys):
    client, add = store
    v1 = add(0.50)
    assert run_main(promote.main, []) == 0 and champion(client) == v1
    assert "no champion yet" in capsys.readouterr().out

    v2 = add(0.55)
    assert run_main(promote.main, []) == 0
    assert champion(client) == v2 and str(client.get_model_version_by_alias(NAME, "previous").version) == v1
    tags = client.get_model_version(NAME, v2).tags
    assert tags[registry.TAG_REPLACED] == v1 and "0.5500" in tags[registry.TAG_DECISION] and "0.5000" in tags[registry.TAG_DECISION]

    v3 = add(0.52)  # worse: refused with exit 3, the alias unmoved
    assert run_main(promote.main, []) == 3 and champion(client) == v2
    out = capsys.readouterr().out
    assert "0.5200" in out and "0.5500" in out and "not better" in out

    v4 = add(0.555)  # better by 0.005: not by more than --min-delta 0.01
    assert run_main(promote.main, ["--min-delta", 0.01]) == 3 and champion(client) == v2
    assert run_main(promote.main, ["--version", v4, "--dry-run"]) == 0  # it would move ...
    assert champion(client) == v2 and "would move" in capsys.readouterr().out  # ... but a dry run changes nothing

    v5 = add(0.90, test_size=1000)  # scored on other test data: never displaces the champion ...
    assert run_main(promote.main, ["--version", v5]) == 3 and champion(client) == v2
    assert "not comparable" in capsys.readouterr().out
    assert run_main(promote.main, ["--version", v5, "--force"]) == 0 and champion(client) == v5  # ... unless forced

    assert run_main(promote.main, ["--rollback"]) == 0 and champion(client) == v2
    assert f"from version {v5} back to version {v2}" in capsys.readouterr().out
    assert run_main(promote.main, ["--rollback"]) == 2  # nothing left to go back to
    assert run_main(promote.main, ["--version", v3, "--metric", "test_loss"]) == 3  # lower loss wins: 0.48 > 0.45
    assert run_main(promote.main, ["--metric", "nope"]) == 2
    assert run_main(promote.main, ["--alias", "latest"]) == 2 and "--alias 'latest' cannot be used" in capsys.readouterr().err


def _model(spec: ModelSpec, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(spec).eval()


@pytest.mark.parametrize("arch", ["cnn", "cnn-softmax"])
def test_pyfunc_takes_images_as_users_hold_them(tmp_path, arch, precision):
    """The registered model's probabilities are the training-time path's, in fp32 (summing to 1) with
    bf16 training forced on or off: a model scores the same on CPUs with and without native bf16."""
    import mlflow.pyfunc

    spec = ModelSpec(arch)
    net = _model(spec)
    rng = np.random.RandomState(1)
    gray = [rng.randint(0, 256, (48, 48)).astype(np.uint8) for _ in range(3)]
    model = mlflow.pyfunc.load_model(str(pyfunc.save(tmp_path / "m", [(net, spec)], gray[0])))

    def encoded(img, fmt, size=None, mode="L"):
        im = Image.fromarray(img).convert(mode)
        im = im.resize(size) if size else im
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    inputs = {"png": [encoded(g, "PNG") for g in gray], "raw": [g.tobytes() for g in gray],
              "jpeg": [encoded(g, "JPEG") for g in gray], "colour64": [encoded(g, "PNG", (64, 64), "RGB") for g in gray]}
    # Not 48x48: faces are looked for, and these noise images have none; taken whole, they are resized as training did.
    assert not model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: inputs["colour64"]}))[pyfunc.FACE_FOUND].any()
    for kind, blobs in inputs.items():
        whole = {pyfunc.WHOLE_IMAGE_PARAM: True} if kind == "colour64" else None
        out = model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: blobs}), params=whole)
        # The training-time path on the same pixels: the data layer's conversion, then predict_proba.
        pixels = torch.from_numpy(np.stack([to_gray48(open_image(b)) if kind != "raw" else g
                                            for b, g in zip(blobs, gray)])[:, None])
        expected = predict_proba(net, pixels, spec.outputs_probabilities, device="cpu").numpy()
        assert out[pyfunc.LABEL].tolist() == expected.argmax(1).tolist(), kind
        assert np.allclose(out[pyfunc.PROB_COLUMNS].to_numpy(), expected, rtol=0, atol=PROB_ATOL), kind
        assert np.allclose(out[pyfunc.PROB_COLUMNS].sum(axis=1), 1.0, rtol=0, atol=PROB_ATOL), kind
        assert out[pyfunc.EMOTION].tolist() == [CLASS_NAMES[i] for i in out[pyfunc.LABEL]]
    with pytest.raises(Exception, match="row 1: not a readable image"):
        model.predict(pd.DataFrame({pyfunc.IMAGE_COLUMN: [inputs["png"][0], b"not an image"]}))


@pytest.mark.e2e
def test_predict_and_serve_the_champion(store, workdir, tiny_folder, capsys, caplog):
    """Register a real pyfunc, promote it, predict files with tuning.predict, and serve it over REST."""
    client, _ = store
    spec = ModelSpec("cnn")
    run = client.create_run(client.get_experiment_by_name("e").experiment_id)
    path = pyfunc.save(workdir / "model", [(_model(spec), spec)], np.zeros((48, 48), np.uint8))
    client.log_artifacts(run.info.run_id, str(path), "model")
    client.log_metric(run.info.run_id, M.TEST_ACC, 0.5)
    client.set_terminated(run.info.run_id)
    version = str(client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"

    # No champion yet: one line naming what to run, exit 2.
    files = sorted((tiny_folder / "test").rglob("*.png"))[:2]
    assert run_main(predict.main, [*files, "--tracking-uri", uri]) == 2
    assert "tuning.promote" in capsys.readouterr().err
    assert run_main(promote.main, ["--tracking-uri", uri]) == 0 and champion(client) == version
    capsys.readouterr()

    (workdir / "broken.png").write_bytes(b"\x89PNG broken")
    assert run_main(predict.main, [*files, workdir / "broken.png", "--tracking-uri", uri, "--format", "json", "--top-k", 3]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["input"] for r in rows] == [str(f) for f in files] and len(rows[0]["top"]) == 3
    assert "skipped 1 unreadable file" in caplog.text and "broken.png" in caplog.text

    assert run_main(predict.main, [*files, "--tracking-uri", uri, "--out", workdir / "no" / "p.csv"]) == 2
    assert "--out" in capsys.readouterr().err

    # A labelled FER2013 source: its test images, with accuracy.
    assert run_main(predict.main, [tiny_folder, "--tracking-uri", uri, "--format", "csv", "--out", workdir / "p.csv"]) == 0
    assert "56 labelled test images: test accuracy" in capsys.readouterr().out
    assert len((workdir / "p.csv").read_text().splitlines()) == 57

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(url + "/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)

        def post(payload):
            req = urllib.request.Request(url + "/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read() or b"{}")

        records = [{"image": base64.b64encode(f.read_bytes()).decode()} for f in files]
        status, body = post({"dataframe_records": records})
        assert status == 200, body
        served = body["predictions"]
        assert [p["emotion"] for p in served] == [r["emotion"] for r in rows]
        for p, r in zip(served, rows):
            assert p["p_" + r["top"][0][0]] == pytest.approx(r["top"][0][1], abs=1e-6)
        status, body = post({"dataframe_records": [{"image": base64.b64encode(b"hello").decode()}]})
        assert status == 400 and "not a readable image" in body.get("message", "")
        status, body = post({"dataframe_records": [{"picture": "x"}]})
        assert status == 400 and "image" in body.get("message", "")
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
