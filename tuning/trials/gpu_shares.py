"""How much of a GPU each trial asks Ray for: the flag's bounds, and the default from the GPU's memory.

The default share is ``1 / trials_per_gpu(memory)``: as many trials as fit in 90% of the GPU's
memory at `TRIAL_FOOTPRINT_MB` each, rounded down to a power of two (shares 1, 0.5, 0.25 add up to
exactly one GPU), at most `MAX_TRIALS_PER_GPU`. The GPU's memory is read on a GPU node by a small
Ray task (`probe_gpu_memory_mb`); where it cannot be read, `DEFAULT_GPU_SHARE`.

Nothing heavy is imported at module level: the probe task's worker imports this module alone.
"""

from __future__ import annotations

import math
import subprocess
from typing import Any

# The study's CNN (2,452,999 parameters) at batch 32, as torch's allocator would count it
# (`gpu_peak_memory_mb`): the 1024-image validation batch dominates (conv2's output, 1024 x 64 x 48 x 48
# fp32, is 604 MB, beside conv1's 302 MB input to it), then the training split resident on the device
# (25,838 uint8 images, 60 MB), weights, gradients and Adam's moments (39 MB) and batch-32 activations
# (~45 MB). A stated estimate, rounded up: no GPU has measured it yet (benchmarks/gpu_packing.py does).
TRIAL_PEAK_MB = 1024.0
# What a trial's process holds beyond its allocated peak: the CUDA context (~0.5 GB with lazy module
# loading) and the caching allocator's slack. Conservative, also unmeasured here.
CUDA_PROCESS_MB = 1024.0
TRIAL_FOOTPRINT_MB = TRIAL_PEAK_MB + CUDA_PROCESS_MB
MEMORY_HEADROOM = 0.9  # of the GPU's memory trials may fill: other processes, fragmentation
# Past a few trials a GPU running the study's small CNN is compute-bound, not memory-bound: more
# trials only share the same throughput (benchmarks/gpu_packing.py measures 1, 2, 4 and 8).
MAX_TRIALS_PER_GPU = 4
DEFAULT_GPU_SHARE = 1 / MAX_TRIALS_PER_GPU  # where the GPU's memory is unknown
GPU_PROBE_TIMEOUT_S = 30.0  # a cluster whose GPUs are all busy answers late: then the default above


def trials_per_gpu(gpu_memory_mb: float, trial_footprint_mb: float = TRIAL_FOOTPRINT_MB) -> int:
    """How many trials of `trial_footprint_mb` each share one GPU of `gpu_memory_mb`: a power of two,
    1 to MAX_TRIALS_PER_GPU (1 also when even one does not fit: a smaller share would not help it)."""
    if gpu_memory_mb <= 0 or trial_footprint_mb <= 0:
        raise ValueError(f"memory sizes must be > 0 MB, got GPU {gpu_memory_mb:g}, trial {trial_footprint_mb:g}")
    fit = int(MEMORY_HEADROOM * gpu_memory_mb // trial_footprint_mb)
    n = 2 ** int(math.log2(fit)) if fit >= 1 else 1
    return min(n, MAX_TRIALS_PER_GPU)


def share_for_memory(gpu_memory_mb: float, trial_peak_mb: float = TRIAL_PEAK_MB) -> float:
    """The GPU share per trial for a GPU of `gpu_memory_mb` and trials of allocated peak `trial_peak_mb`
    (`gpu_peak_memory_mb` as measured, or the estimate), each process adding CUDA_PROCESS_MB."""
    return 1.0 / trials_per_gpu(gpu_memory_mb, trial_peak_mb + CUDA_PROCESS_MB)


def default_share(cluster_gpus: float, gpu_memory_mb: float | None) -> tuple[float, str]:
    """The share a trial gets without --gpus-per-trial, and why (for the console)."""
    if cluster_gpus <= 0:
        return 0.0, "the cluster has no GPU"
    if gpu_memory_mb is None:
        return DEFAULT_GPU_SHARE, f"GPU memory unknown; {MAX_TRIALS_PER_GPU} trials per GPU"
    share = share_for_memory(gpu_memory_mb)
    return share, (f"{round(1 / share)} trial(s) per GPU: {gpu_memory_mb:,.0f} MB of GPU memory, "
                   f"~{TRIAL_FOOTPRINT_MB:,.0f} MB a trial, at most {MAX_TRIALS_PER_GPU}")


def gpu_memory_here(gpu_ids: list[Any]) -> float | None:
    """Total memory in MB of the first of `gpu_ids` (Ray's ids on this node), from nvidia-smi; None if unreadable.

    nvidia-smi, not torch: no CUDA context is made, and the probe's worker starts in a second."""
    if not gpu_ids:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(gpu_ids[0]), "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None  # no nvidia-smi (a CPU node declaring GPUs), or an answer not understood


def _probe() -> float | None:
    import ray

    return gpu_memory_here(ray.get_gpu_ids())


def probe_gpu_memory_mb(timeout: float = GPU_PROBE_TIMEOUT_S) -> float | None:
    """The memory of a GPU of the connected Ray cluster, read by a task given a sliver of one
    (0.0001 GPU, no CPU); None when unknown or not answered within `timeout` s.

    On a cluster of mixed GPUs this is the GPU the task landed on: pass --gpus-per-trial there."""
    import ray

    ref = ray.remote(num_cpus=0, num_gpus=0.0001)(_probe).remote()
    try:
        return ray.get(ref, timeout=timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        ray.cancel(ref, force=True)
        return None

