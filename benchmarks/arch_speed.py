"""Training speed of each architecture: what an hour of this machine buys in epochs.

Accuracy within a time budget is accuracy per epoch times epochs per hour; this measures the second
factor for the nets `fer_model.model` builds, with the trainer `fit` uses (`throughput.time_ours`:
`train_one_epoch` on uint8 tensors in memory, the default precision and memory format). Images are
random uint8 (speed does not depend on content), so no data is needed. One row per network: parameters,
forward MFLOPs per image, training images per second (best of --repeats, median beside it), and the
minutes one epoch of the full training split (25,838 images) takes at that speed.

    python benchmarks/arch_speed.py                  # the default candidates, batch 64
    python benchmarks/arch_speed.py --images 256 --warmup 64 --repeats 1   # smoke test
    python benchmarks/arch_speed.py --net vgg:width=0.25 --net resnet:width=0.5,depth=1 --augment
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.machine import cpu_flags  # noqa: E402
from benchmarks.throughput import time_ours  # noqa: E402
from fer_model.config import TrainConfig  # noqa: E402
from fer_model.data import Split  # noqa: E402
from fer_model.errors import ConfigError  # noqa: E402
from fer_model.model import build_model, count_parameters, forward_flops  # noqa: E402
from tuning.spaces import load_space  # noqa: E402

FULL_TRAIN = 25_838  # the training split of FER2013 after the 10% validation hold-out
DEFAULT_NETS = ("cnn", "cnn-bn", "vgg:width=0.25", "vgg:width=0.375", "vgg:width=0.5",
                "resnet:width=0.25", "resnet:width=0.5,depth=1", "resnet:width=0.5")
RECIPE = REPO / "benchmarks" / "recipe-vgg-cpu.yaml"  # --augment takes its augmentation from here
AUGMENT_KEYS = ("flip", "translate", "rotate", "scale", "erase")


def parse_net(text: str) -> dict:
    """``vgg:width=0.25,depth=2`` -> {"arch": "vgg", "width": 0.25, "depth": 2}."""
    arch, _, opts = text.partition(":")
    net: dict = {"arch": arch}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--net {text}: options are key=value, got {item!r}")
        net[key] = json.loads(value)
    return net


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", action="append", help="arch[:key=value,...], repeatable (default: "
                   + " ".join(DEFAULT_NETS) + ")")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=1280, help="training images per timed repeat")
    p.add_argument("--warmup", type=int, default=256, help="untimed training images first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--augment", action="store_true", help=f"with the augmentation of {RECIPE.name}")
    args = p.parse_args(argv)
    if min(args.images, args.warmup, args.repeats, args.batch_size) < 1:
        p.error("--images, --warmup, --repeats and --batch-size must be >= 1")
    try:
        nets = [parse_net(n) for n in (args.net or DEFAULT_NETS)]
        augment = {k: v for k, v in load_space(RECIPE).items() if k in AUGMENT_KEYS} if args.augment else {}
        configs = [TrainConfig.from_dict({**n, "optimizer": "adamw", "lr": 2e-3, "batch_size": args.batch_size,
                                          **augment}) for n in nets]
    except (ConfigError, ValueError) as e:
        p.exit(2, f"error: {e}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(" ".join(f"{k}={v}" for k, v in {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device), **cpu_flags(),
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "images": args.images,
        "repeats": args.repeats, "augment": args.augment}.items()), flush=True)

    n = args.images + args.warmup
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8, generator=g),
                  torch.randint(0, 7, (n,), generator=g), torch.zeros(n, dtype=torch.int8))
    print(f"{'net':32s} {'params':>10s} {'MFLOPs':>8s} {'img/s':>7s} {'median':>7s} {'min/epoch':>9s}")
    for text, cfg in zip(args.net or DEFAULT_NETS, configs):
        model = build_model(cfg.model)
        seconds = time_ours(train, cfg, args, device)
        best, median = args.images / min(seconds), args.images / statistics.median(seconds)
        print(f"{text:32s} {count_parameters(model):>10,d} {forward_flops(model) / 1e6:>8.1f} {best:>7.1f} "
              f"{median:>7.1f} {FULL_TRAIN / best / 60:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
