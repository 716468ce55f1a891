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
`down` stops the process groups `up` recorded, and nothing else, and returns once every process
of them is gone (SIGKILL for what ignores SIGTERM for 10 s).

Unattended use: `up` on a cluster with a dead member restarts that member (a dead head: the head and
its workers) and leaves the living alone. The ports `up` chose are kept in --dir (ports.json), and the
next `up` after a `down` takes them again where they are free, so clients' RAY_ADDRESS and
MLFLOW_TRACKING_URI stay right. `status` answers within seconds whatever state the cluster is in
(each probe has a timeout) and exits 1 when a member is dead or does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, Callable, Iterable, Mapping, Sequence

from fer_model.cli import Parser, run_cli
from fer_model.errors import UserError

STATE = "cluster.json"  # the lock: what `up` started
ENV_FILE = "cluster.env"
PORTS = "ports.json"  # the ports of the last `up`; `down` keeps it so that the next `up` takes them again
HOST = "127.0.0.1"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0  # SIGTERM's grace, not Ray's 30 s drain: a local cluster has no remote work to drain
PROBE_TIMEOUT = 10.0  # `status`'s question to the head (its child's start, ~2-4 s on a busy 2-core machine, included): a hung GCS must not hang `status`
HEALTH_TIMEOUT = 2.0


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
    cpus: int = 1  # per worker: what a restarted worker offers again
    gpus: int = 0

    @classmethod
    def read(cls, folder: Path) -> "ClusterState | None":
        path = folder / STATE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(**{**raw, "processes": [Started(**p) for p in raw["processes"]]})

    def write(self) -> None:
        (Path(self.dir) / STATE).write_text(json.dumps(asdict(self), indent=1))
        (Path(self.dir) / ENV_FILE).write_text("".join(f"export {k}={v}\n" for k, v in cluster_env(self).items()))
        (Path(self.dir) / PORTS).write_text(json.dumps({"ray": self.ray_port, "mlflow": self.mlflow_port}))

    @property
    def ray_port(self) -> int:
        return int(self.ray_address.rsplit(":", 1)[1])

    @property
    def mlflow_port(self) -> int:
        return int(self.tracking_uri.rsplit(":", 1)[1])


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
    """Whether a server could listen on `port` now. SO_REUSEADDR as the servers set it: the closed
    connections of a server just stopped (TIME_WAIT) do not hold its port, a listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
# stay on loopback; see tuning.options.keep_local_ray_on_loopback): nodes and clients set it.
MULTI_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}


def _env(token_path: Path) -> dict[str, str]:
    env = {**os.environ, **MULTI_NODE, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _spawn(role: str, cmd: list[str], folder: Path, env: dict[str, str]) -> Started:
    log = folder / "logs" / f"{role}.log"
    if log.exists():  # a restarted member's last log says why it died: kept, once
        log.replace(log.with_suffix(".prev.log"))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = Started(role, proc.pid, [proc.pid], str(log))
    _record(started)
    return started


def process_running(proc) -> bool:
    """Whether a psutil.Process still runs (a zombie has exited; only its parent's wait is missing)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _groups(processes: Sequence[Started]) -> set[int]:
    """The recorded group ids that are still ours.

    A group whose leader runs but is another process (another start time) is not: its id was
    reused. A group whose leader is gone keeps its id while any member lives, and the kernel gives
    no new process an id in use as a group's."""
    return {p.pid for p in processes if _ours(p) or not _alive(p.pid)}


def _members(processes: Sequence[Started]) -> dict[int, Any]:
    """Every process of the recorded groups now: the recorded ones that are still themselves, every
    process whose group id is a recorded leader's, and their descendants (Ray's workers have groups
    of their own but are the raylet's children)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for p in processes:
        for pid in p.pids:
            if _ours(p, pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    found[pid] = psutil.Process(pid)
    groups = _groups(processes)
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) in groups:
                found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update((c.pid, c) for c in proc.children(recursive=True))
    return found


def _signal_all(procs: Iterable, groups: Sequence[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for proc in procs:
        with contextlib.suppress(Exception):  # gone, or not ours to signal: psutil checks it is the same process
            proc.send_signal(sig)


def stop_and_wait(find: Callable[[], Mapping[int, Any]], groups: Sequence[int] = (),
                  timeout: float | None = None) -> tuple[int, int, list[int]]:
    """Stop the processes `find` returns (pid -> psutil.Process) and the process `groups`, and wait
    until none runs.

    SIGTERM, then SIGKILL to what still runs after `timeout` s (STOP_TIMEOUT), then up to `timeout`
    s more for the kernel to finish them. `find` is asked again at every look: what was forked
    meanwhile is stopped too. Returns (processes stopped, of them killed, pids still running)."""
    timeout = STOP_TIMEOUT if timeout is None else timeout
    seen = dict(find())
    _signal_all(seen.values(), groups, signal.SIGTERM)
    killed: set[int] = set()
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            killed = {pid for pid, proc in seen.items() if process_running(proc)}
            # Only groups a living member still holds: an emptied group's id may be a new leader's by now.
            alive_groups = {g for g in (_pgid(pid) for pid in killed) if g in set(groups)}
            _signal_all([seen[pid] for pid in killed], sorted(alive_groups), sig)
        deadline = time.time() + timeout
        while True:
            seen.update(find())
            left = [pid for pid, proc in seen.items() if process_running(proc)]
            if not left or time.time() >= deadline:
                break
            time.sleep(0.3)
        if not left:
            break
    return len(seen) - len(left), len(killed), left


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _stop(processes: Sequence[Started], timeout: float | None = None) -> tuple[int, int, list[int]]:
    """Stop every process of the recorded groups (`stop_and_wait`)."""
    return stop_and_wait(lambda: _members(processes), sorted(_groups(processes)), timeout)


def _health(url: str, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """None when the server answers /health with 200 within `timeout` s, else what went wrong."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except OSError as exc:
        return f"unreachable ({getattr(exc, 'reason', None) or exc})"


def _wait_health(url: str, proc: Started, deadline: float) -> None:
    while time.time() < deadline:
        if _health(url) is None:
            return
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


# The head's node table from its GCS, with Ray's own GCS client (what `ray status` uses) in a fresh
# process: no driver joins, nothing of Ray is imported here, and the process can be killed at a
# deadline, which matters: a client of a dead or hung GCS retries for 40-60 s (ray.init: 2 min).
_NODES = ("import json, sys\n"
          "from ray._raylet import GcsClient\n"
          "from ray.core.generated.gcs_pb2 import GcsNodeInfo\n"
          "nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=float(sys.argv[2]))\n"
          "print(json.dumps([{'id': n.node_id.hex(), 'ip': n.node_manager_address, 'resources': dict(n.resources_total)}"
          " for n in nodes.values() if n.state == GcsNodeInfo.ALIVE]))\n")


@dataclass
class _Asked:
    """A question to the head under way: the asking process and when its answer is due."""

    proc: subprocess.Popen
    due: float
    timeout: float


def _ask_nodes(address: str, token_path: Path, timeout: float) -> _Asked | str:
    """Start asking the head for its live nodes (see `_nodes_answer`); a string when its port is shut."""
    host, _, port = address.rpartition(":")
    due = time.time() + timeout
    try:
        socket.create_connection((host, int(port)), timeout=min(2.0, timeout)).close()
    except OSError as exc:
        return f"the head's port does not answer ({exc})"
    proc = subprocess.Popen([sys.executable, "-c", _NODES, address, str(max(1.0, timeout - 1))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(token_path))
    return _Asked(proc, due, timeout)


def _nodes_answer(asked: _Asked | str) -> list[dict] | str:
    """The live nodes, or why there is no answer by the time it was due."""
    if isinstance(asked, str):
        return asked
    proc = asked.proc
    try:
        out, err = proc.communicate(timeout=max(0.1, asked.due - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return f"the head did not answer within {asked.timeout:.0f} s"
    try:
        return json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else \
            f"asking the head failed: {(err.strip().splitlines() or ['exit %d' % proc.returncode])[-1]}"
    except (IndexError, ValueError):
        return f"the head's answer was not understood: {out[-200:]!r}"


def _alive_nodes(address: str, token_path: Path, timeout: float = PROBE_TIMEOUT) -> list[dict] | str:
    """The cluster's live nodes, or why the head gave no answer within `timeout` s."""
    return _nodes_answer(_ask_nodes(address, token_path, timeout))


def _choose_port(name: str, given: int | None, kept: int | None, taken: Sequence[int] = ()) -> int:
    """`given` (it must be free), else the port of the last `up` if free, else a free one."""
    if given is not None:
        if not _port_free(given):
            raise UserError(f"{name} {given} is in use on {HOST}")
        return given
    if kept is not None and kept not in taken and _port_free(kept):
        return kept
    port = _free_port()
    while port in taken:
        port = _free_port()
    if kept is not None:
        print(f"{name.lstrip('-')}: {kept}, the port of the last `up`, is in use on {HOST}; taking {port} "
              f"(clients: source {ENV_FILE} again)")
    return port


def _kept_ports(folder: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((folder / PORTS).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _command(role: str, folder: Path, ray_port: int, mlflow_port: int, cpus: int, gpus: int) -> list[str]:
    """The command line of one member: the head, the mlflow server, or worker-N."""
    ray = [str(Path(sys.executable).parent / "ray")] if (Path(sys.executable).parent / "ray").exists() else ["ray"]
    if role == "head":
        return [*ray, "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={ray_port}",
                "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
    if role == "mlflow":
        return [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(mlflow_port),
                "--backend-store-uri", f"sqlite:///{(folder / 'mlflow.db').resolve()}",
                "--artifacts-destination", str((folder / "mlartifacts").resolve()), "--workers", "1"]
    return [*ray, "start", "--block", f"--address={HOST}:{ray_port}", f"--node-ip-address={HOST}",
            f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats"]


def _start(roles: Sequence[str], state: ClusterState) -> list[Started]:
    """Start `roles` in their order and wait until each answers (the server is waited for last, so its
    start overlaps the nodes'); on any failure stop what this call started and raise."""
    folder, env = Path(state.dir), _env(Path(state.token_path))
    started: list[Started] = []
    try:
        deadline = time.time() + START_TIMEOUT
        for role in roles:
            started.append(_spawn(role, _command(role, folder, state.ray_port, state.mlflow_port, state.cpus, state.gpus),
                                  folder, env))
            if role != "mlflow":  # the server starts beside the nodes; it is waited for last
                # One at a time: on a 2-core machine, raylets starting together time out against the GCS.
                _wait_started(started[-1], deadline)
        if any(r != "mlflow" for r in roles):
            nodes = _alive_nodes(state.ray_address, Path(state.token_path), timeout=30.0)
            if isinstance(nodes, str) or len(nodes) < state.workers + 1:
                alive = nodes if isinstance(nodes, str) else f"only {len(nodes)} of {state.workers + 1} Ray nodes are alive"
                raise UserError(f"{alive}; see {folder / 'logs'}")
        for p in started:
            if p.role == "mlflow":
                _wait_health(state.tracking_uri, p, deadline)
        for p in started:
            _record(p)
    except BaseException:
        _stop(started)  # nothing left running after a failed start
        raise
    return started


def up(folder: Path, workers: int, cpus: int, gpus: int, ray_port: int | None = None,
       mlflow_port: int | None = None) -> ClusterState:
    """Start the head, the workers and the server; wait until all answer; write cluster.env.

    Already up: a dead member is restarted (see `_repair`). Ports not given are those of the last
    `up` in `folder` where free, else free ones."""
    state = ClusterState.read(folder)
    if state is not None and any(_ours(p) for p in state.processes):
        return _repair(state)
    if state is not None:  # all of it died (a reboot, a kill): what is left of its groups goes first
        _stop(state.processes)
    kept = _kept_ports(folder)
    ray_port = _choose_port("--ray-port", ray_port, kept.get("ray"))
    mlflow_port = _choose_port("--mlflow-port", mlflow_port, kept.get("mlflow"), taken=[ray_port])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "tune").mkdir(exist_ok=True)
    token_path = folder / "auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    state = ClusterState(str(folder.resolve()), f"{HOST}:{ray_port}", f"http://{HOST}:{mlflow_port}",
                         str((folder / "tune").resolve()), str(token_path.resolve()), workers, [], cpus, gpus)
    state.processes = _start(["mlflow", "head", *(f"worker-{i}" for i in range(1, workers + 1))], state)
    state.write()
    print(f"up: Ray head {state.ray_address} (0 CPUs) + {workers} worker node(s) x {cpus} CPU, {gpus} GPU; "
          f"mlflow server {state.tracking_uri}")
    print(f"use it: source {folder / ENV_FILE}")
    return state


def _repair(state: ClusterState) -> ClusterState:
    """Restart the dead members of a cluster that is partly up; the living are left alone.

    A dead head takes its workers with it (they belong to its GCS): they are restarted too. A dead
    member's group is stopped first: the server's helpers, for one, outlive it and hold its port."""
    folder = Path(state.dir)
    dead = [p.role for p in state.processes if not _ours(p)]
    if not dead:
        print(f"already up ({folder / STATE}); nothing changed. Use it: source {folder / ENV_FILE}")
        return state
    again = set(dead) | ({p.role for p in state.processes if p.role != "mlflow"} if "head" in dead else set())
    roles = [p.role for p in state.processes if p.role in again]
    print(f"dead: {', '.join(dead)}; restarting {', '.join(roles)}")
    _stop([p for p in state.processes if p.role in again])
    uri, address = state.tracking_uri, state.ray_address
    if "head" in again:
        state.ray_address = f"{HOST}:{_choose_port('--ray-port', None, state.ray_port)}"
    if "mlflow" in again:
        state.tracking_uri = f"http://{HOST}:{_choose_port('--mlflow-port', None, state.mlflow_port, taken=[state.ray_port])}"
    try:
        restarted = {p.role: p for p in _start(roles, state)}
    except UserError as exc:
        raise UserError(f"{exc}. Still dead: {', '.join(roles)}; "
                        f"run `python -m cluster.local down --dir {folder}` and `up` again") from None
    state.processes = [restarted.get(p.role, p) for p in state.processes]
    state.write()
    print(f"restarted {', '.join(roles)}: Ray head {state.ray_address}, mlflow server {state.tracking_uri}")
    if (uri, address) != (state.tracking_uri, state.ray_address):
        print(f"the address changed: source {folder / ENV_FILE} again")
    return state


def cluster_env(state: ClusterState) -> dict[str, str]:
    """What a client needs: the cluster, the server, Ray's token, the shared Tune storage."""
    return {**MULTI_NODE, "RAY_ADDRESS": state.ray_address, "MLFLOW_TRACKING_URI": state.tracking_uri,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state.token_path,
            "FER_TUNE_STORAGE": state.storage, "FER_TUNE_STORAGE_SHARED": "1"}


def status(folder: Path) -> int:
    """Each member's liveness, the head's live nodes, the server's health: 0 when all is well, 1 if not.

    Answers within about PROBE_TIMEOUT s whatever the cluster's state: the head and the server are
    asked at once, each with a timeout."""
    state = ClusterState.read(folder)
    if state is None:
        print(f"down: no cluster in {folder}")
        return 0
    asked = _ask_nodes(state.ray_address, Path(state.token_path), PROBE_TIMEOUT)  # runs while the rest is checked
    dead = [p.role for p in state.processes if not _ours(p)]
    for p in state.processes:
        print(f"{p.role:<10} pid {p.pid:<8} {'DEAD' if p.role in dead else 'alive'}")
    health = _health(state.tracking_uri)
    nodes = _nodes_answer(asked)
    if isinstance(nodes, str):
        print(f"Ray {state.ray_address}: no answer: {nodes}")
    else:
        print(f"Ray {state.ray_address}: {len(nodes)} live node(s)")
        for n in nodes:
            res = ", ".join(f"{k} {v:g}" for k, v in sorted(n["resources"].items())
                            if not k.startswith("node:") and k not in ("object_store_memory", "memory"))
            print(f"  {n['id'][:12]} {n['ip']}: {res or 'no resources'}")
    print(f"mlflow server {state.tracking_uri}: {health or 'HTTP 200'}")
    if dead:
        print(f"dead: {', '.join(dead)}. `python -m cluster.local up --dir {folder}` restarts "
              f"{'it' if len(dead) == 1 else 'them'}{' and the workers' if 'head' in dead else ''}")
    return 1 if dead or isinstance(nodes, str) or len(nodes) < state.workers + 1 or health else 0


def down(folder: Path) -> int:
    """Stop every process of the groups `up` recorded; return once none of them runs."""
    state = ClusterState.read(folder)
    if state is None:
        print(f"already down: no cluster in {folder}")
        return 0
    t = time.time()
    stopped, killed, left = _stop(state.processes)
    if left:
        raise UserError(f"processes {left} did not stop, even on SIGKILL; the lock {folder / STATE} is kept")
    (folder / STATE).unlink()
    print(f"down: stopped {stopped} process(es) of {len(state.processes)} group(s) in {time.time() - t:.1f} s"
          f"{f' ({killed} killed after {STOP_TIMEOUT:.0f} s of SIGTERM)' if killed else ''}; "
          f"MLflow data and the ports ({folder / PORTS}) kept in {folder}")
    return 0


def build_parser() -> Parser:
    p = Parser(prog="python -m cluster.local", description="A real multi-node Ray cluster and an mlflow server on this machine.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start the head, the workers and the server; restart what of them is dead")
    u.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    u.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs each worker offers (default 1)")
    u.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs each worker offers (default 0)")
    u.add_argument("--ray-port", type=int, help="the head's port (default: the last up's where free, else a free one)")
    u.add_argument("--mlflow-port", type=int, help="the server's port (default: the last up's where free, else a free one)")
    for name, helptext in (("status", "nodes, resources and liveness, the server; exit 1 when any is dead"), ("down", "stop what up started")):
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
        up(folder, args.workers, args.cpus_per_worker, args.gpus_per_worker, args.ray_port, args.mlflow_port)
        return 0
    return status(folder) if args.command == "status" else down(folder)


if __name__ == "__main__":
    sys.exit(run_cli(main))
