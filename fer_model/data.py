"""FER2013 loaded for training: found and decoded (`fer_model.sources`), cached (`fer_model.cache`), then split.

Splits (`split_dataset`): train = Training minus a stratified, seeded validation fraction;
test = PublicTest + PrivateTest (7,178 images), each image keeping which half it came from.

``python -m fer_model.data --cache-info`` lists the decoded-data cache, ``--cache-clear`` empties it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fer_model.cache import _cache_folder, _entries, cache_info, clear_cache, default_cache_dir, read_cached
from fer_model.cli import Parser, run_cli
from fer_model.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, DataConfig
from fer_model.errors import DataError
from fer_model.sources import EXPECTED_LAYOUT, PRIVATE_TEST, PUBLIC_TEST, TRAINING, RawDataset, resolve_source

if TYPE_CHECKING:  # torch is imported where used: the cache commands answer without loading it (~3 s)
    import torch


@dataclass
class Split:
    """One split in memory: uint8 images (N, 1, 48, 48), int64 labels, int8 usage codes."""

    images: torch.Tensor
    labels: torch.Tensor
    usage: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> dict[str, int]:
        import torch

        counts = torch.bincount(self.labels.cpu(), minlength=NUM_CLASSES).tolist()
        return dict(zip(CLASS_NAMES, counts))

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device), self.usage.to(device))


@dataclass
class FerData:
    """Train / validation / test splits plus where they came from."""

    train: Split
    val: Split
    test: Split
    source: str
    fingerprint: str

    def to(self, device: torch.device | str) -> "FerData":
        return FerData(self.train.to(device), self.val.to(device), self.test.to(device), self.source, self.fingerprint)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# --------------------------------------------------------------------------- public API


def load(cfg: DataConfig, progress: bool = True) -> FerData:
    """Find, decode (or read from cache) and split FER2013 as `cfg` says."""
    source = resolve_source(cfg.path)
    raw, fingerprint = read_cached(source, cfg.cache_dir, progress=progress, cache_max=cfg.cache_max)
    return split_dataset(raw, cfg, source=str(source), fingerprint=fingerprint)


def split_dataset(raw: RawDataset, cfg: DataConfig, source: str = "", fingerprint: str = "") -> FerData:
    """Train/val/test splits: val is a stratified, seeded fraction of Training; test is the rest.

    With `max_samples`, Training is first cut to a stratified subset of that size and test to the
    same fraction (stratified by class and test half), so quick runs keep every class's share.
    """
    import torch

    rng = np.random.default_rng(cfg.seed)
    train_idx = np.flatnonzero(raw.usage == TRAINING)
    test_idx = np.flatnonzero(raw.usage != TRAINING)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"{source}: needs both training and test images; {EXPECTED_LAYOUT}")
    if cfg.max_samples is not None and cfg.max_samples < len(train_idx):
        fraction = cfg.max_samples / len(train_idx)
        train_idx = train_idx[stratified_sample(raw.labels[train_idx], cfg.max_samples, rng)]
        n_test = max(NUM_CLASSES, round(fraction * len(test_idx)))
        strata = raw.labels[test_idx] * 4 + raw.usage[test_idx]
        test_idx = test_idx[stratified_sample(strata, n_test, rng)]
    n_val = max(1, round(cfg.val_fraction * len(train_idx)))
    val_pos = stratified_sample(raw.labels[train_idx], n_val, rng)
    is_val = np.zeros(len(train_idx), dtype=bool)
    is_val[val_pos] = True

    def make(idx: np.ndarray) -> Split:
        return Split(
            torch.from_numpy(np.ascontiguousarray(raw.images[idx][:, None])),
            torch.from_numpy(raw.labels[idx].astype(np.int64)),
            torch.from_numpy(raw.usage[idx].astype(np.int8)),
        )

    return FerData(make(train_idx[~is_val]), make(train_idx[is_val]), make(test_idx), source, fingerprint)


def stratified_sample(strata: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a size-`n` sample keeping each stratum's share (largest remainder).

    Every stratum gets at least one place when `n` allows, so tiny subsets keep rare classes
    such as Disgust (1.5% of FER2013).
    """
    n = min(n, len(strata))
    values, counts = np.unique(strata, return_counts=True)
    quota = counts * (n / counts.sum())
    take = np.minimum(np.floor(quota).astype(np.int64), counts)
    if n >= len(values):
        take = np.maximum(take, 1)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while take.sum() < n:
        for i in order:
            if take.sum() < n and take[i] < counts[i]:
                take[i] += 1
    while take.sum() > n:
        i = int(np.argmax(take))
        take[i] -= 1
    picks = [rng.choice(np.flatnonzero(strata == v), size=int(t), replace=False) for v, t in zip(values, take)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def describe(data: FerData) -> str:
    """One line of split sizes and test halves, for CLIs."""
    import torch

    halves = torch.bincount(data.test.usage.long().cpu(), minlength=4).tolist()
    return (f"train {len(data.train)}, val {len(data.val)}, test {len(data.test)} "
            f"(PublicTest {halves[PUBLIC_TEST]}, PrivateTest {halves[PRIVATE_TEST]}) from {data.source}")


__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "IMAGE_SIZE", "DataConfig", "FerData", "Split",
    "load", "split_dataset", "stratified_sample", "describe",
]


# --------------------------------------------------------------------------- python -m fer_model.data


def main(argv: Sequence[str] | None = None) -> int:
    """``--cache-info`` or ``--cache-clear`` on the decoded-data cache."""
    p = Parser(prog="python -m fer_model.data", allow_abbrev=False,
               description="Inspect or empty the decoded-FER2013 cache.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cache-info", action="store_true", help="list the cache entries and their total size")
    what.add_argument("--cache-clear", action="store_true", help="delete the cache entries (nothing else in the folder)")
    p.add_argument("--cache-dir", help="the cache folder (default $FER2013_CACHE or ~/.cache/fer2013)")
    args = p.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.cache_clear:
        n = len(_entries(_cache_folder(cache)))
        freed = clear_cache(cache)
        print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {cache}, freed {freed / 1e6:.1f} MB ({freed} bytes)")
        return 0
    entries = cache_info(cache)
    print(f"cache folder: {cache}")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        counts = (f"{e.images} images ({e.images - e.test_images} train, {e.test_images} test)"
                  if e.images is not None and e.test_images is not None else "unreadable")
        print(f"  {e.path.name}  {e.size_mb:8.1f} MB  last used {when}  {counts}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total / 1e6:.1f} MB in all")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
