"""`python -m tuning.serve` end to end: a real registered model in a sqlite registry, the real command in
its own process group, MLflow's real scoring server behind it, real HTTP requests (curl where installed)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import PROB_ATOL, free_port
from mlflow.tracking import MlflowClient
from PIL import Image

from fer_model.config import CLASS_NAMES, ModelSpec
from fer_model.model import build_model
from tuning import names as N
from tuning import serve
from tuning.registry import pyfunc

pytestmark = pytest.mark.e2e

NAME = N.DEFAULT_MODEL_NAME
SMALL = ModelSpec("cnn", {"conv3_channels": 64, "hidden": 64})  # the study's CNN, narrower: quick to save and load
START_TIMEOUT_S = 240  # the command, then MLflow's CLI, then uvicorn each import MLflow and torch on 2 busy cores


def register(root: Path, champion: bool = True, spec: ModelSpec = SMALL) -> str:
    """A sqlite store under `root` holding an untrained `spec` network registered as version 1 of fer2013-cnn
    (with the alias `champion` unless told not to): as the final stage registers one. Its tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(root / "art").as_uri())
    run = client.create_run(exp).info.run_id
    torch.manual_seed(0)
    path = pyfunc.save(root / "model", [(build_model(spec).eval(), spec)], np.zeros((48, 48), np.uint8))
    client.log_artifacts(run, str(path), "model")
    client.set_terminated(run)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, f"runs:/{run}/model", run_id=run).version
    if champion:
        client.set_registered_model_alias(NAME, "champion", version)
    return uri


def png(path: Path, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (48, 48)).astype(np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def command(*args) -> list[str]:
    return [sys.executable, "-m", "tuning.serve", *map(str, args)]


def run_command(*args, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def group_of(pid: int) -> set[int]:
    """The live (not zombie) processes of process group `pid`."""
    found = set()
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.add(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Served:
    """`python -m tuning.serve` as a user starts it, in a process group of its own (the scoring server it
    starts sits in another, its own); stopped by SIGTERM to the command alone, as `kill PID` does."""

    def __init__(self, root: Path, tracking_uri: str):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = root / "serve.out", root / "serve.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command("--tracking-uri", tracking_uri, "--port", self.port, "--timeout", 30,
                                                 "--threads", 1),
                                         cwd=root, stdout=out, stderr=err, start_new_session=True)
        self.server_groups: set[int] = set()

    def logs(self) -> str:
        return f"stdout:\n{self.out.read_text()[-3000:]}\nstderr:\n{self.err.read_text()[-3000:]}"

    def wait_ready(self) -> None:
        """Until the command has printed its curl line (which it does once the server answers /ping)."""
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline and "curl " not in self.out.read_text():
            assert self.proc.poll() is None, f"tuning.serve exited with {self.proc.returncode}:\n{self.logs()}"
            time.sleep(0.5)
        assert "curl " in self.out.read_text(), f"no curl line after {START_TIMEOUT_S} s:\n{self.logs()}"
        self.server_groups = {os.getpgid(c.pid) for c in psutil.Process(self.proc.pid).children(recursive=True)}

    def everything(self) -> set[int]:
        return set().union(group_of(self.proc.pid), *map(group_of, self.server_groups))

    def kill_all(self) -> None:
        """The last resort: SIGKILL both groups (only these, which this test started)."""
        for pgid in {self.proc.pid, *self.server_groups}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    server = Served(root, register(root))
    try:
        server.wait_ready()
        yield server
    finally:
        if server.proc.poll() is None or server.everything():
            server.kill_all()


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def check_predictions(body: dict, n: int) -> None:
    rows = body["predictions"]
    assert len(rows) == n, body
    for row in rows:
        assert row["emotion"] == CLASS_NAMES[row["label"]]
        assert sum(row[c] for c in pyfunc.PROB_COLUMNS) == pytest.approx(1.0, abs=PROB_ATOL)


def test_the_printed_lines_work_as_printed(served, tmp_path):
    """The request and curl lines the command prints, run as a user pastes them (PHOTO filled in)."""
    lines = [line.strip() for line in served.out.read_text().splitlines()]
    request = next(line for line in lines if "-m tuning.serve request" in line)
    curl = next(line for line in lines if line.startswith("curl "))
    assert f"{served.url}/invocations" in curl and "-d @request.json" in curl
    photos = [png(tmp_path / "a.png", 1), png(tmp_path / "b b.png", 2)]
    subprocess.run(request.replace("PHOTO [PHOTO...]", " ".join(f"'{p}'" for p in photos)), shell=True, cwd=tmp_path,
                   check=True, timeout=120)
    body = json.loads((tmp_path / "request.json").read_text())
    assert body["dataframe_split"]["columns"] == [pyfunc.IMAGE_COLUMN]
    assert [base64.b64decode(r[0]) for r in body["dataframe_split"]["data"]] == [p.read_bytes() for p in photos]
    if shutil.which("curl"):
        answer = subprocess.run(curl, shell=True, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120)
        check_predictions(json.loads(answer.stdout), 2)
    status, answer = post(served.url, (tmp_path / "request.json").read_bytes())
    assert status == 200, answer
    check_predictions(answer, 2)


def test_inputs_and_instances_bodies_are_answered(served, tmp_path):
    """MLflow hands the model these bodies' base64 strings as bytes, still base64: the model decodes them."""
    encoded = base64.b64encode(png(tmp_path / "a.png").read_bytes()).decode()
    for body in ({"inputs": {"image": [encoded, encoded]}}, {"instances": [{"image": encoded}, {"image": encoded}]}):
        status, answer = post(served.url, json.dumps(body).encode())
        assert status == 200, (body.keys(), answer)
        check_predictions(answer, 2)


def test_a_photo_gives_its_face_and_a_photo_without_one_says_so(served, tmp_path):
    data = Path(__file__).resolve().parents[1] / "data"
    done = run_command("request", data / "astronaut-256.jpg", data / "coffee-300.jpg", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status, answer = post(served.url, done.stdout.encode())
    assert status == 200, answer
    face, none = answer["predictions"]
    assert (face["row"], face["face_found"], none["row"], none["face_found"]) == (0, True, 1, False)
    # the face's box overlaps the astronaut's face, at about (88, 41, 45, 44)
    assert abs(face["x"] - 88) < 10 and abs(face["y"] - 41) < 10 and 30 < face["w"] < 60
    assert none["emotion"] == "no face" and none["label"] == -1


def test_a_non_image_is_a_400_and_the_server_lives_on(served, tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    done = run_command("request", png(tmp_path / "a.png"), tmp_path / "notes.txt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status, answer = post(served.url, done.stdout.encode())
    assert status == 400, answer
    # MLflow's scoring server wraps the model's one-line message: "Failed to predict data '<the frame>'. \nError:
    # <the model's>" (mlflow.pyfunc.scoring_server.invocations); the model's line is the last, whole.
    last = answer.get("message", "").splitlines()[-1]
    assert last.startswith("Error: row 1: ") and "not a readable image" in last, answer
    assert serve.answers_ping(served.url)


def test_the_request_helper_refuses_a_missing_file(tmp_path):
    done = run_command("request", png(tmp_path / "a.png"), tmp_path / "nope.png", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: no such file: {tmp_path / 'nope.png'}"]


def test_no_champion_and_a_busy_port_are_one_line_each(tmp_path):
    (tmp_path / "a").mkdir()
    uri = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model(NAME)  # a model, but no version holds `champion`
    port = free_port()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    done = run_command("--tracking-uri", uri, "--port", port, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "champion" in lines[0] and "tuning.promote" in lines[0], lines

    with socket.socket() as taken:  # something else listens on the port
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = run_command("--tracking-uri", register(tmp_path), "--port", port, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
    assert done.stdout == ""  # no "serving ..." line: no server was started
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before and port_free(port)

    missing = run_command("--tracking-uri", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", "--port", port, cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_the_command_itself_holds_no_model(served):
    """The waiting process imports neither torch nor the model (the scoring server holds it): the names it
    restates instead are the model's."""
    assert (serve.IMAGE_COLUMN, serve.MAX_IMAGES, serve.DEADLINE_ENV) == \
        (pyfunc.IMAGE_COLUMN, pyfunc.MAX_IMAGES, pyfunc.DEADLINE_ENV)
    assert "libtorch" not in Path(f"/proc/{served.proc.pid}/maps").read_text()
    assert psutil.Process(served.proc.pid).memory_info().rss < 200 * 2**20


def test_the_scoring_server_runs_on_this_interpreter(served, tmp_path):
    """MLflow starts ``uvicorn`` by name; the shim first on PATH makes it this interpreter's, not whichever
    ``uvicorn`` the PATH holds (a --system-site-packages venv has none of its own: the system's would run)."""
    uvicorns = [c.cmdline() for c in psutil.Process(served.proc.pid).children(recursive=True) if "uvicorn" in c.cmdline()]
    assert uvicorns and all(cmd[:3] == [sys.executable, "-m", "uvicorn"] for cmd in uvicorns), uvicorns
    shim = serve.uvicorn_shim(tmp_path)
    done = subprocess.run([str(shim), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "uvicorn" in done.stdout.lower()


def test_threads_reach_every_worker_and_a_bad_count_is_refused(served, tmp_path):
    """--threads 1 (the fixture's): the workers' torch reads OMP_NUM_THREADS when it starts, and the line says so."""
    assert "1 worker, 1 torch thread each" in served.out.read_text()
    workers = [c for c in psutil.Process(served.proc.pid).children(recursive=True)
               if "OMP_NUM_THREADS=1" in Path(f"/proc/{c.pid}/environ").read_text().split("\0")]
    assert workers, "no server process has OMP_NUM_THREADS=1"
    done = run_command("--threads", 0, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == ["error: --threads must be >= 1, got 0"]


def test_sigterm_stops_the_server_and_leaves_nothing(served):
    """`kill PID` of the command: it passes the signal on to the scoring server's group, waits, exits 130."""
    assert served.server_groups and served.server_groups.isdisjoint({served.proc.pid})  # a group of its own
    assert all(group_of(g) for g in served.server_groups)
    os.kill(served.proc.pid, signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 130, served.logs()
    assert served.everything() == set(), served.logs()
    assert not serve.answers_ping(served.url) and port_free(served.port)
