"""Readers, label mapping, where the data is looked for, and every bad-input case of fer_model.sources."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest
from helpers import SHARED_CSV_HEAD, requires_shared
from PIL import Image
from synthetic import make_split, write_csv, write_folder, write_targz, write_zip

from fer_model import sources as S
from fer_model.errors import DataError


def _sorted(raw: S.RawDataset):
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
    raw = S.read_source(path, progress=False)
    expected = S.RawDataset(images, labels, usage.astype(np.int8))
    for got, want in zip(_sorted(raw), _sorted(expected)):
        np.testing.assert_array_equal(got, want)


def test_folders_map_by_name_not_alphabetical_position(tmp_path):
    folder = write_folder(tmp_path / "f", per_class_train=1, per_class_test=1)
    # Kaggle's folders sort angry, disgust, fear, happy, neutral, sad, surprise: position 4 is
    # neutral, but label 4 must be Sad. Rename one folder to upper case: names are case-insensitive.
    (folder / "train" / "sad").rename(folder / "train" / "SAD")
    raw = S.read_source(folder, progress=False)
    sad = raw.images[(raw.labels == 4) & (raw.usage == 0)][0]
    neutral = raw.images[(raw.labels == 6) & (raw.usage == 0)][0]
    assert sad[18:30, 34:46].min() >= 180  # the block synthetic.py draws for class 4 (sad)
    assert neutral[34:46, 34:46].min() >= 180  # and for class 6 (neutral)
    assert S.CLASS_NAMES[4] == "sad" and S.CLASS_NAMES[6] == "neutral"


@requires_shared(SHARED_CSV_HEAD)
def test_genuine_csv_rows():
    raw = S.read_csv(SHARED_CSV_HEAD, progress=False)
    assert raw.images.shape == (1167, 48, 48)
    assert set(raw.usage.tolist()) == {S.TRAINING}
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
        S.read_source(good, progress=False)


def test_missing_split_folder_names_the_layout(tmp_path):
    folder = write_folder(tmp_path / "f", 1, 1)
    for p in sorted((folder / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (folder / "test").rmdir()
    with pytest.raises(DataError, match="no test/ images .*expected train/<class>"):
        S.read_source(folder, progress=False)


def test_missing_class_folder_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "f", 1, 1)
    for p in (folder / "train" / "disgust").iterdir():
        p.unlink()
    (folder / "train" / "disgust").rmdir()
    with pytest.raises(DataError, match="no train/ images for class\\(es\\) disgust"):
        S.read_source(folder, progress=False)


def test_unknown_class_folder_is_an_error(tmp_path):
    folder = write_folder(tmp_path / "f", 1, 1)
    (folder / "train" / "contempt").mkdir()
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(folder / "train" / "contempt" / "x.png")
    with pytest.raises(DataError, match="unknown class folder 'contempt'"):
        S.read_source(folder, progress=False)


def test_corrupt_and_odd_sized_images_are_skipped_or_converted_with_warnings(tmp_path, caplog):
    folder = write_folder(tmp_path / "f", 2, 1)
    (folder / "train" / "happy" / "Training_bad1.jpg").write_bytes(b"not a jpeg")
    (folder / "train" / "happy" / "Training_bad2.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (96, 64), (200, 10, 10)).save(folder / "train" / "fear" / "Training_big.png")
    with caplog.at_level(logging.WARNING):
        raw = S.read_source(folder, progress=False)
    assert raw.images.shape[0] == 7 * 3 + 1  # 2 train + 1 test per class, plus the converted one
    text = caplog.text
    assert "skipped 2 unreadable image(s)" in text and "Training_bad1.jpg" in text
    assert "converted 1 image(s)" in text and "Training_big.png" in text


def test_resolve_source_order(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        S.resolve_source(tmp_path / "nope")
    monkeypatch.setenv("FER2013_DATA", str(tmp_path))
    assert S.resolve_source(None) == tmp_path
    monkeypatch.delenv("FER2013_DATA")
    (tmp_path / "data" / "fer2013").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert S.resolve_source(None) == (tmp_path / "data" / "fer2013").resolve()


@pytest.mark.parametrize("name, content", [("fer.zip", b"PK\x03\x04 truncated"), ("fer.tar.gz", b"\x1f\x8b\x08 broken"),
                                           ("fer2013.csv.gz", b"not gzip at all")])
def test_damaged_files_are_one_data_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read .*{name}"):
        S.read_source(tmp_path / name, progress=False)
