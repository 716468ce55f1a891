"""Where a tuning command's wall time goes, and what Ray Tune costs over training alone.

Runs `python -m tuning.grid ARGS` end to end as a user would (its own process, a fresh MLflow
store, a fresh data cache unless --warm-cache), reads the phase timings it logs (`tuning.trials.phases`)
back from MLflow, and prints each phase's seconds and share of the command's wall time. Then,
unless --no-sequential, it trains the same grid's trials one after another as plain `fit` calls in
this process, each with the trials' thread count, and prints the tuning overhead:

    grid stage wall (Tune's run of the trials + settling them) / (sequential training time / concurrency)

    python benchmarks/pipeline.py --quick                       # the --quick preset
    python benchmarks/pipeline.py --json out.json -- --epochs 2 --max-samples 2000
    python benchmarks/pipeline.py --full                        # the study's whole protocol (hours on a CPU)

Arguments after ``--`` go to `tuning.grid` as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.machine import cpu_flags  # noqa: E402
from tuning.trials import phases as P  # noqa: E402

DEFAULT_DATA = os.environ.get("FER2013_DATA") or str(REPO.parent / "shared/data/fer2013/fer2013-msambare.tar.gz")
# Rows of the breakdown, in the order a command runs them.
DRIVER_ROWS = [(P.RAY_START, "Ray start"), (P.DATA_LOAD, "data load (decode or cache)"),
               (P.SHIP_DATA, "data into Ray's object store"), (P.TRIALS, "Tune: the trials, as scheduled"),
               (P.CONCLUDE, "settling trials, tables, plots, artifacts"), (P.FINAL_TRAIN, "final stage: training"),
               (P.FINAL_EVALUATE, "final stage: test evaluation + artifacts"), (P.REGISTER, "model logging + registration")]
TRIAL_ROWS = [(P.TRIAL_OPEN, "open the trial's MLflow run"), (P.TRIAL_FIT, "training + validation (fit)"),
              (P.TRIAL_CHECKPOINT, "per-epoch checkpoint + tune.report"), (P.TRIAL_MLFLOW_WAIT, "wait for queued MLflow writes")]


def run_command(grid_args: list[str], tmp: Path, warm_cache: bool, timeout: float | None = None) -> tuple[float, str, str]:
    """Run tuning.grid in its own process; its wall time, tracking URI and console output. Exits
    (one line, then the output) when it fails or runs past `timeout` seconds."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "tuning.grid", *grid_args, "--tracking-uri", uri, "--storage", str(tmp / "ray")]
    if not warm_cache and "--cache-dir" not in grid_args:
        cmd += ["--cache-dir", str(tmp / "cache")]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # its process group's Ray is reaped by the next command (tuning.trials.runner)
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        sys.exit(f"tuning.grid did not finish within {timeout:.0f} s:\n{out[-3000:]}")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"tuning.grid failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, uri, proc.stdout


def read_phases(uri: str) -> dict[str, object]:
    """The phases the command logged: the driver's (summed over its stage runs) and the trials' (summed and per trial)."""
    from mlflow.tracking import MlflowClient

    from tuning import names as N
    from tuning.names import TAG_GPU_SHARE

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    driver: dict[str, float] = {}
    trials: list[dict[str, float]] = []
    share = 0.0  # the GPU share Ray gave the trials (tag gpu_share; 0: none)
    for run in runs:
        got = {k[len(P.PREFIX):-2]: v for k, v in run.data.metrics.items() if k.startswith(P.PREFIX)}
        if run.data.tags.get(N.TAG_STAGE) == N.STAGE_TRIAL:
            trials.append(got)
            share = max(share, float(run.data.tags.get(TAG_GPU_SHARE) or 0))
        else:
            for k, v in got.items():
                driver[k] = driver.get(k, 0.0) + v
    grid = next(r for r in runs if r.data.tags.get(N.TAG_STAGE) == N.STAGE_GRID)
    return {"driver": driver, "trials": trials, "ray_cpus": float(grid.data.params.get("ray_cpus", os.cpu_count())),
            "ray_gpus": float(grid.data.params.get("ray_gpus", 0)), "gpu_share": share}


def trials_at_once(found: dict[str, object], trials: int, cpus_per_trial: float, max_concurrent: int | None) -> int:
    """How many of the grid's trials Ray could run at once: its CPUs, its GPUs at the trials' share, --max-concurrent."""
    fits = [trials, int(found["ray_cpus"] // cpus_per_trial), max_concurrent or trials]
    if found["gpu_share"]:
        fits.append(int(found["ray_gpus"] / found["gpu_share"] + 1e-6))
    return max(1, min(fits))


def parse_grid_args(grid_args: list[str]) -> argparse.Namespace:
    """`tuning.grid`'s own parse of the arguments (its --quick preset applied), so the reference trains
    exactly the trials the command ran, on the resources it gave them."""
    from tuning.grid import parse_args

    return parse_args(grid_args)[0]


def sequential_fit_seconds(args: argparse.Namespace, threads: int) -> tuple[float, list[float]]:
    """The grid's trials as plain `fit` calls, one after another in this process: total seconds, each trial's."""
    import torch

    from fer_model.config import TrainConfig
    from fer_model.data import load
    from fer_model.training import fit
    from tuning import options as flags
    from tuning.grid import grid_inputs

    inputs = grid_inputs(args)
    data = load(flags.data_config(args), progress=False)
    torch.set_num_threads(threads)
    seconds = []
    for d in inputs.dropouts:
        for lr in inputs.lrs:
            cfg = TrainConfig.from_dict({**inputs.fixed, "dropout": d, "lr": lr})
            t0 = time.perf_counter()
            fit(cfg, data)
            seconds.append(time.perf_counter() - t0)
            print(f"  sequential fit dropout {d:g} lr {lr:g}: {seconds[-1]:.1f} s", flush=True)
    return sum(seconds), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="time `tuning.grid --quick`")
    p.add_argument("--full", action="store_true", help="time the study's whole protocol (no --quick)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the FER2013 tarball (default: %(default)s)")
    p.add_argument("--warm-cache", action="store_true", help="use the user's data cache (default: a fresh, cold one)")
    p.add_argument("--no-sequential", action="store_true", help="skip the plain sequential fit reference")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures as JSON")
    p.add_argument("grid_args", nargs="*", help="more arguments for tuning.grid (after --)")
    args = p.parse_args()
    if args.quick == args.full and not args.grid_args:
        p.error("say --quick or --full (or give tuning.grid arguments after --)")
    grid_args = ["--data", args.data, *(["--quick"] if args.quick else []), *args.grid_args]
    parsed = parse_grid_args(grid_args)
    cpus_per_trial = parsed.cpus_per_trial or 1.0
    env = cpu_flags()
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="fer-pipeline-bench-") as tmp:
        wall, uri, out = run_command(grid_args, Path(tmp), args.warm_cache)
        found = read_phases(uri)
    driver, trials = found["driver"], found["trials"]
    concurrency = trials_at_once(found, len(trials), cpus_per_trial, parsed.max_concurrent)
    print(out.rstrip())  # the command's own console: its plan, a line per trial, the grid, the final stage
    gpu = f", {found['gpu_share']:g} GPU" if found["gpu_share"] else ""
    print(f"\ncommand wall time {wall:.1f} s; {len(trials)} trials, {concurrency} at once, {cpus_per_trial:g} CPU{gpu} each")
    rows = [(label, driver.get(key, 0.0)) for key, label in DRIVER_ROWS]
    rows.append(("Python start, imports, MLflow setup, closing lines (rest)", wall - sum(v for _, v in rows)))
    print(f"{'phase':<58} {'s':>8} {'share':>6}")
    for label, seconds in rows:
        print(f"{label:<58} {seconds:8.1f} {100 * seconds / wall:5.1f}%")
    trial_sum = {key: sum(t.get(key, 0.0) for t in trials) for key, _ in TRIAL_ROWS}
    trial_total = sum(trial_sum.values())
    print(f"\ninside the trials (summed over {len(trials)} trials; {trial_total:.1f} trial-seconds):")
    for key, label in TRIAL_ROWS:
        print(f"{label:<58} {trial_sum[key]:8.1f} {100 * trial_sum[key] / max(trial_total, 1e-9):5.1f}%")
    # Tune's own cost: worker start, imports, data fetch, scheduling gaps (the stage's wall that no trial phase covers).
    stage = driver.get(P.SHIP_DATA, 0.0) + driver.get(P.TRIALS, 0.0) + driver.get(P.CONCLUDE, 0.0)
    result = {"env": env, "grid_args": grid_args, "wall_s": wall, "concurrency": concurrency,
              "cpus_per_trial": cpus_per_trial, "driver": driver, "trials": trials, "grid_stage_s": stage}
    print(f"{'worker start, imports, data fetch, gaps (rest of the stage)':<58} "
          f"{stage * concurrency - trial_total:8.1f} trial-seconds")

    if not args.no_sequential:
        print(f"\nthe same trials as plain fit calls, one after another, {int(cpus_per_trial)} thread(s) each:", flush=True)
        total, each = sequential_fit_seconds(parsed, max(1, int(cpus_per_trial)))
        reference = total / concurrency
        ratio = stage / reference
        bound = list_schedule(each, concurrency)
        print(f"sequential training {total:.1f} s; / concurrency {concurrency} = {reference:.1f} s; "
              f"grid stage {stage:.1f} s: tuning overhead {100 * (ratio - 1):+.1f}% (ratio {ratio:.3f})")
        print(f"  of which uneven packing: the same trials in grid order on {concurrency} slots cannot end before "
              f"{bound:.1f} s ({100 * (bound / reference - 1):+.1f}%); Ray Tune's own cost {stage - bound:+.1f} s "
              f"({100 * (stage / bound - 1):+.1f}%)")
        result.update(sequential_s=total, sequential_each_s=each, overhead_ratio=ratio, packing_bound_s=bound)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


def list_schedule(seconds: list[float], slots: int) -> float:
    """When trials of these lengths, started in this order on the first free of `slots`, all end: the
    best Tune can do with them (9 equal trials on 2 slots: 5 rounds, 11% over a perfect split)."""
    ends = [0.0] * slots
    for s in seconds:
        ends[ends.index(min(ends))] += s
    return max(ends)


if __name__ == "__main__":
    main()
