"""Same model, same answers on every CPU: a registered model's probabilities from `tuning.predict` on real
test images, with bf16 forced on (FER_BF16=on) and forced off (FER_BF16=off), each in its own process as
a user runs it; beside them the same weights under bf16 autocast, what inference did before it was fp32.

    python benchmarks/precision.py --model models:/fer2013-cnn@champion --tracking-uri sqlite:////abs/mlflow.db

Prints the largest difference of any probability between the two runs (goal: at most 1e-5), whether
every label agrees, and the bf16-autocast figures for scale. The images are the first --images of the
test split (PublicTest + PrivateTest), written as PNG files as a user would hold them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.machine import cpu_flags  # noqa: E402

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar line per artifact otherwise
DEFAULT_DATA = os.environ.get("FER2013_DATA") or str(REPO.parent / "shared/data/fer2013/fer2013-msambare.tar.gz")


def predict(files_dir: Path, model: str, tracking_uri: str, mode: str) -> tuple[list[str], np.ndarray]:
    """`python -m tuning.predict DIR --format json --top-k 7` under FER_BF16=`mode`: names and (N, 7) probabilities."""
    from fer_model.config import CLASS_NAMES

    proc = subprocess.run([sys.executable, "-m", "tuning.predict", str(files_dir), "--model", model, "--tracking-uri",
                           tracking_uri, "--format", "json", "--top-k", str(len(CLASS_NAMES))],
                          env={**os.environ, "FER_BF16": mode}, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"tuning.predict (FER_BF16={mode}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(proc.stdout)
    probs = np.array([[dict(r["top"])[c] for c in CLASS_NAMES] for r in rows])
    return [r["input"] for r in rows], probs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="models:/fer2013-cnn@champion")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--images", type=int, default=100)
    args = p.parse_args()

    import mlflow.pyfunc
    import torch
    from PIL import Image

    from fer_model import cache as fcache
    from fer_model import sources as fsources
    from fer_model.inputs import to_input, to_probabilities

    print("machine:", cpu_flags())
    raw, _ = fcache.read_cached(args.data)
    test = np.flatnonzero(np.isin(raw.usage, [fsources.PUBLIC_TEST, fsources.PRIVATE_TEST]))[:args.images]
    with tempfile.TemporaryDirectory() as d:
        for i in test:
            Image.fromarray(raw.images[i]).save(Path(d) / f"{i:05d}.png")
        names_on, on = predict(Path(d), args.model, args.tracking_uri, "on")
        names_off, off = predict(Path(d), args.model, args.tracking_uri, "off")
    assert names_on == names_off and len(on) == len(test)
    diff = np.abs(on - off).max()
    same = (on.argmax(1) == off.argmax(1)).all()
    print(f"{len(test)} real test images through tuning.predict: FER_BF16=on vs off: max |p_on - p_off| = {diff:.3g}, "
          f"labels {'all equal' if same else 'DIFFER'}; sums within {np.abs(on.sum(1) - 1).max():.2g} of 1")

    # For scale: the same weights under bf16 autocast, as inference ran before (CPUs with native bf16 only).
    mlflow.set_tracking_uri(args.tracking_uri)
    members = mlflow.pyfunc.load_model(args.model).unwrap_python_model().members
    images = torch.from_numpy(raw.images[test])[:, None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = np.mean([to_probabilities(net.eval()(to_input(images)).float(), spec.outputs_probabilities).numpy()
                        for net, spec in members], axis=0)
    print(f"bf16 autocast inference of the same weights: max |p_bf16 - p_fp32| = {np.abs(bf16 - off).max():.3g}, "
          f"{int((bf16.argmax(1) != off.argmax(1)).sum())} of {len(test)} labels differ")


if __name__ == "__main__":
    main()
