"""The commands as a shell runs them: user errors are one line and exit code 2, and come fast."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port

from fer_model.errors import ConfigError, UserError
from tuning.options import check_ray_address

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["grid", "search", "final", "promote", "predict"]


def _env(**extra: str) -> dict[str, str]:
    """This environment, without a Ray or MLflow address of its own, importing this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _run(argv: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env(**env), cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_address_with_no_ray_cluster_is_one_line_at_once(tmp_path, tiny_folder, how):
    """Ray itself retried a dead GCS for minutes (still at it after 45 s when killed)."""
    address = f"127.0.0.1:{free_port()}"  # bound, then closed: nothing listens there
    flag = ["--address", address] if how == "flag" else []
    env = {"RAY_ADDRESS": address} if how == "env" else {}
    start = time.monotonic()
    proc = _run(["-m", "tuning.grid", "--data", str(tiny_folder), *flag], tmp_path, timeout=15, **env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert address in lines[0] and "python -m cluster.local up" in lines[0] and "ray start --head" in lines[0]
    assert ("--address" if how == "flag" else "RAY_ADDRESS") in lines[0]
    assert elapsed < 15
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store is touched


def test_check_ray_address(tmp_path):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}")
        check_ray_address(f"ray://127.0.0.1:{port}")
    check_ray_address("auto")  # left to Ray: it finds the local cluster itself
    with pytest.raises(UserError, match="ray://127.0.0.1"):
        check_ray_address(f"ray://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        check_ray_address("127.0.0.1")


@pytest.mark.parametrize("flag", [["--epoch", "2"], ["--max-sample", "30"]])
def test_an_abbreviated_flag_is_refused(tmp_path, flag):
    proc = _run(["-m", "tuning.grid", *flag], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"python -m tuning.grid: error: unrecognized arguments: {' '.join(flag)} (see --help)"]


CHECK_IMPORTS = """
import sys
from tuning.{name} import main
try:
    main(["--no-such-flag"])
except SystemExit as exc:
    print(exc.code, "ray" in sys.modules, "mlflow" in sys.modules)
"""


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_flag_is_answered_before_ray_or_mlflow_load(tmp_path, name):
    """Importing Ray or MLflow takes seconds: a typo must not wait for them."""
    proc = _run(["-c", CHECK_IMPORTS.format(name=name)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr[-2000:]
