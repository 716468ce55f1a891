"""Small, learnable FER2013-shaped data in every on-disk form the readers accept.

Each class is a bright 12x12 block at its own place on a noisy background, so a few epochs of the
real CNN separate them well above chance: a training test that passes has really learnt.
"""

from __future__ import annotations

import csv
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fer_model.data import CLASS_NAMES

# Alphabetical folder order differs from the label numbering on purpose (as in Kaggle's layout).
_BLOCKS = [(2, 2), (2, 18), (2, 34), (18, 2), (18, 34), (34, 2), (34, 34)]


def make_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, size=(len(labels), 48, 48)).astype(np.uint8)
    for i, label in enumerate(labels):
        r, c = _BLOCKS[int(label)]
        images[i, r:r + 12, c:c + 12] = rng.integers(180, 256)
    return images


def make_split(per_class_train: int = 12, per_class_test: int = 4, seed: int = 0):
    """(images, labels, usage) with every class in train and in both test halves."""
    labels, usage = [], []
    for label in range(len(CLASS_NAMES)):
        labels += [label] * per_class_train
        usage += [0] * per_class_train
        labels += [label] * per_class_test
        usage += [1 + (i % 2) for i in range(per_class_test)]  # PublicTest, PrivateTest alternating
    labels_a = np.array(labels)
    return make_images(labels_a, seed), labels_a, np.array(usage)


def _name(usage: int, i: int) -> str:
    return f"{['Training', 'PublicTest', 'PrivateTest'][usage]}_{1000 + i}.png"


def write_folder(root: Path, per_class_train: int = 12, per_class_test: int = 4, seed: int = 0, fmt: str = "png") -> Path:
    images, labels, usage = make_split(per_class_train, per_class_test, seed)
    for i, (img, label, use) in enumerate(zip(images, labels, usage)):
        d = root / ("train" if use == 0 else "test") / CLASS_NAMES[label]
        d.mkdir(parents=True, exist_ok=True)
        name = _name(int(use), i).replace(".png", f".{fmt}")
        Image.fromarray(img, mode="L").save(d / name)
    return root


def write_zip(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return path


def write_targz(path: Path, folder: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for sub in ("train", "test"):
            tf.add(folder / sub, arcname=sub)
    return path


def write_csv(path: Path, per_class_train: int = 12, per_class_test: int = 4, seed: int = 0, icml: bool = False) -> Path:
    images, labels, usage = make_split(per_class_train, per_class_test, seed)
    names = ["Training", "PublicTest", "PrivateTest"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", " Usage", " pixels"] if icml else ["emotion", "pixels", "Usage"])
        for img, label, use in zip(images, labels, usage):
            pixels = " ".join(map(str, img.reshape(-1)))
            w.writerow([label, names[use], pixels] if icml else [label, pixels, names[use]])
    return path


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
