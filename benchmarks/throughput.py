"""Training throughput: our tensor-resident trainer against the study notebook's DataLoader loop.

Measures training images per second (forward + backward + Adam step) of the study's CNN
(`build_model(ModelSpec("cnn", {"dropout": 0.3}))`, Adam lr 1e-3, batch 32) in four rows, one after the other in
one process on the same machine:

  reference   the notebook's loop: torchvision ImageFolder over the extracted train/ folder,
              per-image Grayscale(1) + ToTensor, DataLoader(shuffle=True), fp32, channels-first,
              `loss.item()` every step;
  ours-nchw   `fer_model.training.train_one_epoch` on uint8 tensors in memory, with the
              reference's arithmetic (fp32, channels-first): isolates the data pipeline;
  ours-fp32   the same in channels_last memory format: adds the memory-format effect;
  ours        the default TrainConfig: channels_last and bf16 autocast where the hardware
              has it natively (CUDA, or CPUs with AVX512-BF16/AMX): adds the precision effect;
  packed      on a CPU: one `ours` process per core, one thread each, run at once (as Tune packs
              1-CPU trials); the row is their summed images per second.

Each row is timed over --images training images after --warmup untimed ones, --repeats times;
the best repeat is reported (the one least disturbed by other load), the median beside it.

    python benchmarks/throughput.py                         # full run (6400 images, 3 repeats)
    python benchmarks/throughput.py --images 256 --warmup 32 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.machine import cpu_flags  # noqa: E402
from fer_model.data import DataConfig, Split, load  # noqa: E402
from fer_model.model import build_model  # noqa: E402
from fer_model.config import ModelSpec, TrainConfig  # noqa: E402
from fer_model.augment import augmenting  # noqa: E402
from fer_model.training import make_optimizer, train_one_epoch  # noqa: E402

# Training FLOPs per image of the study CNN (multiply-add = 2 FLOP; backward ~ 2x forward):
# forward = conv1 1.3M + conv2 84.9M + conv3 84.9M + fc 4.7M = 176 MFLOP; x3 = 0.53 GFLOP.
GFLOP_PER_IMAGE = 0.53
DROPOUT, LR = 0.3, 1e-3
DEFAULT_DATA = os.environ.get("FER2013_DATA") or str(REPO.parent / "shared/data/fer2013/fer2013-msambare.tar.gz")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract_train(tarball: Path, root: Path) -> Path:
    """The train/ folder of the Kaggle tarball under `root`, extracted once (reused if already there)."""
    train = root / "train"
    if not train.is_dir():
        with tarfile.open(tarball, "r:*") as tf:
            members = [m for m in tf.getmembers() if m.name.split("/", 1)[0] == "train"]
            tf.extractall(root, members=members, filter="data")
    return train


def time_reference(train_dir: Path, args, device: torch.device) -> list[float]:
    """Seconds per repeat of the notebook loop over `args.images` images."""
    from torchvision import datasets, transforms  # only the reference needs torchvision

    # ImageFolder numbers classes alphabetically, unlike our CSV order; irrelevant for speed.
    dataset = datasets.ImageFolder(str(train_dir), transform=transforms.Compose(
        [transforms.Grayscale(1), transforms.ToTensor()]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers)
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", {"dropout": DROPOUT})).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()

    def batches():  # epoch after epoch, a fresh iterator each epoch as the notebook's for-loop
        while True:
            yield from loader

    stream = batches()

    def run(n_images: int) -> float:
        model.train()
        seen, running_loss = 0, 0.0
        sync(device)
        t0 = time.perf_counter()
        while seen < n_images:
            images, labels = next(stream)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()  # the notebook's per-step sync
            seen += labels.shape[0]
        sync(device)
        return (time.perf_counter() - t0) * n_images / seen  # scaled to exactly n_images

    run(args.warmup)
    return [run(args.images) for _ in range(args.repeats)]


def time_ours(train: Split, cfg: TrainConfig, args, device: torch.device) -> list[float]:
    """Seconds per repeat of `train_one_epoch` over `args.images` images, set up as `fit` does."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # schedule "none"
    shuffle = torch.Generator().manual_seed(cfg.seed)
    aug = torch.Generator(device=device).manual_seed(cfg.seed + 1) if augmenting(cfg) else None  # as `fit`

    def subset(n: int) -> Split:  # the first n training images (wrapping round if n is larger)
        idx = torch.arange(n) % len(train)
        return Split(train.images[idx], train.labels[idx], train.usage[idx]).to(device)

    def run(split: Split) -> float:
        sync(device)
        t0 = time.perf_counter()
        train_one_epoch(model, optimizer, scheduler, split, cfg, shuffle, aug)  # ends in .item()
        sync(device)
        return time.perf_counter() - t0

    run(subset(args.warmup))
    timed = subset(args.images)  # moved to the device once, untimed, as `fit` does
    return [run(timed) for _ in range(args.repeats)]


def time_packed(args) -> list[float]:
    """Seconds per repeat for the images of all packed processes together: one `ours` process per core,
    one thread each, started at once; a repeat's images/s is the sum of theirs."""
    import subprocess

    n = os.cpu_count() or 1
    cmd = [sys.executable, __file__, "--only", "ours", "--threads", "1", "--data", args.data, "--images", str(args.images),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    per_proc = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    # Repeat r: n processes each trained args.images images; as one rate, the sum of the rates.
    return [args.images / sum(args.images / s[r] for s in per_proc) for r in range(args.repeats)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # --image must not pass for --images
    p.add_argument("--data", default=DEFAULT_DATA, help="the Kaggle FER2013 .tar.gz (default: %(default)s)")
    p.add_argument("--extract-dir", type=Path, help="where train/ is (or is extracted to); default a temp dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=6400, help="training images per timed repeat")
    p.add_argument("--warmup", type=int, default=320, help="untimed training images before timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="reference DataLoader num_workers (notebook: 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--only", choices=["ours"], help=argparse.SUPPRESS)  # one row, for the packed row's processes
    p.add_argument("--no-packed", action="store_true", help="skip the packed row")
    args = p.parse_args()
    if min(args.images, args.warmup, args.repeats, args.batch_size) < 1:
        p.error("--images, --warmup, --repeats and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           **cpu_flags(), "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "batch_size": args.batch_size,
           "images": args.images, "warmup": args.warmup, "repeats": args.repeats, "workers": args.workers}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    if args.only:  # a process of the packed row: time `ours`, print the seconds per repeat as JSON
        train = load(DataConfig(path=args.data), progress=False).train
        cfg = TrainConfig.from_dict(dict(arch="cnn", dropout=DROPOUT, optimizer="adam", lr=LR, batch_size=args.batch_size))
        print(json.dumps(time_ours(train, cfg, args, device)))
        return
    # Setup (extraction, decoding, the ImageFolder scan) is done before and outside any timing.
    # Without --extract-dir the ~28k extracted files go to a temp dir removed at exit.
    tmp = None if args.extract_dir else tempfile.TemporaryDirectory(prefix="fer2013-imagefolder-")
    try:
        run_rows(args, device, env, extract_train(Path(args.data), args.extract_dir or Path(tmp.name)))
    finally:
        if tmp:
            tmp.cleanup()


def run_rows(args, device: torch.device, env: dict, train_dir: Path) -> None:
    train = load(DataConfig(path=args.data), progress=False).train
    base = dict(arch="cnn", dropout=DROPOUT, optimizer="adam", lr=LR, batch_size=args.batch_size)
    rows = {
        "reference": lambda: time_reference(train_dir, args, device),
        "ours-nchw": lambda: time_ours(train, TrainConfig.from_dict({**base, "channels_last": False, "bf16": False}), args, device),
        "ours-fp32": lambda: time_ours(train, TrainConfig.from_dict({**base, "bf16": False}), args, device),
        "ours": lambda: time_ours(train, TrainConfig.from_dict(base), args, device),
    }
    if device.type == "cpu" and not args.no_packed and (os.cpu_count() or 1) > 1:
        rows["packed"] = lambda: time_packed(args)
    results = []
    for name, measure in rows.items():
        seconds = measure()
        best, median = args.images / min(seconds), args.images / statistics.median(seconds)
        results.append({"row": name, "seconds": seconds, "images_per_s": best, "images_per_s_median": median,
                        "gflop_per_s": best * GFLOP_PER_IMAGE})
    ref = results[0]["images_per_s"]
    print(f"{'row':<10} {'img/s':>9} {'median':>9} {'GFLOP/s':>8} {'vs ref':>7}")
    for r in results:
        r["ratio_vs_reference"] = r["images_per_s"] / ref
        print(f"{r['row']:<10} {r['images_per_s']:9.1f} {r['images_per_s_median']:9.1f} "
              f"{r['gflop_per_s']:8.1f} {r['ratio_vs_reference']:6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "gflop_per_image": GFLOP_PER_IMAGE, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
