"""Serving throughput: `python -m tuning.serve` under a bounded load, beside the same model in process.

On 127.0.0.1 only. Starts `python -m tuning.serve` itself (or measures a server already running at
--url), then for each concurrency (1, 4, 16 clients, each with its own keep-alive connection) and batch
size (1, 64, 512 images a request) sends requests of 48x48 PNGs, as `python -m tuning.serve request`
writes them (dataframe_split, base64), for --seconds or --max-requests, whichever comes first (requests
in flight then are waited for; none is started after). One row per cell: requests and errors, req/s,
img/s, p50/p95/p99 latency, the peak RSS summed over the server's process tree (psutil, sampled every
0.1 s: shared pages count once per process), and the in-process model (`mlflow.pyfunc.load_model(...)
.predict` on the same frames, sequential, measured first, before the server starts) with the ratio
served img/s / in-process img/s: from the main thread as a script calls it, and from a worker thread as
the scoring server calls it (torch's intra-op threads behave differently there: on a busy 2-core machine
a batch of 1 took 110 ms from the main thread and 5 ms from a worker thread). The machine comes first: CPU, cores, whether it has avx512_bf16 (or
AMX), the load average (others' work skews every figure), and the full flags line.

    python benchmarks/serving.py --tracking-uri sqlite:///$PWD/mlflow.db               # the champion
    python benchmarks/serving.py --workers 2 --seconds 10
    python benchmarks/serving.py --url http://127.0.0.1:5001 --concurrency 1,4 --batch 1,64   # a running server
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.machine import cpu_flags  # noqa: E402
from tuning.serve import DEFAULT_MODEL, answers_ping  # noqa: E402

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--url", help="measure the server at this URL (127.0.0.1 only) instead of starting one")
    p.add_argument("--workers", type=int, default=1, help="tuning.serve --workers of the server started (default 1)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell, and for the in-process model "
                                                              "per batch size (default 5)")
    p.add_argument("--max-requests", type=int, default=2000, help="at most this many requests per cell (default 2000)")
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16], help="clients at once (default 1,4,16)")
    p.add_argument("--batch", type=ints, default=[1, 64, 512], help="images a request (default 1,64,512)")
    p.add_argument("--threads", type=int, default=None, help="tuning.serve --threads of the server started (default: torch's own)")
    p.add_argument("--timeout", type=int, default=60, help="tuning.serve --timeout, and the clients' (default 60)")
    return p


# --------------------------------------------------------------------------- the machine and the frames


def machine_lines() -> list[str]:
    info = cpu_flags()
    flags = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), "") if Path("/proc/cpuinfo").exists() else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"cpu: {info['cpu']}, {info['cores']} cores; avx512_bf16: {'yes' if info['avx512_bf16'] else 'no'}, "
            f"amx_bf16: {'yes' if info['amx_bf16'] else 'no'}, avx512f: {'yes' if info['avx512f'] else 'no'}, "
            f"avx2: {'yes' if info['avx2'] else 'no'}; load average (1, 5, 15 min): {load}",
            f"flags: {flags}"]


def frames(n: int, seed: int = 0) -> list[bytes]:
    """`n` distinct 48x48 grey PNGs (random pixels: decoding and inference cost do not depend on content)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (48, 48)).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def body(images: list[bytes]) -> bytes:
    """A request as `python -m tuning.serve request` writes it."""
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode("ascii")] for b in images]}}).encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# --------------------------------------------------------------------------- in process


def in_process(model_uri: str, tracking_uri: str, images: list[bytes], batches: list[int], seconds: float,
               max_requests: int) -> tuple[dict[int, float], dict[int, float]]:
    """Images per second of ``load_model(model_uri).predict`` per batch size, sequential calls: from this
    process's main thread, as a script calls it, and from a worker thread, as MLflow's scoring server does
    (``asyncio.to_thread``), since torch's intra-op threading differs between the two on a busy machine."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)

    def measure(rates: dict[int, float]) -> None:
        for b in batches:
            frame = pd.DataFrame({"image": images[:b]})
            model.predict(frame)  # warm-up, untimed
            n, start = 0, time.perf_counter()
            while n < max_requests and time.perf_counter() - start < seconds:
                model.predict(frame)
                n += 1
            rates[b] = n * b / (time.perf_counter() - start)

    main_rates: dict[int, float] = {}
    thread_rates: dict[int, float] = {}
    measure(main_rates)
    worker = threading.Thread(target=measure, args=(thread_rates,))
    worker.start()
    worker.join()
    return main_rates, thread_rates


# --------------------------------------------------------------------------- served


class RssSampler(threading.Thread):
    """Peak RSS summed over a process tree, sampled every 0.1 s while running."""

    def __init__(self, root_pid: int | None):
        super().__init__(daemon=True)
        self.root_pid, self.peak, self.halt = root_pid, 0, threading.Event()

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.sample())
            self.halt.wait(0.1)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return self.peak


IDLE_WAIT_S = 5.0  # at rest: after this long with no request


def idle_rss(pid: int | None) -> int:
    """The server tree's RSS at rest: the least of a second's samples after IDLE_WAIT_S without requests."""
    time.sleep(IDLE_WAIT_S)
    sampler = RssSampler(pid)
    samples = []
    for _ in range(10):
        samples.append(sampler.sample())
        time.sleep(0.1)
    return min(samples)


@dataclass
class Cell:
    concurrency: int
    batch: int
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    peak_rss: int = 0


def run_cell(url: str, payload: bytes, cell: Cell, seconds: float, max_requests: int, timeout: float,
             server_pid: int | None) -> Cell:
    parts = urllib.parse.urlsplit(url)
    lock = threading.Lock()
    issued = [0]
    start = time.perf_counter()
    deadline = start + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            while True:
                with lock:
                    if issued[0] >= max_requests or time.perf_counter() >= deadline:
                        return
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/invocations", payload, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    ok = resp.status == 200 and len(json.loads(data)["predictions"]) >= cell.batch
                    kind = None if ok else f"HTTP {resp.status}"
                except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                    kind = type(exc).__name__
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                elapsed = time.perf_counter() - t0
                with lock:
                    if kind is None:
                        cell.latencies.append(elapsed)
                    else:
                        cell.errors[kind] = cell.errors.get(kind, 0) + 1
        finally:
            conn.close()

    sampler = RssSampler(server_pid)
    sampler.start()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(cell.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cell.wall = time.perf_counter() - start
    cell.peak_rss = sampler.stop()
    return cell


def warm_up(url: str, payload: bytes, timeout: float) -> None:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", "/invocations", payload, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read()
        if resp.status != 200:
            sys.exit(f"error: the server answered HTTP {resp.status} to a warm-up request: {text[:300]!r}")
    finally:
        conn.close()


def listening_pid(port: int) -> int | None:
    """The topmost process listening on `port` here (uvicorn's workers share their supervisor's socket), for
    a server this benchmark did not start; None where it cannot be seen."""
    import psutil

    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
        return next((pid for pid in pids if psutil.Process(pid).ppid() not in pids), None)
    except psutil.Error:
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, tracking_uri: str, workers: int, timeout: int, log: Path,
                 threads: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuning.serve", "--model", model, "--tracking-uri", tracking_uri,
                                 "--port", str(port), "--workers", str(workers), "--timeout", str(timeout),
                                 *(["--threads", str(threads)] if threads else [])],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and not answers_ping(url):
        if proc.poll() is not None:
            sys.exit(f"error: tuning.serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    if not answers_ping(url):
        stop_server(proc)
        sys.exit(f"error: the server did not answer /ping within 300 s:\n{log.read_text()[-2000:]}")
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to tuning.serve (it stops the scoring server's group and waits for it); SIGKILL both groups
    after 60 s as a last resort."""
    import psutil

    groups = {proc.pid}
    try:
        groups |= {os.getpgid(c.pid) for c in psutil.Process(proc.pid).children(recursive=True)}
    except (psutil.Error, ProcessLookupError):
        pass
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


# --------------------------------------------------------------------------- the table


def table(cells: list[Cell], rates: dict[int, float], thread_rates: dict[int, float]) -> list[str]:
    head = (f"{'conc':>4} {'batch':>5} {'reqs':>5} {'errors':>6} {'req/s':>7} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'peak RSS MiB':>12} {'in-proc img/s':>13} {'served/in-proc':>14} {'served/in-thread':>16}")
    lines = [head, "-" * len(head)]
    for c in cells:
        n = len(c.latencies)
        req_s = n / c.wall if c.wall else 0.0
        img_s = req_s * c.batch
        ms = [1000 * x for x in c.latencies]
        errors = sum(c.errors.values())
        inproc = rates.get(c.batch, float("nan"))
        inthread = thread_rates.get(c.batch, float("nan"))
        rss = f"{c.peak_rss / 2**20:.0f}" if c.peak_rss else "n/a"
        lines.append(f"{c.concurrency:>4} {c.batch:>5} {n:>5} {errors:>6} {req_s:>7.1f} {img_s:>8.1f} "
                     f"{percentile(ms, 50):>8.1f} {percentile(ms, 95):>8.1f} {percentile(ms, 99):>8.1f} {rss:>12} "
                     f"{inproc:>13.1f} {img_s / inproc if inproc else float('nan'):>14.2f} "
                     f"{img_s / inthread if inthread else float('nan'):>16.2f}")
    errors = {k: v for c in cells for k, v in c.errors.items()}
    if errors:
        lines.append(f"errors: {', '.join(f'{k} x{v}' for k, v in sorted(errors.items()))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model download
    if args.seconds <= 0 or args.max_requests < 1 or args.workers < 1 or args.timeout < 1:
        sys.exit("error: --seconds must be > 0 and --max-requests, --workers, --timeout >= 1")
    if args.url and urllib.parse.urlsplit(args.url).hostname not in LOCAL_HOSTS:
        sys.exit(f"error: --url {args.url}: this load generator runs against 127.0.0.1 only")
    from tuning.tracking.uri import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    for line in machine_lines():
        print(line, flush=True)
    import torch

    print(f"torch threads: {torch.get_num_threads()} (this process; the server's own are torch's default too)", flush=True)
    images = frames(max(args.batch))
    payloads = {b: body(images[:b]) for b in args.batch}
    rates, thread_rates = in_process(args.model, tracking_uri, images, args.batch, args.seconds, args.max_requests)
    print("in process, main thread: " + ", ".join(f"batch {b}: {r:.1f} img/s" for b, r in rates.items()), flush=True)
    print("in process, a worker thread: " + ", ".join(f"batch {b}: {r:.1f} img/s" for b, r in thread_rates.items()),
          flush=True)

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url = args.url.rstrip("/")
                server_pid = listening_pid(urllib.parse.urlsplit(url).port or 80)
                what = f"the server at {url}"
            else:
                proc, url = start_server(args.model, tracking_uri, args.workers, args.timeout, Path(tmp) / "serve.log",
                                         args.threads)
                server_pid = proc.pid
                what = (f"python -m tuning.serve --workers {args.workers}{f' --threads {args.threads}' if args.threads else ''} "
                        f"--model {args.model} at {url}")
            print(f"served: {what}; each cell {args.seconds:g} s or {args.max_requests} requests, whichever first", flush=True)
            cells = []
            warm_up(url, payloads[min(args.batch)], args.timeout + 10)
            idle_before = idle_rss(server_pid)
            for b in args.batch:
                warm_up(url, payloads[b], args.timeout + 10)
                for c in args.concurrency:
                    cells.append(run_cell(url, payloads[b], Cell(c, b), args.seconds, args.max_requests,
                                          args.timeout + 10, server_pid))
                    print(f"  ... concurrency {c}, batch {b}: {len(cells[-1].latencies)} requests in {cells[-1].wall:.1f} s",
                          file=sys.stderr, flush=True)
            idle_after = idle_rss(server_pid)
        finally:
            if proc is not None:
                stop_server(proc)
    print("\n".join(table(cells, rates, thread_rates)))
    if idle_before and idle_after:  # does memory come back after the large requests?
        print(f"server RSS at rest: {idle_before / 2**20:.0f} MiB after warm-up, {idle_after / 2**20:.0f} MiB "
              f"{IDLE_WAIT_S:g} s after the last cell ({idle_after / idle_before:.2f}x)")
    print(f"load average at the end (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
