"""Trials per GPU: the study's grid with 1, 2, 4 and 8 trials sharing one GPU, beside the notebook's loop.

For each share (`--gpus-per-trial` 1, 0.5, 0.25, 0.125) it runs the study's whole protocol as a user
would (`python -m tuning.grid`: 9 trials x 10 epochs and the 15-epoch final, Ray start included, a
fresh MLflow store each), and prints the wall time, the aggregate training images per second (every
trial's epochs summed over the Tune stage's wall time), and the peak GPU memory of a trial. First it
times the notebook's DataLoader loop and our trainer on the same GPU (`benchmarks/throughput.py`).

    python benchmarks/gpu_packing.py --data PATH                    # the full protocol, 4 shares
    python benchmarks/gpu_packing.py --data PATH --shares 1,0.25 -- --epochs 2 --final-epochs 2   # shorter

Needs a CUDA GPU; arguments after ``--`` go to every `tuning.grid` run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pipeline import DEFAULT_DATA, read_phases, run_command  # noqa: E402
from tuning import phases as P  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--shares", default="1,0.5,0.25,0.125", help="GPU shares per trial to run (default %(default)s)")
    p.add_argument("--json", type=Path, metavar="OUT")
    p.add_argument("grid_args", nargs="*", help="more arguments for tuning.grid (after --)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; this benchmark measures GPU packing")
    print(f"gpu={torch.cuda.get_device_name(0)} torch={torch.__version__}", flush=True)
    ref = subprocess.run([sys.executable, str(REPO / "benchmarks/throughput.py"), "--device", "cuda", "--data", args.data,
                          "--no-packed", "--json", "/dev/stdout"], capture_output=True, text=True)
    print(ref.stdout.split("{", 1)[0].rstrip())  # its table (the JSON follows it)
    rows = []
    for share in [float(s) for s in args.shares.split(",")]:
        with tempfile.TemporaryDirectory(prefix="fer-gpu-packing-") as tmp:
            wall, uri, _ = run_command(["--data", args.data, "--gpus-per-trial", f"{share:g}", *args.grid_args],
                                       Path(tmp), warm_cache=True)
            rate, peak = stage_images_per_second(uri)
        rows.append({"gpus_per_trial": share, "trials_per_gpu": round(1 / share), "wall_s": wall,
                     "images_per_s": rate, "peak_mb_per_trial": peak})
        print(f"{round(1 / share)} trial(s)/GPU: wall {wall:.1f} s, {rate:,.0f} img/s aggregate, "
              f"peak {peak:,.0f} MB per trial", flush=True)
    base = rows[0]["images_per_s"] or 1e-9
    print(f"\n{'trials/GPU':>10} {'wall s':>8} {'img/s':>9} {'vs 1':>6} {'MB/trial':>9}")
    for r in rows:
        print(f"{r['trials_per_gpu']:>10} {r['wall_s']:8.1f} {r['images_per_s']:9,.0f} {r['images_per_s'] / base:5.2f}x "
              f"{r['peak_mb_per_trial']:9,.0f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "reference": ref.stdout}, indent=2))


if __name__ == "__main__":
    main()
