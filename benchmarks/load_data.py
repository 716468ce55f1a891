"""Data loading time: FER2013 decoded from the source (cold) against read back from the cache (warm).

Times, in seconds, on the real tarball and a fresh temporary cache directory:

  read_cached cold   fingerprint + decode every JPEG + write the .npz cache entry;
  read_cached warm   fingerprint + read the cache entry written by the cold load;
  load warm          `fer_model.data.load`: the warm read plus the stratified train/val/test split.

Every timing includes the sha256 fingerprint of the source (what makes a stale cache impossible).

    python benchmarks/load_data.py                 # the real tarball (default --data)
    python benchmarks/load_data.py --data SMALL.tar.gz   # smoke test on any subset with train/ and test/
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from fer_model.cache import read_cached  # noqa: E402
from fer_model.data import DataConfig, load  # noqa: E402

DEFAULT_DATA = os.environ.get("FER2013_DATA") or str(REPO.parent / "shared/data/fer2013/fer2013-msambare.tar.gz")


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)  # no abbreviated flags, like every CLI here
    p.add_argument("--data", default=DEFAULT_DATA, help="FER2013 source (default: %(default)s)")
    args = p.parse_args()

    # A fresh cache directory, so the first read cannot be served by an existing cache entry.
    with tempfile.TemporaryDirectory(prefix="fer2013-cache-") as cache:
        (raw, _), cold = timed(lambda: read_cached(args.data, cache, progress=False))
        _, warm = timed(lambda: read_cached(args.data, cache, progress=False))
        data, load_warm = timed(lambda: load(DataConfig(path=args.data, cache_dir=cache), progress=False))
        cache_mb = sum(f.stat().st_size for f in Path(cache).iterdir()) / 2**20

    print(f"source: {args.data} ({Path(args.data).stat().st_size / 2**20:.1f} MiB), "
          f"{len(raw.labels)} images, cache entry {cache_mb:.1f} MiB")
    print(f"read_cached cold  {cold:8.3f} s  ({len(raw.labels) / cold:,.0f} images/s)")
    print(f"read_cached warm  {warm:8.3f} s")
    print(f"load warm         {load_warm:8.3f} s  ({', '.join(f'{k} {v}' for k, v in data.sizes().items())})")


if __name__ == "__main__":
    main()
