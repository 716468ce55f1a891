"""One real local Ray per test session; MLflow stores and Optuna storages per test, in tmp folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import pytest
from helpers import free_port

# Trials run in Ray worker processes, which inherit this environment.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder, as a user would: mlflow.db, optuna.db and ray_results land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 in its own process group, with its own sqlite store and
    artifact folder; it can be stopped, paused and started again on the same port and stores."""

    def __init__(self, root, port: int):
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0  # of the latest start: tens of seconds on a busy 2-core machine
        self.cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text()[-2000:]

    def start(self, timeout: float = 180) -> None:  # minutes on a 2-core machine busy with other tests
        t0 = time.time()
        with open(self.root / "server.log", "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_seconds = time.time() - t0
                        return
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {self.log_tail()}")
        self.stop()
        pytest.fail(f"mlflow server did not start: {self.log_tail()}")

    def send(self, sig: int) -> None:
        """Send `sig` to the server's whole process group (the CLI and its uvicorn workers)."""
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (SIGKILL after `timeout`) the process group; return once none of it is left (the port is free)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGCONT):  # SIGCONT: a paused server handles its SIGTERM
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
        deadline = time.time() + timeout
        while self.alive(pgid) and time.time() < deadline:
            time.sleep(0.1)
        if self.alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=timeout)
        self.proc = None

    def alive(self, pgid: int) -> bool:
        """Whether a process of group `pgid` still runs (zombies aside: init may reap them late)."""
        import psutil

        self.proc.poll()  # reap the leader
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False


@pytest.fixture
def mlflow_server_process(tmp_path):
    """The `MlflowServer` itself, for tests that stop, pause or restart it."""
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process):
    """The URL of a real `mlflow server` on 127.0.0.1, with its own sqlite store and artifact folder."""
    return mlflow_server_process.url
