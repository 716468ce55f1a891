"""Splits, the data config, loading the real tarball, and the `python -m fer_model.data` cache commands."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import SHARED_TARBALL, requires_shared
from synthetic import write_csv

from fer_model import cache as C
from fer_model import data as D
from fer_model import sources as S
from fer_model.errors import ConfigError


def test_cache_info_and_clear_commands(tmp_path):
    cache = tmp_path / "cache"
    fps = [C.read_cached(write_csv(tmp_path / f"s{i}.csv", 1, 1, seed=i), cache, progress=False)[1] for i in range(2)]
    names = [C.cache_entry_path(cache, fp).name for fp in fps]
    (cache / "notes.txt").write_text("not the cache's")
    (cache / "fer2013-mine.npz").write_bytes(b"nor this")
    command = [sys.executable, "-m", "fer_model.data"]
    env = {**os.environ, "FER2013_CACHE": str(cache)}

    info = subprocess.run([*command, "--cache-info"], env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert str(cache) in info.stdout and all(name in info.stdout for name in names)
    assert info.stdout.count("14 images (7 train, 7 test)") == 2 and "2 entries" in info.stdout
    assert "notes.txt" not in info.stdout and "fer2013-mine.npz" not in info.stdout

    size = sum((cache / name).stat().st_size for name in names)
    env["FER2013_CACHE"] = str(tmp_path / "elsewhere")  # --cache-dir wins
    clear = subprocess.run([*command, "--cache-clear", "--cache-dir", str(cache)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert clear.returncode == 0, clear.stderr
    assert "removed 2 cache entries" in clear.stdout and f"({size} bytes)" in clear.stdout
    assert sorted(p.name for p in cache.iterdir()) == ["fer2013-mine.npz", "notes.txt"]

    bad = subprocess.run([*command, "--cache-size"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error" in bad.stderr


def test_split_is_stratified_seeded_and_keeps_halves(tiny_folder):
    raw, _ = C.read_cached(tiny_folder, progress=False)
    a = D.split_dataset(raw, D.DataConfig(val_fraction=0.25, seed=3))
    b = D.split_dataset(raw, D.DataConfig(val_fraction=0.25, seed=3))
    c = D.split_dataset(raw, D.DataConfig(val_fraction=0.25, seed=4))
    assert a.sizes() == {"train": 210, "val": 70, "test": 56}
    assert set(a.val.class_counts().values()) == {10}
    assert (a.val.images == b.val.images).all() and not (a.val.images == c.val.images).all()
    assert a.train.images.shape[1:] == (1, 48, 48) and str(a.train.images.dtype) == "torch.uint8"
    halves = a.test.usage.tolist()
    assert halves.count(S.PUBLIC_TEST) == 28 and halves.count(S.PRIVATE_TEST) == 28


def test_max_samples_is_a_stratified_subset_of_train_and_test(tiny_folder):
    raw, _ = C.read_cached(tiny_folder, progress=False)
    d = D.split_dataset(raw, D.DataConfig(max_samples=70))
    assert len(d.train) + len(d.val) == 70
    assert set((d.train.class_counts()[c] + d.val.class_counts()[c]) for c in D.CLASS_NAMES) == {10}
    assert len(d.test) == 14 and set(d.test.class_counts().values()) == {2}


def test_bad_data_config():
    with pytest.raises(ConfigError):
        D.DataConfig(val_fraction=1.0)
    with pytest.raises(ConfigError):
        D.DataConfig(max_samples=3)
    with pytest.raises(ConfigError, match="cache_max"):
        D.DataConfig(cache_max=0)


@requires_shared(SHARED_TARBALL)
@pytest.mark.e2e  # a real process or the real data, seconds each: not in the -m 'not e2e' minute
def test_real_tarball_split_sizes_class_counts_and_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    raw, _ = C.read_cached(SHARED_TARBALL, cache, progress=False)
    usage = raw.usage
    assert (usage == S.TRAINING).sum() == 28709
    assert (usage == S.PUBLIC_TEST).sum() == 3589 and (usage == S.PRIVATE_TEST).sum() == 3589
    # The shared README's table, in CSV label order: angry disgust fear happy sad surprise neutral.
    assert np.bincount(raw.labels[usage == S.TRAINING]).tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    assert np.bincount(raw.labels[usage == S.PUBLIC_TEST]).tolist() == [467, 56, 496, 895, 653, 415, 607]
    assert np.bincount(raw.labels[usage == S.PRIVATE_TEST]).tolist() == [491, 55, 528, 879, 594, 416, 626]
    # The second load is served from the cache (its time is in benchmarks/load_data.py, not here).
    monkeypatch.setattr(C, "read_source", lambda *a, **k: pytest.fail("decoded again"))
    data = D.load(D.DataConfig(path=str(SHARED_TARBALL), cache_dir=str(cache)), progress=False)
    assert len(data.train) + len(data.val) == 28709 and len(data.test) == 7178
    assert len(data.val) == 2871
