"""`python -m tuning.serve`: a registered model over HTTP, with MLflow's scoring server.

    python -m tuning.serve                                   # models:/fer2013-cnn@champion on 127.0.0.1:5001
    python -m tuning.serve --model models:/fer2013-cnn/3 --port 8080 --workers 2
    python -m tuning.serve request photo.jpg more.png > request.json     # a request body, for curl -d @request.json

It runs ``mlflow models serve --env-manager local`` with this interpreter (so a virtual environment
need not be activated: MLflow's ``uvicorn`` is a shim that runs this interpreter's) after checking, in one line
and exit code 2 each, that the store is usable, the model's alias (or version) exists and the model
loads, and that the port is free. An alias is resolved once, here: the version checked is the version
served, whatever moves the alias later. The server runs in its own process group; Ctrl-C or SIGTERM is
passed on to it and the command returns once none of it is left (exit 130). Once it answers ``/ping``
the command prints a request line and a curl line that work as printed.

``--timeout`` is the scoring server's limit on a request (`MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`: a 504
past it) and reaches the model too (`tuning.registry.pyfunc.DEADLINE_ENV`), which then stops its own work
rather than go on computing an answer nobody receives.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Sequence

from fer_model.cli import Parser, run_cli
from fer_model.errors import ConfigError, UserError, first_line
from tuning import options
from tuning.names import DEFAULT_MODEL_NAME
from tuning.tracking.uri import sqlite_path

log = logging.getLogger(__name__)
DEFAULT_MODEL = f"models:/{DEFAULT_MODEL_NAME}@champion"
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_WORKERS, DEFAULT_TIMEOUT_S = "127.0.0.1", 5001, 1, 60
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # read by MLflow's scoring server
STOP_GRACE_S = 30  # after Ctrl-C or SIGTERM, the server's time to stop before it is killed
# The model's own names, restated so that this process never imports it (torch, MLflow, dlib: 2 s and
# 600 MB, for a process that only waits on the server); tests/test_tuning/test_serve.py checks they agree.
IMAGE_COLUMN, MAX_IMAGES = "image", 4096  # tuning.registry.pyfunc.IMAGE_COLUMN, .MAX_IMAGES
DEADLINE_ENV = "FER_PREDICT_DEADLINE_S"  # tuning.registry.pyfunc.DEADLINE_ENV: the model stops its work then
_ALIAS_URI = re.compile(r"models:/([^/@]+)@([^/@]+)")
_VERSION_URI = re.compile(r"models:/([^/@]+)/(\d+)")


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.serve", description="Serve a registered model over HTTP with MLflow's scoring server.")
    sub = p.add_subparsers(dest="command", metavar="request",
                           help="`request PHOTO...`: write the JSON body of a request for these image files to "
                                "standard output (`> request.json`, then `curl -d @request.json`), serve nothing")
    r = sub.add_parser("request", prog="python -m tuning.serve request",
                       help="the JSON body of a request for image files")
    r.add_argument("photos", nargs="+", metavar="PHOTO", help="image files (any size or colour mode)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"scoring-server processes, each holding the model (default {DEFAULT_WORKERS})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each worker, the most one request uses (default: torch's own, this machine's "
                        "cores); a model registered since ThreadShare runs a request of under 16 images on one and "
                        "shares them among the requests in flight (docs/mlflow.md 'Serve')")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds a request may take: the server answers 504 past it and the model stops its work "
                        f"(default {DEFAULT_TIMEOUT_S})")
    options.add_tracking_flags(p, model_name=False, experiment=False)
    return p


# --------------------------------------------------------------------------- the request body


def request_body(photos: Sequence[Path]) -> dict:
    """``{"dataframe_split": {"columns": ["image"], "data": [[<base64>], ...]}}`` for the files; a missing
    one, a folder, or more than the model takes a request is a UserError. The bytes are sent as they are:
    the model decodes them (a file that is not an image gets the server's 400, naming its row)."""
    missing = [str(p) for p in photos if not p.is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if len(photos) > MAX_IMAGES:
        raise UserError(f"a request holds at most {MAX_IMAGES} images, got {len(photos)}: write several requests")
    return {"dataframe_split": {"columns": [IMAGE_COLUMN],
                                "data": [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in photos]}}


def write_request(photos: Sequence[str], out: IO[str]) -> None:
    json.dump(request_body([Path(p).expanduser() for p in photos]), out)
    out.write("\n")


# --------------------------------------------------------------------------- checks before serving


def check_port_free(host: str, port: int) -> None:
    """A UserError when nothing may listen on `host`:`port` (another server holds it, or the address is not
    this machine's). SO_REUSEADDR as uvicorn binds: a port left in TIME_WAIT by a stopped server is free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror or exc}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server holds it? "
                            "choose another --port)") from None


def resolve_model(uri: str, tracking_uri: str) -> tuple[str, str]:
    """(the URI to serve, how to name it): an alias becomes the version holding it now. A registry without
    the model or the alias, or a store that does not exist, is a UserError saying what to run."""
    alias, version = _ALIAS_URI.fullmatch(uri), _VERSION_URI.fullmatch(uri)
    if not (alias or version):
        return uri, uri  # runs:/, a path, models:/name/latest: loading checks them
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # opening it would create an empty store
        raise UserError(f"no MLflow store at {db}: give --tracking-uri (or $MLFLOW_TRACKING_URI), or make a model "
                        "first with python -m tuning.grid")
    from tuning.tracking.store import client_for

    client = client_for(tracking_uri)
    try:
        if alias:
            mv = client.get_model_version_by_alias(alias.group(1), alias.group(2))
        else:
            mv = client.get_model_version(version.group(1), version.group(2))
    except Exception as exc:  # noqa: BLE001 - MlflowException: no such model, alias or version
        hint = ("promote a version with python -m tuning.promote (after python -m tuning.grid)" if alias
                else "see the registered models in the MLflow UI")
        raise UserError(f"cannot serve {uri} from {tracking_uri}: {first_line(exc).rstrip('.')}; {hint}") from None
    served = f"models:/{mv.name}/{mv.version}"
    return served, f"{served} ({uri})" if alias else served


def check_model(uri: str, tracking_uri: str) -> tuple[str, str]:
    """`resolve_model` and `check_loads` in a child process: MLflow, torch and the model stay out of this
    one, which only waits on the server (loaded here they held 700 MB for nothing). A UserError there is
    one here, its line unchanged."""
    code = "import sys; from tuning.serve import check_main; sys.exit(check_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, uri, tracking_uri], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        sys.stderr.write(done.stderr)  # its warnings, if any
        served, name = json.loads(lines[-1])
        return served, name
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    if errors:
        raise UserError(errors[-1].removeprefix("error: "))
    tail = done.stderr.strip().splitlines()
    raise UserError(f"checking model {uri} failed (exit code {done.returncode}): {tail[-1] if tail else 'no output'}")


def _check(argv: Sequence[str]) -> int:
    uri, tracking_uri = argv
    served, name = resolve_model(uri, tracking_uri)
    check_loads(served, tracking_uri)
    print(json.dumps([served, name]))
    return 0


def check_main(argv: Sequence[str]) -> int:
    """The child of `check_model`: one line and exit code 2 for a user error, as every command."""
    return run_cli(_check, argv)


def check_loads(uri: str, tracking_uri: str) -> None:
    """Load the model as the server will, so that a broken one is one line here, not a traceback there."""
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve through the process-wide tracking URI
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - whatever loading raises, the model cannot be served
        raise UserError(f"cannot load model {uri} from {tracking_uri}: {first_line(exc)}") from None
    schema = model.metadata.get_input_schema()
    if schema is not None and IMAGE_COLUMN not in (schema.input_names() if schema.has_input_names() else []):
        log.warning("model %s takes no %r column: the request line below is this project's, not its", uri, IMAGE_COLUMN)


# --------------------------------------------------------------------------- the server


def server_command(uri: str, host: str, port: int, workers: int, timeout: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "-h", host, "-p", str(port),
            "--env-manager", "local", "--workers", str(workers), "-t", str(timeout)]


def uvicorn_shim(folder: Path) -> Path:
    """A ``uvicorn`` in `folder` that runs this interpreter's ``-m uvicorn``. MLflow starts the scoring
    server as the shell command ``uvicorn ...``: by name, so from a venv that is not activated it is "not
    found", and from a venv with ``--system-site-packages`` (no uvicorn script of its own) it is the
    system's, another interpreter that would import another installation of this project."""
    shim = folder / "uvicorn"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m uvicorn \"$@\"\n")
    shim.chmod(0o755)
    return shim


def server_env(tracking_uri: str, timeout: int, threads: int | None = None, bin_dir: Path | None = None) -> dict[str, str]:
    """This environment, with `bin_dir` (where `uvicorn_shim` wrote) and this interpreter's folder first
    on PATH, the tracking URI, the timeout for the server and the model alike, and with `threads` each
    worker's torch threads (torch reads OMP_NUM_THREADS when it starts)."""
    env = dict(os.environ)
    first = [str(bin_dir)] if bin_dir else []
    env["PATH"] = os.pathsep.join([*first, os.path.dirname(sys.executable), *filter(None, [env.get("PATH")])])
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env[TIMEOUT_ENV] = env[DEADLINE_ENV] = str(timeout)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def url_of(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on `host`."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def answers_ping(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies aside: whoever adopted them reaps them)."""
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> None:
    """Send `sig` to `proc`'s process group; SIGKILL what of it is left after `grace` seconds; return once
    none of it runs (the port is free again)."""
    for s in (sig, signal.SIGCONT):  # SIGCONT: a stopped (Ctrl-Z'd) server handles its signal too
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
    deadline = time.monotonic() + grace
    while (proc.poll() is None or group_alive(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None or group_alive(proc.pid):
        log.warning("the scoring server did not stop within %g s of %s: killed", grace, signal.Signals(sig).name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        while group_alive(proc.pid):
            time.sleep(0.1)


def python_command() -> str:
    """How to call this interpreter from a shell: ``python`` where that is it, else its path."""
    found = shutil.which("python")
    try:
        same = found is not None and os.path.samefile(found, sys.executable)
    except OSError:
        same = False
    return "python" if same else shlex.quote(sys.executable)


def serve(args) -> int:
    tracking_uri = options.resolve_tracking_uri(args.tracking_uri)
    options.check_tracking(tracking_uri)
    check_port_free(args.host, args.port)
    served, name = check_model(args.model, tracking_uri)
    check_port_free(args.host, args.port)  # loading took seconds: taken meanwhile?

    stop: list[int] = []  # the signal that asked us to stop
    proc: subprocess.Popen | None = None

    def forward(signum, frame) -> None:  # the loops below pass it on, once (a second SIGINT is uvicorn's force-quit)
        if not stop:
            stop.append(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    bin_dir = tempfile.TemporaryDirectory(prefix="tuning-serve-")  # the uvicorn shim, for the server's lifetime
    try:
        uvicorn_shim(Path(bin_dir.name))
        proc = subprocess.Popen(server_command(served, args.host, args.port, args.workers, args.timeout),
                                env=server_env(tracking_uri, args.timeout, args.threads, Path(bin_dir.name)),
                                start_new_session=True)
        url = url_of(args.host, args.port)
        while proc.poll() is None and not stop and not answers_ping(url):
            time.sleep(0.25)
        if proc.poll() is None and not stop:
            workers = f"{args.workers} worker{'s' if args.workers != 1 else ''}"
            workers += f", {args.threads} torch thread{'s' if args.threads != 1 else ''} each" if args.threads else ""
            print(f"serving {name} at {url} ({workers}, {args.timeout} s a request); Ctrl-C stops it\n"
                  f"a request for your photos, then the call (the body goes in a file: no 'Argument list too long'):\n"
                  f"  {python_command()} -m tuning.serve request PHOTO [PHOTO...] > request.json\n"
                  f"  curl -s -X POST -H 'Content-Type: application/json' -d @request.json {url}/invocations",
                  flush=True)
        while proc.poll() is None and not stop:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
        if stop:
            stop_group(proc, stop[0])
            print(f"the scoring server stopped ({signal.Signals(stop[0]).name})", file=sys.stderr)
            return 130
        rc = proc.returncode
        if group_alive(proc.pid):  # its uvicorn outlived it
            stop_group(proc)
        print(f"error: the scoring server exited with code {rc} (its output is above)", file=sys.stderr)
        return 1
    finally:
        if proc is not None and (proc.poll() is None or group_alive(proc.pid)):
            stop_group(proc)  # an error of ours: never leave the server behind
        for s, handler in previous.items():
            signal.signal(s, handler)
        bin_dir.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "request":
        write_request(args.photos, sys.stdout)
        return 0
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be within 1..65535, got {args.port}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.timeout < 1:
        raise ConfigError(f"--timeout must be >= 1 second, got {args.timeout}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    return serve(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
