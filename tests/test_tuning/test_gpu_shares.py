"""GPU shares: the default from a GPU's memory (hand-computed cases), the device a trial picks, the
flag's refusals, and what Tune really does with shares, on a real Ray node that declares one GPU
(`ray start --head --num-gpus 1`) on this CPU-only machine.

The trials' concurrency is measured, not assumed: each trial run's interval runs from its MLflow
run's creation to its last epoch's metrics, both stamped inside the trial's process, so an interval
lies within the time the trial really held its share; the most intervals that overlap is then at
most the trials Ray ran at once.
"""

from __future__ import annotations

import os
import shutil
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, run_main
from mlflow.tracking import MlflowClient

from cluster import local
from fer_model import metrics as M
from tuning import grid
from tuning import names as N
from tuning.trials.gpu_shares import (CUDA_PROCESS_MB,
    DEFAULT_GPU_SHARE,
    MAX_TRIALS_PER_GPU,
    default_share,
    share_for_memory,
    trials_per_gpu)
from tuning.options import check_share
from tuning.trials.trainable import GPU_TRIALS_ON_CPU_ENV, GpuNotVisible, choose_device
from tuning.names import TAG_GPU_IDS, TAG_GPU_SHARE, TAG_NODE_ID, TAG_NODE_IP

# --------------------------------------------------------------------------- the default share, by hand


@pytest.mark.parametrize("gpu_mb, trial_peak_mb, share", [
    (81_559, 1024, 0.25),   # H100 80 GB: 0.9 x 81,559 / 2,048 = 35 fit, capped at 4
    (15_360, 1024, 0.25),   # T4: 13,824 / 2,048 = 6.75 -> 6 -> a power of two: 4
    (8_192, 1024, 0.5),     # 7,372.8 / 2,048 = 3.6 -> 3 -> 2
    (9_102, 1024, 0.5),     # 8,191.8 / 2,048 = 3.99 -> 3 -> 2 (4 need 9,103 MB)
    (9_103, 1024, 0.25),    # 8,192.7 / 2,048 = 4.0 -> 4
    (4_096, 1024, 1.0),     # 3,686 / 2,048 = 1.8 -> 1
    (2_048, 1024, 1.0),     # 1,843 / 2,048 = 0.9: not even one fits; a smaller share would not help it
    (24_576, 6000, 0.5),    # a measured 6,000 MB peak: 22,118 / 7,024 = 3.1 -> 3 -> 2
    (16_384, 300, 0.25),    # a measured 300 MB peak: 14,746 / 1,324 = 11 -> capped at 4
])
def test_the_share_follows_the_gpus_memory_and_the_trials_peak(gpu_mb, trial_peak_mb, share):
    assert share_for_memory(gpu_mb, trial_peak_mb) == share
    assert trials_per_gpu(gpu_mb, trial_peak_mb + CUDA_PROCESS_MB) == round(1 / share) <= MAX_TRIALS_PER_GPU


def test_the_default_share_without_gpus_or_memory():
    assert default_share(0, 81_559) == (0.0, "the cluster has no GPU")
    share, why = default_share(1, None)
    assert share == DEFAULT_GPU_SHARE == 0.25 and "GPU memory unknown" in why
    share, why = default_share(8, 81_559)
    assert share == 0.25 and why.startswith("4 trial(s) per GPU: 81,559 MB of GPU memory")
    with pytest.raises(ValueError):
        trials_per_gpu(0)


@pytest.mark.parametrize("value", [0.0, 0.125, 0.3, 1.0, None])
def test_shares_within_0_to_1_are_accepted(value):
    check_share(value)


# --------------------------------------------------------------------------- the trial's device


def test_a_trial_trains_where_its_share_says():
    assert choose_device(0.0, True, False, "n").type == "cpu"  # no share: never GPU 0 unscheduled
    assert choose_device(0.25, True, False, "n").type == "cuda"
    assert choose_device(0.25, False, True, "n").type == "cpu"  # FER_TUNE_GPU_TRIALS_ON_CPU=1
    with pytest.raises(GpuNotVisible) as info:
        choose_device(0.5, False, False, "10.0.0.7 (ab12cd34)")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("trial given 0.5 GPU on node 10.0.0.7 (ab12cd34)") and GPU_TRIALS_ON_CPU_ENV in message


# --------------------------------------------------------------------------- the flag's refusals


@pytest.mark.parametrize("value", ["1.5", "-0.25", "nan"])
def test_a_share_outside_0_to_1_is_one_line_and_exit_2(workdir, capsys, value):
    assert run_main(grid.main, ["--gpus-per-trial", value]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --gpus-per-trial must be within 0..1 (a share of one GPU; 0: no GPU), got {float(value):g}"


@pytest.mark.e2e
def test_a_share_on_a_cluster_without_gpus_is_one_line_and_exit_2(ray_session, workdir, tiny_folder, capsys):
    argv = ["--data", tiny_folder, "--gpus-per-trial", "0.5", "--no-final", "--address", ray_session]
    assert run_main(grid.main, argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --gpus-per-trial 0.5 but the Ray cluster at {ray_session} has no GPU: drop the flag " \
                   "(trials train on CPUs), or use a cluster with GPUs"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert not client.search_runs([client.get_experiment_by_name(N.DEFAULT_EXPERIMENT).experiment_id])  # before any stage


# --------------------------------------------------------------------------- Tune and GPU shares, for real

SAMPLES = 70  # of tiny_folder's Training images (test_faults.py): 63 train, 7 validation images


@pytest.fixture(scope="module")
def gpu_ray(tmp_path_factory):
    """A real Ray head on 127.0.0.1 offering 1 GPU (declared: this machine has none) and 5 CPUs (so the
    GPU, not the CPUs, limits 4 trials of 0.25 at once), in its own process group with Ray's token
    authentication on; stopped by that group. Yields the environment a client needs and its address."""
    folder = tmp_path_factory.mktemp("gpu-ray")
    (folder / "logs").mkdir()
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**local._env(token), "OMP_NUM_THREADS": "1"}
    address = f"{local.HOST}:{free_port()}"
    ray = Path(sys.executable).parent / "ray"
    cmd = [str(ray) if ray.exists() else "ray", "start", "--head", "--block", f"--node-ip-address={local.HOST}",
           f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=5", "--num-gpus=1", "--include-dashboard=false",
           "--disable-usage-stats"]
    head = local._spawn("head", cmd, folder, env)
    try:
        local._wait_started(head, time.time() + local.START_TIMEOUT)
        yield env, address
    finally:
        stopped, _, left = local._stop([head])
        assert not left, f"processes of the test's Ray head still run: {left}"


def run_grid(gpu_ray, workdir: Path, data: Path, share: float | None, trials: int, epochs: int,
             on_cpu: bool) -> subprocess.CompletedProcess:
    """`python -m tuning.grid` joining the declared-GPU Ray: `trials` trials of `epochs` epochs at
    `share` (None: the default)."""
    env, address = gpu_ray
    env = {**env, "PYTHONUNBUFFERED": "1", "FER2013_CACHE": os.environ["FER2013_CACHE"]}
    env.pop(GPU_TRIALS_ON_CPU_ENV, None)
    if on_cpu:
        env[GPU_TRIALS_ON_CPU_ENV] = "1"
    lrs = ",".join(f"{k}e-3" for k in range(1, trials + 1))
    argv = ["--data", data, "--max-samples", SAMPLES, "--dropouts", "0.3", "--lrs", lrs, "--epochs", epochs,
            "--no-final", *(["--gpus-per-trial", share] if share is not None else []), "--address", address,
            "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--storage", workdir / "ray_results"]
    return subprocess.run([sys.executable, "-m", "tuning.grid", *map(str, argv)], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=600)


def stage_runs(workdir: Path) -> tuple[MlflowClient, object, list]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(N.DEFAULT_EXPERIMENT)
    (stage,) = client.search_runs([exp.experiment_id], f"tags.`{N.TAG_STAGE}` = '{N.STAGE_GRID}'")
    trials = client.search_runs([exp.experiment_id], f"tags.`{N.TAG_STAGE}` = '{N.STAGE_TRIAL}'")
    return client, stage, trials


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that share an instant (one ending as another starts do not)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:  # at equal times the end (-1) sorts first
        now += step
        most = max(most, now)
    return most


def test_max_overlap():
    assert max_overlap([(0, 2), (2, 4)]) == 1
    assert max_overlap([(0, 5), (1, 2), (1.5, 3), (4, 6)]) == 3
    assert max_overlap([]) == 0


def trial_intervals(client: MlflowClient, trials: list) -> list[tuple[float, float]]:
    """Each trial's [run created, last epoch logged], in seconds, both stamped in the trial's process."""
    return [(t.info.start_time / 1000, max(m.timestamp for m in client.get_metric_history(t.info.run_id, M.VAL_ACC)) / 1000)
            for t in trials]


# Epochs for each trial to train ~15-25 s on a loaded 2-core machine: the trials of a wave start up to
# ~7 s apart (their workers' imports) and must still all overlap. Measured there: 4 trials at once took
# 0.55-1.2 s an epoch, and the 4th started 3-7 s after the 1st; 2 trials 0.3-0.45 s.
@pytest.mark.e2e
@pytest.mark.parametrize("share, trials, at_once, epochs", [(0.25, 5, 4, 30), (0.5, 3, 2, 35)])
def test_trials_pack_by_their_gpu_share(gpu_ray, workdir, tiny_folder, share, trials, at_once, epochs):
    """With the test-only switch, GPU-share trials train on the CPU: Tune runs 1/share of them at
    once on the one GPU, and the next waits for one to end."""
    proc = run_grid(gpu_ray, workdir, tiny_folder, share, trials, epochs, on_cpu=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"up to {at_once} at once (1 CPU, {share:g} GPU each; Ray has 5 CPUs, 1 GPUs)" in proc.stdout
    client, stage, runs = stage_runs(workdir)
    assert float(stage.data.params["ray_gpus"]) == 1 and float(stage.data.params["ray_cpus"]) == 5
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # Ray's assignment, as each trial saw it
        assert r.data.tags[TAG_GPU_IDS] == "0" and float(r.data.tags[TAG_GPU_SHARE]) == share, r.data.tags
    intervals = sorted(trial_intervals(client, runs))
    assert max_overlap(intervals) == at_once, intervals
    first = intervals[:at_once]
    assert max(s for s, _ in first) < min(e for _, e in first)  # those all ran together...
    assert intervals[at_once][0] >= min(e for _, e in first)  # ...and the next began once one of them had ended


# A machine with a real GPU (and nvidia-smi) sees Ray's GPU 0 and reads its memory: these two describe a
# CPU-only node that declares a GPU.
cpu_only = pytest.mark.skipif(bool(shutil.which("nvidia-smi")), reason="a real GPU is here: its trials would train on it")


@pytest.mark.e2e
@cpu_only
def test_a_gpu_share_without_a_visible_gpu_fails_at_once(gpu_ray, workdir, tiny_folder):
    """Without the switch a trial given a share of a GPU its process cannot see fails before training,
    naming its share and node; the stage ends in one line, exit 2."""
    t0 = time.time()
    proc = run_grid(gpu_ray, workdir, tiny_folder, 0.5, 2, 1, on_cpu=False)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Above it Tune's own report of each failed trial (a traceback), as for any trial that fails.
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no trial produced a validation accuracy (trial d0.3 lr"), line
    client, stage, runs = stage_runs(workdir)
    assert len(runs) == 2
    for r in runs:  # each a FAILED run, no epoch trained, the error and the GPU Ray gave it on it
        node = f"{r.data.tags[TAG_NODE_IP]} ({r.data.tags[TAG_NODE_ID][:8]})"
        error = f"GpuNotVisible: trial given 0.5 GPU on node {node}, CUDA_VISIBLE_DEVICES='0', but its process sees no CUDA device"
        assert r.info.status == "FAILED" and r.data.tags[N.TAG_OUTCOME] == N.Outcome.ERROR
        assert error in r.data.tags[N.TAG_ERROR]
        assert r.data.tags[TAG_GPU_IDS] == "0" and not client.get_metric_history(r.info.run_id, M.VAL_ACC)
    assert "GpuNotVisible: trial given 0.5 GPU on node" in line and "sees no CUDA device" in line, line
    assert time.time() - t0 < 300  # no epochs: the command's start, two trials and a retry each


@pytest.mark.e2e
@cpu_only
def test_without_the_flag_a_gpu_cluster_gets_the_default_share(gpu_ray, workdir, tiny_folder):
    """The GPU's memory is asked on the GPU node (nvidia-smi, which a CPU-only node lacks): unknown,
    so the default share, said once before the plan."""
    proc = run_grid(gpu_ray, workdir, tiny_folder, None, 1, 1, on_cpu=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = [line for line in proc.stdout.splitlines() if line.startswith("GPU share per trial")]
    assert said == ["GPU share per trial: 0.25 (GPU memory unknown; 4 trials per GPU; --gpus-per-trial sets it)"]
    _, _, (run,) = stage_runs(workdir)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_GPU_SHARE] == "0.25"
