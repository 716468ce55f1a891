"""Readers, label mapping, splits, cache and every bad-input case of fer_model.data."""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import SHARED_CSV_HEAD, SHARED_TARBALL, requires_shared
from PIL import Image
from synthetic import make_split, write_csv, write_folder, write_targz, write_zip

from fer_model import data as D
from fer_model.errors import ConfigError, DataError


def _sorted(raw: D.RawDataset):
    order = np.lexsort((raw.usage, raw.labels, raw.images.reshape(len(raw.images), -1).sum(1)))
    return raw.images[order], raw.labels[order], raw.usage[order]


@pytest.mark.parametrize("form", ["folder", "zip", "targz", "csv", "icml"])
def test_every_form_reads_the_same_images_labels_and_halves(tmp_path, form):
    images, labels, usage = make_split(per_class_train=3, per_class_test=2)
    folder = write_folder(tmp_path / "f", per_class_train=3, per_class_test=2)
    path = {
        "folder": lambda: folder,
        "zip": lambda: write_zip(tmp_path / "fer.zip", folder),
        "targz": lambda: write_targz(tmp_path / "fer.tar.gz", folder),
        "csv": lambda: write_csv(tmp_path / "fer2013.csv", 3, 2),
        "icml": lambda: write_csv(tmp_path / "icml_face_data.csv", 3, 2, icml=True),
    }[form]()
    raw = D.read_source(path, progress=False)
    expected = D.RawDataset(images, labels, usage.astype(np.int8))
    for got, want in zip(_sorted(raw), _sorted(expected)):
        np.testing.assert_array_equal(got, want)


def test_folders_map_by_name_not_alphabetical_position(tmp_path):
    folder = write_folder(tmp_path / "f", per_class_train=1, per_class_test=1)
    # Kaggle's folders sort angry, disgust, fear, happy, neutral, sad, surprise: position 4 is
    # neutral, but label 4 must be Sad. Rename one folder to upper case: names are case-insensitive.
    (folder / "train" / "sad").rename(folder / "train" / "SAD")
    raw = D.read_source(folder, progress=False)
    sad = raw.images[(raw.labels == 4) & (raw.usage == 0)][0]
    neutral = raw.images[(raw.labels == 6) & (raw.usage == 0)][0]
    assert sad[18:30, 34:46].min() >= 180  # the block synthetic.py draws for class 4 (sad)
    assert neutral[34:46, 34:46].min() >= 180  # and for class 6 (neutral)
    assert D.CLASS_NAMES[4] == "sad" and D.CLASS_NAMES[6] == "neutral"


@requires_shared(SHARED_CSV_HEAD)
def test_genuine_csv_rows():
    raw = D.read_csv(SHARED_CSV_HEAD, progress=False)
    assert raw.images.shape == (1167, 48, 48)
    assert set(raw.usage.tolist()) == {D.TRAINING}
    with gzip.open(SHARED_CSV_HEAD, "rt") as f:
        next(f)
        first = f.readline().split(",")
    assert raw.labels[0] == int(first[0])
    np.testing.assert_array_equal(raw.images[0].reshape(-1), np.array(first[1].split(), dtype=np.uint8))
    assert np.bincount(raw.labels, minlength=7).sum() == 1167


@pytest.mark.parametrize(
    "row, message",
    [
        ("3,1 2 3,Training", "expected 2304 pixel values, got 3"),
        ("3," + " ".join(["7"] * 2303) + " x,Training", "pixel value 'x' is not an integer"),
        ("3," + " ".join(["7"] * 2303) + " 300,Training", "within 0..255"),
        ("9," + " ".join(["7"] * 2304) + ",Training", "emotion 9 is outside"),
        ("3," + " ".join(["7"] * 2304) + ",Validation", "Usage 'Validation'"),
    ],
)
def test_bad_csv_rows_name_their_line(tmp_path, row, message):
    good = write_csv(tmp_path / "fer2013.csv", 1, 1)
    lines = good.read_text().splitlines()
    lines.insert(3, row)  # physical line 4
    good.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"fer2013.csv:4: .*{message[:20]}"):
        D.read_source(good, progress=False)


def test_missing_split_folder_names_the_layout(tmp_path):
    folder = write_folder(tmp_path / "f", 1, 1)
    for p in sorted((folder / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (folder / "test").rmdir()
    with pytest.raises(DataError, match="no test/ images .*expected train/<class>"):
        D.read_source(folder, progress=False)


def test_missing_class_folder_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "f", 1, 1)
    for p in (folder / "train" / "disgust").iterdir():
        p.unlink()
    (folder / "train" / "disgust").rmdir()
    with pytest.raises(DataError, match="no train/ images for class\\(es\\) disgust"):
        D.read_source(folder, progress=False)


def test_unknown_class_folder_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "f", 1, 1)
    (folder / "train" / "contempt").mkdir()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(folder / "train" / "contempt" / "x.png")
    with pytest.raises(DataError, match="unknown class folder 'contempt'"):
        D.read_source(folder, progress=False)


def test_corrupt_and_odd_sized_images_are_skipped_or_converted_with_warnings(tmp_path, caplog):
    folder = write_folder(tmp_path / "f", 2, 1)
    (folder / "train" / "happy" / "Training_bad1.jpg").write_bytes(b"not a jpeg")
    (folder / "train" / "happy" / "Training_bad2.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (96, 64), (200, 10, 10)).save(folder / "train" / "fear" / "Training_big.png")
    with caplog.at_level(logging.WARNING):
        raw = D.read_source(folder, progress=False)
    assert raw.images.shape[0] == 7 * 3 + 1  # 2 train + 1 test per class, plus the converted one
    text = caplog.text
    assert "skipped 2 unreadable image(s)" in text and "Training_bad1.jpg" in text
    assert "converted 1 image(s)" in text and "Training_big.png" in text


def test_cache_is_used_and_never_stale(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "f", 2, 1)
    cache = tmp_path / "cache"
    raw1, fp1 = D.read_cached(folder, cache, progress=False)
    assert len(list(cache.glob("*.npz"))) == 1
    # Second load comes from the cache: reading the source would fail now.
    monkeypatch.setattr(D, "read_source", lambda *a, **k: pytest.fail("decoded again"))
    raw2, fp2 = D.read_cached(folder, cache, progress=False)
    assert fp1 == fp2
    np.testing.assert_array_equal(raw1.images, raw2.images)
    monkeypatch.undo()
    # Change one image: new fingerprint, new decode, new content.
    target = next((folder / "train" / "angry").iterdir())
    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    raw3, fp3 = D.read_cached(folder, cache, progress=False)
    assert fp3 != fp1
    assert (raw3.images == 7).all(axis=(1, 2)).sum() == 1


def test_cache_keeps_cache_max_entries_and_drops_the_least_recently_used(tmp_path):
    cache = tmp_path / "cache"
    sources = [write_csv(tmp_path / f"fer2013-{i}.csv", 1, 1, seed=i) for i in range(5)]
    entries = []
    for i, src in enumerate(sources[:4]):
        _, fp = D.read_cached(src, cache, progress=False, cache_max=4)
        entries.append(D.cache_entry_path(cache, fp))
        os.utime(entries[-1], (1e9 + i, 1e9 + i))  # a clear order whatever the clock's resolution: 0 oldest
    # A hit on source 0 makes it the most recently used: source 1 is now the oldest.
    D.load(D.DataConfig(path=str(sources[0]), cache_dir=str(cache), cache_max=4), progress=False)
    assert entries[0].stat().st_mtime > 1e9 + 3
    data = D.load(D.DataConfig(path=str(sources[4]), cache_dir=str(cache), cache_max=4), progress=False)
    entries.append(D.cache_entry_path(cache, data.fingerprint))
    assert sorted(cache.glob("fer2013-*.npz")) == sorted(entries[:1] + entries[2:])
    # A smaller bound applies at the next write; the entry just written is always kept.
    D.read_cached(sources[1], cache, progress=False, cache_max=1)
    assert list(cache.glob("fer2013-*.npz")) == [entries[1]]


def test_cache_info_and_clear_commands(tmp_path):
    cache = tmp_path / "cache"
    fps = [D.read_cached(write_csv(tmp_path / f"s{i}.csv", 1, 1, seed=i), cache, progress=False)[1] for i in range(2)]
    names = [D.cache_entry_path(cache, fp).name for fp in fps]
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
    good, fp = D.read_cached(src, cache, progress=False)
    entry = D.cache_entry_path(cache, fp)
    with np.load(entry) as z:
        arrays = dict(z)
    spoil(arrays)
    np.savez(entry, **arrays)  # a valid .npz, but not what its name promises

    with caplog.at_level(logging.WARNING, logger="fer_model.data"):
        raw, _ = D.read_cached(src, cache, progress=False)
    assert f"cache entry {entry} is invalid ({problem}" in caplog.text
    for got, want in zip((raw.images, raw.labels, raw.usage), (good.images, good.labels, good.usage)):
        np.testing.assert_array_equal(got, want)
    D.split_dataset(raw, D.DataConfig(), source=str(src))  # what used to fail, blaming the source
    with np.load(entry) as z:
        assert z["images"].shape == good.images.shape and str(z["fingerprint"]) == fp
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fer_model.data"):
        D.read_cached(src, cache, progress=False)
    assert "cache entry" not in caplog.text


def test_split_is_stratified_seeded_and_keeps_halves(tiny_folder):
    raw, _ = D.read_cached(tiny_folder, progress=False)
    a = D.split_dataset(raw, D.DataConfig(val_fraction=0.25, seed=3))
    b = D.split_dataset(raw, D.DataConfig(val_fraction=0.25, seed=3))
    c = D.split_dataset(raw, D.DataConfig(val_fraction=0.25, seed=4))
    assert a.sizes() == {"train": 210, "val": 70, "test": 56}
    assert set(a.val.class_counts().values()) == {10}
    assert (a.val.images == b.val.images).all() and not (a.val.images == c.val.images).all()
    assert a.train.images.shape[1:] == (1, 48, 48) and str(a.train.images.dtype) == "torch.uint8"
    halves = a.test.usage.tolist()
    assert halves.count(D.PUBLIC_TEST) == 28 and halves.count(D.PRIVATE_TEST) == 28


def test_max_samples_is_a_stratified_subset_of_train_and_test(tiny_folder):
    raw, _ = D.read_cached(tiny_folder, progress=False)
    d = D.split_dataset(raw, D.DataConfig(max_samples=70))
    assert len(d.train) + len(d.val) == 70
    assert set((d.train.class_counts()[c] + d.val.class_counts()[c]) for c in D.CLASS_NAMES) == {10}
    assert len(d.test) == 14 and set(d.test.class_counts().values()) == {2}


def test_resolve_source_order(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        D.resolve_source(tmp_path / "nope")
    monkeypatch.setenv("FER2013_DATA", str(tmp_path))
    assert D.resolve_source(None) == tmp_path
    monkeypatch.delenv("FER2013_DATA")
    (tmp_path / "data" / "fer2013").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert D.resolve_source(None) == (tmp_path / "data" / "fer2013").resolve()


def test_bad_data_config():
    with pytest.raises(ConfigError):
        D.DataConfig(val_fraction=1.0)
    with pytest.raises(ConfigError):
        D.DataConfig(max_samples=3)
    with pytest.raises(ConfigError, match="cache_max"):
        D.DataConfig(cache_max=0)


@requires_shared(SHARED_TARBALL)
def test_real_tarball_split_sizes_class_counts_and_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    raw, _ = D.read_cached(SHARED_TARBALL, cache, progress=False)
    usage = raw.usage
    assert (usage == D.TRAINING).sum() == 28709
    assert (usage == D.PUBLIC_TEST).sum() == 3589 and (usage == D.PRIVATE_TEST).sum() == 3589
    # The shared README's table, in CSV label order: angry disgust fear happy sad surprise neutral.
    assert np.bincount(raw.labels[usage == D.TRAINING]).tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    assert np.bincount(raw.labels[usage == D.PUBLIC_TEST]).tolist() == [467, 56, 496, 895, 653, 415, 607]
    assert np.bincount(raw.labels[usage == D.PRIVATE_TEST]).tolist() == [491, 55, 528, 879, 594, 416, 626]
    # The second load is served from the cache (its time is in benchmarks/load_data.py, not here).
    monkeypatch.setattr(D, "read_source", lambda *a, **k: pytest.fail("decoded again"))
    data = D.load(D.DataConfig(path=str(SHARED_TARBALL), cache_dir=str(cache)), progress=False)
    assert len(data.train) + len(data.val) == 28709 and len(data.test) == 7178
    assert len(data.val) == 2871


@pytest.mark.parametrize("name, content", [("fer.zip", b"PK\x03\x04 truncated"), ("fer.tar.gz", b"\x1f\x8b\x08 broken"),
                                           ("fer2013.csv.gz", b"not gzip at all")])
def test_damaged_files_are_one_data_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read .*{name}"):
        D.read_source(tmp_path / name, progress=False)
