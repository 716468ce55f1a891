"""Trials per GPU: the study's grid with 1, 2, 4 and 8 trials sharing one GPU, beside the notebook's loop.

First it times the notebook's DataLoader loop and our trainer on the GPU (`benchmarks/throughput.py
--device cuda`), which also decodes the data into the cache the grids then read. Then for each share
(`--gpus-per-trial` 1, 0.5, 0.25, 0.125) it runs the study's grid as a user would (`python -m
tuning.grid --no-final`: 9 trials, Ray's start included, a fresh MLflow store each) and prints the wall
time, the aggregate training images per second (every trial's epochs summed over the Tune stage's
wall), the peak GPU memory of a trial as torch's allocator counts it (`gpu_peak_memory_mb`), and the
most GPU memory in use while the grid ran (nvidia-smi: every process, CUDA contexts included). Last,
the share `--gpus-per-trial` would default to on this GPU, from the estimate and from the peak measured
(`tuning.trials.gpu_shares`).

The trials train `--epochs` epochs (default 2: the aggregate rate is steady from the first epoch on,
and 4 grids of the study's 10 epochs would not fit in 10 minutes); the study's whole protocol is
`benchmarks/pipeline.py --full` (see `benchmarks/gpu_session.sh`, which runs both). The JSON is written
after each share, so a run cut short keeps what it measured.

    python benchmarks/gpu_packing.py --data PATH --json out.json   # ~4-6 min on one H100-class GPU
    python benchmarks/gpu_packing.py --data PATH --shares 1,0.25 --epochs 10

Needs a CUDA GPU; arguments after ``--`` go to every `tuning.grid` run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pipeline import DEFAULT_DATA, read_phases, run_command  # noqa: E402
from tuning.trials import phases as P  # noqa: E402

DEFAULT_SHARES = "1,0.5,0.25,0.125"
GRID_TRIALS = 9  # the study's grid: 3 dropouts x 3 learning rates
GRID_TIMEOUT_S = 150.0  # one grid of 9 x 2 epochs takes well under a minute on an H100; a hang must not eat the session


class GpuMemorySampler(threading.Thread):
    """The most memory in use on GPU 0 (MB, nvidia-smi, every process) while it runs, sampled every `every` s."""

    def __init__(self, every: float = 0.5):
        super().__init__(name="gpu-memory", daemon=True)
        self.every, self.peak_mb, self.done = every, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_mb = max(self.peak_mb, gpu_memory_used_mb() or 0.0)
            self.done.wait(self.every)

    def stop(self) -> float:
        self.done.set()
        self.join(5)
        return self.peak_mb


def gpu_memory_used_mb(index: int = 0) -> float | None:
    """Memory in use on GPU `index` now (MB), or None without an answer from nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def stage_images_per_second(uri: str) -> tuple[float, float]:
    """(training images per second of all trials together over the Tune stage's wall, peak GPU MB of a trial)."""
    from mlflow.tracking import MlflowClient

    from fer_model import metrics as M
    from tuning import names as N

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    images, peak = 0.0, 0.0
    for run in client.search_runs([exp.experiment_id], f"tags.`{N.TAG_STAGE}` = '{N.STAGE_TRIAL}'", max_results=1000):
        seconds = {e.step: e.value for e in client.get_metric_history(run.info.run_id, M.EPOCH_SECONDS)}
        for m in client.get_metric_history(run.info.run_id, M.IMAGES_PER_SECOND):
            images += m.value * seconds.get(m.step, 0.0)  # that epoch's images (its seconds include validation: a lower bound)
        peak = max(peak, run.data.metrics.get(P.GPU_PEAK_MB, 0.0))
    trials_s = read_phases(uri)["driver"].get(P.TRIALS, 0.0)
    return images / max(trials_s, 1e-9), peak


def reference_rows(data: str, workdir: Path, timeout: float) -> dict:
    """The notebook's loop and ours on the GPU (`throughput.py`'s rows), as it wrote them; on a failure
    {"error": its last line}, and the grids still run."""
    out = workdir / "throughput.json"
    try:
        ref = subprocess.run([sys.executable, str(REPO / "benchmarks/throughput.py"), "--device", "cuda", "--data", data,
                              "--no-packed", "--json", str(out)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"benchmarks/throughput.py did not finish within {timeout:.0f} s"}
    print(ref.stdout.rstrip(), flush=True)
    if ref.returncode != 0:
        error = f"benchmarks/throughput.py failed (exit {ref.returncode}): {(ref.stderr.strip().splitlines() or [''])[-1]}"
        print(f"warning: {error}", flush=True)
        return {"error": error}
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="the FER2013 data, e.g. a copied tarball (default: %(default)s)")
    p.add_argument("--shares", default=DEFAULT_SHARES, help="GPU shares per trial to run (default %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (default %(default)s; the study's: 10)")
    p.add_argument("--timeout", type=float, default=GRID_TIMEOUT_S, help="seconds one grid may take (default %(default)s)")
    p.add_argument("--json", type=Path, metavar="OUT")
    p.add_argument("grid_args", nargs="*", help="more arguments for tuning.grid (after --)")
    args = p.parse_args()
    try:
        shares = [float(s) for s in args.shares.split(",")]
    except ValueError:
        p.error(f"--shares: comma-separated numbers, got {args.shares!r}")
    if not all(0 < s <= 1 for s in shares) or args.epochs < 1:
        p.error("--shares must be within (0, 1] and --epochs >= 1")
    if not Path(args.data).exists():
        sys.exit(f"error: no data at {args.data}: pass --data PATH (a copy of the FER2013 tarball will do)")
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here (torch.cuda.is_available() is False); this benchmark measures GPU packing")
    from tuning.trials.gpu_shares import TRIAL_PEAK_MB, gpu_memory_here, share_for_memory

    gpu_mb = gpu_memory_here([0]) or torch.cuda.get_device_properties(0).total_memory / 2**20
    env = {"gpu": torch.cuda.get_device_name(0), "gpu_memory_mb": gpu_mb, "torch": torch.__version__, "epochs": args.epochs}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    result: dict = {"env": env, "rows": []}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory(prefix="fer-gpu-packing-") as tmp:
        result["reference"] = reference_rows(args.data, Path(tmp), args.timeout)
    save()
    for share in shares:
        with tempfile.TemporaryDirectory(prefix="fer-gpu-packing-") as tmp:
            idle = gpu_memory_used_mb() or 0.0
            sampler = GpuMemorySampler()
            sampler.start()
            try:
                wall, uri, _ = run_command(["--data", args.data, "--gpus-per-trial", f"{share:g}", "--epochs", str(args.epochs),
                                            "--no-final", *args.grid_args], Path(tmp), warm_cache=True, timeout=args.timeout)
            finally:
                in_use = sampler.stop()
            rate, peak = stage_images_per_second(uri)
        per_gpu = round(1 / share)
        # What one trial's process holds (context and allocator cache included): tuning.trials.gpu_shares.TRIAL_FOOTPRINT_MB's measure.
        footprint = (in_use - idle) / min(per_gpu, GRID_TRIALS)
        result["rows"].append({"gpus_per_trial": share, "trials_per_gpu": per_gpu, "wall_s": wall, "images_per_s": rate,
                               "peak_mb_per_trial": peak, "gpu_in_use_peak_mb": in_use, "gpu_in_use_idle_mb": idle,
                               "footprint_mb_per_trial": footprint})
        save()
        print(f"{per_gpu} trial(s)/GPU: wall {wall:.1f} s, {rate:,.0f} img/s aggregate, peak {peak:,.0f} MB per trial "
              f"(allocator), {in_use:,.0f} MB in use on the GPU at most (~{footprint:,.0f} MB a trial's process)", flush=True)
    rows = result["rows"]
    base = rows[0]["images_per_s"] or 1e-9
    print(f"\n{'trials/GPU':>10} {'wall s':>8} {'img/s':>9} {'vs first':>8} {'MB/trial':>9} {'MB/process':>10}")
    for r in rows:
        print(f"{r['trials_per_gpu']:>10} {r['wall_s']:8.1f} {r['images_per_s']:9,.0f} {r['images_per_s'] / base:7.2f}x "
              f"{r['peak_mb_per_trial']:9,.0f} {r['footprint_mb_per_trial']:10,.0f}")
    measured = max((r["peak_mb_per_trial"] for r in rows), default=0.0)
    result["default_share"] = {"estimate": share_for_memory(gpu_mb, TRIAL_PEAK_MB),
                               "measured_peak": share_for_memory(gpu_mb, measured) if measured else None}
    save()
    print(f"\n--gpus-per-trial default on this GPU ({gpu_mb:,.0f} MB): {result['default_share']['estimate']:g} "
          f"from the estimate ({TRIAL_PEAK_MB:,.0f} MB a trial), "
          f"{result['default_share']['measured_peak'] or float('nan'):g} from the peak measured ({measured:,.0f} MB)")


if __name__ == "__main__":
    main()
