"""A registered model's images a second on 1 torch thread and on all of them, by images a request, from a
worker thread as MLflow's scoring server calls it (`asyncio.to_thread`): where `ThreadShare.SMALL_BATCH`
(tuning/registry/pyfunc.py) comes from.

    python benchmarks/serve_threads.py --tracking-uri sqlite:///$PWD/mlflow.db --model models:/fer2013-cnn/1

Each cell runs the model's networks (`member_probabilities`, with its test-time augmentation) on random
48x48 images for --seconds after one warm-up call; the ratio is all threads' rate over one thread's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.serving import ints, machine_lines  # noqa: E402
from tuning.serve import DEFAULT_MODEL  # noqa: E402


def images_per_second(members, tta: str, n: int, threads: int, seconds: float) -> float:
    """Images a second of `members` on `n` random images a call, on `threads` torch threads of this thread."""
    import numpy as np
    import torch

    from tuning.registry.pyfunc import member_probabilities

    torch.set_num_threads(threads)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 1, 48, 48), dtype=np.uint8))
    member_probabilities(members, images, tta)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        member_probabilities(members, images, tta)
        calls += 1
    return calls * n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--batch", type=ints, default=[1, 2, 4, 8, 16, 32, 64], help="images a request (default 1,2,4,8,16,32,64)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds a cell (default 2)")
    args = p.parse_args()
    import mlflow
    import mlflow.pyfunc
    import torch

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    print("\n".join(machine_lines()), flush=True)  # the CPU, its bf16 flags and the load: as serving.py prints them
    inner = mlflow.pyfunc.load_model(args.model).unwrap_python_model()
    cores = torch.get_num_threads()
    print(f"model {args.model}: {len(inner.members)} network(s), tta {inner.tta}; all threads: {cores}", flush=True)
    print(f"{'images':>6} {'1 thread img/s':>15} {f'{cores} threads img/s':>17} {'ratio':>6}")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # one worker thread, as the scoring server's
        for n in args.batch:
            one, all_ = (pool.submit(images_per_second, inner.members, inner.tta, n, t, args.seconds).result()
                         for t in (1, cores))
            print(f"{n:>6} {one:>15.1f} {all_:>17.1f} {all_ / one:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
