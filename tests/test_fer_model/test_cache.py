"""The decoded-data cache of fer_model.cache: served warm, never stale, bounded, and rewritten when wrong."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
from PIL import Image
from synthetic import write_csv, write_folder

from fer_model import cache as C
from fer_model import data as D


def test_cache_is_used_and_never_stale(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "f", 2, 1)
    cache = tmp_path / "cache"
    raw1, fp1 = C.read_cached(folder, cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1
    # Second load comes from the cache: reading the source would fail now.
    monkeypatch.setattr(C, "read_source", lambda *a, **k: pytest.fail("decoded again"))
    raw2, fp2 = C.read_cached(folder, cache, progress=False)
    assert fp1 == fp2
    np.testing.assert_array_equal(raw1.images, raw2.images)
    monkeypatch.undo()
    # Change one image: new fingerprint, new decode, new content.
    target = next((folder / "train" / "angry").iterdir())
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    raw3, fp3 = C.read_cached(folder, cache, progress=False)
    assert fp3 != fp1
    assert (raw3.images == 7).all(axis=(1, 2)).sum() == 1


def test_cache_keeps_cache_max_entries_and_drops_the_least_recently_used(tmp_path):
    cache = tmp_path / "cache"
    sources = [write_csv(tmp_path / f"fer2013-{i}.csv", 1, 1, seed=i) for i in range(5)]
    entries = []
    for i, src in enumerate(sources[:4]):
        _, fp = C.read_cached(src, cache, progress=False, cache_max=4)
        entries.append(C.cache_entry_path(cache, fp))
        os.utime(entries[-1], (1e9 + i, 1e9 + i))  # a clear order whatever the clock's resolution: 0 oldest
    # A hit on source 0 makes it the most recently used: source 1 is now the oldest.
    D.load(D.DataConfig(path=str(sources[0]), cache_dir=str(cache), cache_max=4), progress=False)
    assert entries[0].stat().st_mtime > 1e9 + 3
    data = D.load(D.DataConfig(path=str(sources[4]), cache_dir=str(cache), cache_max=4), progress=False)
    entries.append(C.cache_entry_path(cache, data.fingerprint))
    assert sorted(cache.glob("fer2013-*.npz")) == sorted(entries[:1] + entries[2:])
    # A smaller bound applies at the next write; the entry just written is always kept.
    C.read_cached(sources[1], cache, progress=False, cache_max=1)
    assert list(cache.glob("fer2013-*.npz")) == [entries[1]]


def _wrong_images(a):
    a["images"] = a["images"][:, :24]


def _short_labels(a):
    a["labels"] = a["labels"][:-1]


def _no_test_part(a):
    a["usage"] = np.zeros_like(a["usage"])


def _other_fingerprint(a):
    a["fingerprint"] = np.array("0" * 64)


def _written_by_older_code(a):
    del a["fingerprint"], a["format"]


@pytest.mark.parametrize("spoil, problem", [
    (_wrong_images, "images are uint8 (14, 24, 48), expected uint8 (n, 48, 48)"),
    (_short_labels, "labels are int64 (13,), expected integers (14,)"),
    (_no_test_part, "no test images"),
    (_other_fingerprint, "stored fingerprint 0000000000000000..."),
    (_written_by_older_code, "missing array(s) fingerprint, format"),
], ids=["image-shape", "label-count", "no-test-part", "fingerprint", "older-format"])
def test_a_wrong_cache_entry_is_discarded_and_rewritten(tmp_path, caplog, spoil, problem):
    src = write_csv(tmp_path / "fer2013.csv", 1, 1)
    cache = tmp_path / "cache"
    good, fp = C.read_cached(src, cache, progress=False)
    entry = C.cache_entry_path(cache, fp)
    with np.load(entry) as z:
        arrays = dict(z)
    spoil(arrays)
    np.savez(entry, **arrays)  # a valid .npz, but not what its name promises

    with caplog.at_level(logging.WARNING, logger="fer_model.cache"):
        raw, _ = C.read_cached(src, cache, progress=False)
    assert f"cache entry {entry} is invalid ({problem}" in caplog.text
    for got, want in zip((raw.images, raw.labels, raw.usage), (good.images, good.labels, good.usage)):
        np.testing.assert_array_equal(got, want)
    D.split_dataset(raw, D.DataConfig(), source=str(src))  # what used to fail, blaming the source
    with np.load(entry) as z:
        assert z["images"].shape == good.images.shape and str(z["fingerprint"]) == fp
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fer_model.cache"):
        C.read_cached(src, cache, progress=False)
    assert "cache entry" not in caplog.text
