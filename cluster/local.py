"""`python -m cluster.local`: a real multi-node Ray cluster and an `mlflow server` on this machine.

    python -m cluster.local up --workers 2          # a Ray head, 2 worker nodes, an mlflow server
    source .cluster/cluster.env                      # RAY_ADDRESS, MLFLOW_TRACKING_URI, Ray's token, Tune storage
    python -m tuning.grid --quick                    # joins the cluster, logs to the server
    python -m cluster.local status
    python -m cluster.local down                     # stops exactly what `up` started; keeps the MLflow data

Every node is its own `ray start --block` process (its own raylet and resources) in its own process
group, bound to 127.0.0.1; the head offers no CPUs, so trials run on the workers. Ray's token
authentication stays on: `up` writes a token under --dir and every node and client reads it.
`mlflow server` (sqlite under --dir, artifacts proxied by the server, so no node needs the driver's
disk) runs in its own process group too: its helpers outlive a SIGTERM to the server process alone.
`down` stops the process groups `up` recorded, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from fer_model.cli import Parser, run_cli
from fer_model.errors import UserError

STATE = "cluster.json"  # the lock: what `up` started
ENV_FILE = "cluster.env"
HOST = "127.0.0.1"
START_TIMEOUT = 120.0


@dataclass
class Started:
    """One process group `up` started: a Ray node or the MLflow server."""

    role: str  # head, worker-1, ..., mlflow
    pid: int  # the group leader (its pgid)
    pids: list[int] = field(default_factory=list)  # every process of the group seen after start
    log: str = ""
    started: dict[str, float] = field(default_factory=dict)  # pid -> start time: a reused pid is not ours


@dataclass
class ClusterState:
    dir: str
    ray_address: str
    tracking_uri: str
    storage: str
    token_path: str
    workers: int
    processes: list[Started]

    @classmethod
    def read(cls, folder: Path) -> "ClusterState | None":
        path = folder / STATE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(**{**raw, "processes": [Started(**p) for p in raw["processes"]]})

    def write(self) -> None:
        (Path(self.dir) / STATE).write_text(json.dumps(asdict(self), indent=1))


def _alive(pid: int, started: float | None = None) -> bool:
    """Whether `pid` runs (and, given its recorded start time, is still that process, not a reuse)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (started is None or abs(proc.create_time() - started) < 1)
    except psutil.NoSuchProcess:
        return False


def _ours(p: Started, pid: int | None = None) -> bool:
    pid = p.pid if pid is None else pid
    return _alive(pid, p.started.get(str(pid)))


def _record(p: Started) -> None:
    """The leader and every descendant (Ray's raylet, gcs_server, workers; mlflow's helpers), with start times."""
    import psutil

    try:
        procs = [psutil.Process(p.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    p.pids, p.started = [], {}
    for proc in procs:
        try:
            p.started[str(proc.pid)] = proc.create_time()
            p.pids.append(proc.pid)
        except psutil.NoSuchProcess:
            continue


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# Several nodes on one machine need Ray's cluster mode on (a stage's own local Ray turns it off to
# stay on loopback; see tuning.flags.keep_local_ray_on_loopback): nodes and clients set it.
MULTI_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def _env(token_path: Path) -> dict[str, str]:
    env = {**os.environ, **MULTI_NODE, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _spawn(role: str, cmd: list[str], folder: Path, env: dict[str, str]) -> Started:
    log = folder / "logs" / f"{role}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = Started(role, proc.pid, [proc.pid], str(log))
    _record(started)
    return started


def _stop(processes: Sequence[Started], timeout: float = 10.0) -> list[int]:
    """SIGTERM each recorded group, then SIGKILL what is left; returns recorded pids still alive.

    Ten seconds, not Ray's 30 s drain: a local cluster has no remote work to drain."""
    # Only groups whose leader is still the process `up` started (same pid and start time): after a
    # reboot or a crash the recorded ids may belong to someone else's processes now.
    leaders = [p for p in processes if _ours(p)]
    for p in leaders:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    ours = [(p, pid) for p in processes for pid in p.pids]
    deadline = time.time() + timeout
    while time.time() < deadline and any(_ours(p, pid) for p, pid in ours):
        time.sleep(0.3)
    for p in leaders:
        if _ours(p):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p, pid in ours:  # a recorded process that left its group is still ours: by id and start time
        if _ours(p, pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    time.sleep(0.5)
    return [pid for p, pid in ours if _ours(p, pid)]


def _wait_health(url: str, proc: Started, deadline: float) -> None:
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if not _ours(proc):
            raise UserError(f"mlflow server exited while starting; see {proc.log}")
        time.sleep(0.5)
    raise UserError(f"mlflow server did not answer {url}/health within {START_TIMEOUT:.0f} s; see {proc.log}")


def _wait_started(proc: Started, deadline: float) -> None:
    """Until `ray start` says the node runs (its log line), without asking the cluster: cheap to poll."""
    while time.time() < deadline:
        if "Ray runtime started" in Path(proc.log).read_text(errors="replace"):
            return
        if not _ours(proc):
            raise UserError(f"{proc.role} exited while starting; see {proc.log}")
        time.sleep(0.5)
    raise UserError(f"{proc.role} did not start within {START_TIMEOUT:.0f} s; see {proc.log}")


def _alive_nodes(address: str, token_path: Path) -> list[dict]:
    """The cluster's live nodes, asked in a fresh process (this one never joins the cluster)."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'alive': n['Alive'], "
            "'resources': n['Resources']} for n in ray.nodes()]))" % address)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(token_path), timeout=120)
        return [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if n["alive"]] if out.returncode == 0 else []
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        return []  # the cluster did not answer: no live node that we know of


def up(folder: Path, workers: int, cpus: int, gpus: int, ray_port: int, mlflow_port: int) -> ClusterState:
    """Start the head, the workers and the server; wait until all answer; write cluster.env."""
    state = ClusterState.read(folder)
    if state is not None and any(_ours(p) for p in state.processes):
        print(f"already up ({folder / STATE}); nothing changed. Use it: source {folder / ENV_FILE}")
        return state
    for name, port in (("--ray-port", ray_port), ("--mlflow-port", mlflow_port)):
        if not _port_free(port):
            raise UserError(f"{name} {port} is in use on {HOST}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "tune").mkdir(exist_ok=True)
    token_path = folder / "auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    env = _env(token_path)
    ray = [str(Path(sys.executable).parent / "ray")] if (Path(sys.executable).parent / "ray").exists() else ["ray"]
    address = f"{HOST}:{ray_port}"
    uri = f"http://{HOST}:{mlflow_port}"
    started: list[Started] = []
    try:
        started.append(_spawn("head", [*ray, "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={ray_port}",
                                       "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
                              folder, env))
        started.append(_spawn("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(mlflow_port),
                                         "--backend-store-uri", f"sqlite:///{(folder / 'mlflow.db').resolve()}",
                                         "--artifacts-destination", str((folder / "mlartifacts").resolve()), "--workers", "1"],
                              folder, env))
        deadline = time.time() + START_TIMEOUT
        _wait_started(started[0], deadline)
        for i in range(1, workers + 1):
            started.append(_spawn(f"worker-{i}", [*ray, "start", "--block", f"--address={address}", f"--node-ip-address={HOST}",
                                                  f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats"],
                                  folder, env))
            # One at a time: on a 2-core machine, raylets starting together time out against the GCS.
            _wait_started(started[-1], deadline)
        nodes = _alive_nodes(address, token_path)
        if len(nodes) < workers + 1:
            raise UserError(f"only {len(nodes)} of {workers + 1} Ray nodes are alive; see {folder / 'logs'}")
        _wait_health(uri, started[1], deadline)
        for p in started:
            _record(p)
    except BaseException:
        _stop(started)  # nothing left running after a failed start
        raise
    state = ClusterState(str(folder.resolve()), address, uri, str((folder / "tune").resolve()), str(token_path.resolve()),
                         workers, started)
    state.write()
    (folder / ENV_FILE).write_text("".join(f"export {k}={v}\n" for k, v in cluster_env(state).items()))
    print(f"up: Ray head {address} (0 CPUs) + {workers} worker node(s) x {cpus} CPU, {gpus} GPU; mlflow server {uri}")
    print(f"use it: source {folder / ENV_FILE}")
    return state


def cluster_env(state: ClusterState) -> dict[str, str]:
    """What a client needs: the cluster, the server, Ray's token, the shared Tune storage."""
    return {**MULTI_NODE, "RAY_ADDRESS": state.ray_address, "MLFLOW_TRACKING_URI": state.tracking_uri,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state.token_path,
            "FER_TUNE_STORAGE": state.storage, "FER_TUNE_STORAGE_SHARED": "1"}


def status(folder: Path) -> int:
    state = ClusterState.read(folder)
    if state is None:
        print(f"down: no cluster in {folder}")
        return 0
    for p in state.processes:
        print(f"{p.role:<10} pid {p.pid:<8} {'alive' if _ours(p) else 'DEAD'}")
    nodes = _alive_nodes(state.ray_address, Path(state.token_path))
    print(f"Ray {state.ray_address}: {len(nodes)} live node(s)")
    for n in nodes:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(n["resources"].items()) if not k.startswith("node:") and k != "object_store_memory" and k != "memory")
        print(f"  {n['id'][:12]} {n['ip']}: {res or 'no resources'}")
    try:
        with urllib.request.urlopen(state.tracking_uri + "/health", timeout=3) as r:
            health = f"HTTP {r.status}"
    except OSError as exc:
        health = f"unreachable ({exc})"
    print(f"mlflow server {state.tracking_uri}: {health}")
    return 0


def down(folder: Path) -> int:
    state = ClusterState.read(folder)
    if state is None:
        print(f"already down: no cluster in {folder}")
        return 0
    left = _stop(state.processes)
    if left:
        raise UserError(f"processes {left} did not stop; the lock {folder / STATE} is kept")
    (folder / STATE).unlink()
    print(f"down: stopped {sum(len(p.pids) for p in state.processes)} process(es) of {len(state.processes)} group(s); "
          f"MLflow data kept in {folder}")
    return 0


def build_parser() -> Parser:
    p = Parser(prog="python -m cluster.local", description="A real multi-node Ray cluster and an mlflow server on this machine.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start the head, the workers and the server")
    u.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    u.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs each worker offers (default 1)")
    u.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs each worker offers (default 0)")
    u.add_argument("--ray-port", type=int, help="the head's port (default: a free one)")
    u.add_argument("--mlflow-port", type=int, help="the server's port (default: a free one)")
    for name, helptext in (("status", "nodes, resources and liveness, the server"), ("down", "stop what up started")):
        sub.add_parser(name, help=helptext)
    for s in sub.choices.values():
        s.add_argument("--dir", default=".cluster", help="state, logs, MLflow data and Tune storage (default .cluster)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.dir).expanduser()
    if args.command == "up":
        if args.workers < 1 or args.cpus_per_worker < 1 or args.gpus_per_worker < 0:
            raise UserError("--workers and --cpus-per-worker must be >= 1, --gpus-per-worker >= 0")
        for name, port in (("--ray-port", args.ray_port), ("--mlflow-port", args.mlflow_port)):
            if port is not None and not 1024 <= port <= 65535:
                raise UserError(f"{name} must be within 1024..65535, got {port}")
        up(folder, args.workers, args.cpus_per_worker, args.gpus_per_worker,
           args.ray_port or _free_port(), args.mlflow_port or _free_port())
        return 0
    return status(folder) if args.command == "status" else down(folder)


if __name__ == "__main__":
    sys.exit(run_cli(main))
