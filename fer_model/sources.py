"""FER2013 in every form users have it, decoded into uint8 arrays (no cache: that is `fer_model.cache`).

Sources (`read_source`):
  * the Kaggle ``msambare/fer2013`` layout ``train/<class>/*.jpg`` + ``test/<class>/*.jpg``,
    as a folder, a ``.zip`` or a ``.tar.gz``/``.tgz``/``.tar``;
  * the original ``fer2013.csv`` (``emotion,pixels,Usage``), optionally gzipped;
  * the challenge file ``icml_face_data.csv`` (header ``emotion, Usage, pixels``).

Where the data is (`resolve_source`): the given path, $FER2013_DATA, ./data/fer2013, else a kagglehub
download. Labels follow the CSV numbering (`CLASS_NAMES`); class folders map by name, never by position.
Each image keeps which part of the original split it came from (`TRAINING`, `PUBLIC_TEST`,
`PRIVATE_TEST`, or `TEST_UNKNOWN_HALF` for a test image whose file name does not say).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np

from fer_model.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fer_model.errors import DataError, first_line

log = logging.getLogger(__name__)

PIXELS = IMAGE_SIZE * IMAGE_SIZE

# Where each image came from in the original FER2013 split.
TRAINING, PUBLIC_TEST, PRIVATE_TEST, TEST_UNKNOWN_HALF = 0, 1, 2, 3
_USAGE_BY_NAME = {"training": TRAINING, "publictest": PUBLIC_TEST, "privatetest": PRIVATE_TEST}

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
_CSV_NAMES = ("fer2013.csv", "icml_face_data.csv", "fer2013.csv.gz", "icml_face_data.csv.gz")
# Bump when decoding changes, so caches written by older code are not served.
_READER_VERSION = "1"
_KAGGLE_DATASET = "msambare/fer2013"
DEFAULT_LOCAL_PATH = Path("data/fer2013")

EXPECTED_LAYOUT = (
    "expected train/<class>/*.jpg and test/<class>/*.jpg with the class folders "
    f"{', '.join(CLASS_NAMES)} (a folder, .zip or .tar.gz), or fer2013.csv / icml_face_data.csv"
)


@dataclass
class RawDataset:
    """A decoded source before splitting: images (N, 48, 48) uint8, labels, usage codes."""

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    notes: tuple[str, ...] = ()  # warnings raised while decoding, replayed on cache hits


def resolve_source(path: str | os.PathLike | None = None) -> Path:
    """Where the data is: `path`, else $FER2013_DATA, else ./data/fer2013, else a Kaggle download."""
    for given, origin in ((path, "--data"), (os.environ.get("FER2013_DATA"), "FER2013_DATA")):
        if given:
            p = Path(given).expanduser()
            if not p.exists():
                raise DataError(f"data path {str(p)!r} (from {origin}) does not exist")
            return p
    if DEFAULT_LOCAL_PATH.exists():
        return DEFAULT_LOCAL_PATH.resolve()
    try:
        import kagglehub  # imported lazily: only this last resort needs it

        return Path(kagglehub.dataset_download(_KAGGLE_DATASET))
    except Exception as exc:  # noqa: BLE001 - any failure here means "no data found"
        raise DataError(
            "FER2013 not found: pass --data PATH (folder, .zip, .tar.gz or .csv), set FER2013_DATA, "
            f"put it in ./{DEFAULT_LOCAL_PATH}, or allow the kagglehub download of {_KAGGLE_DATASET} "
            f"(it failed: {type(exc).__name__}: {first_line(exc)})"
        ) from None


def fingerprint_source(source: Path) -> str:
    """sha256 over a file's bytes, or over a folder's (path, size, mtime) listing."""
    h = hashlib.sha256(f"reader-{_READER_VERSION}".encode())
    if source.is_dir():
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                p = Path(root, name)
                st = p.stat()
                h.update(f"{p.relative_to(source).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def read_source(source: str | os.PathLike, progress: bool = True) -> RawDataset:
    """Decode any supported form of FER2013 into a `RawDataset` (no cache).

    A damaged file (truncated archive, bad gzip, not UTF-8) is a DataError naming it.
    """
    source = Path(source)
    try:
        return _read_source(source, progress)
    except DataError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {str(source)!r}: {type(exc).__name__}: {first_line(exc)}") from None


def _read_source(source: Path, progress: bool) -> RawDataset:
    name = source.name.lower()
    if source.is_dir():
        for csv_name in _CSV_NAMES:
            if (source / csv_name).is_file():
                return read_csv(source / csv_name, progress=progress)
        return _read_image_tree(_folder_entries(source), _count_folder(source), str(source), progress)
    if name.endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            entries = ((i.filename, (lambda i=i: zf.read(i))) for i in infos)
            return _read_image_tree(entries, len(infos), str(source), progress)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _read_image_tree(_tar_entries(source), _count_tar(source), str(source), progress)
    if name.endswith((".csv", ".csv.gz")):
        return read_csv(source, progress=progress)
    raise DataError(f"cannot read {str(source)!r}: {EXPECTED_LAYOUT}")


def read_csv(path: str | os.PathLike, progress: bool = True) -> RawDataset:
    """Read fer2013.csv or icml_face_data.csv (header names may carry spaces; gzip allowed)."""
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    images, labels, usage = [], [], []
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = {"emotion", "pixels", "usage"} - set(header)
        if missing:
            raise DataError(f"{path}: header {header} lacks column(s) {', '.join(sorted(missing))}")
        i_emotion, i_pixels, i_usage = header.index("emotion"), header.index("pixels"), header.index("usage")
        for row in _progress(reader, None, f"reading {path.name}", progress):
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
            try:
                label = int(row[i_emotion])
            except ValueError:
                raise DataError(f"{path}:{line}: emotion {row[i_emotion]!r} is not an integer") from None
            if not 0 <= label < NUM_CLASSES:
                raise DataError(f"{path}:{line}: emotion {label} is outside 0..{NUM_CLASSES - 1}")
            use = _USAGE_BY_NAME.get(row[i_usage].strip().lower())
            if use is None:
                raise DataError(f"{path}:{line}: Usage {row[i_usage]!r} is not Training, PublicTest or PrivateTest")
            parts = row[i_pixels].split()
            if len(parts) != PIXELS:
                raise DataError(f"{path}:{line}: expected {PIXELS} pixel values, got {len(parts)}")
            try:
                pixels = np.array([int(p) for p in parts], dtype=np.int32)
            except ValueError:
                bad = next(p for p in parts if not p.lstrip("-").isdigit())
                raise DataError(f"{path}:{line}: pixel value {bad!r} is not an integer") from None
            if pixels.min() < 0 or pixels.max() > 255:
                raise DataError(f"{path}:{line}: pixel values must be within 0..255")
            images.append(pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
            labels.append(label)
            usage.append(use)
    if not images:
        raise DataError(f"{path}: no data rows")
    return RawDataset(np.stack(images), np.array(labels, dtype=np.int64), np.array(usage, dtype=np.int8))


# --------------------------------------------------------------------------- image trees


def _folder_entries(root: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath, name)
            yield p.relative_to(root).as_posix(), p.read_bytes


def _count_folder(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def _count_tar(path: Path) -> int:
    # A cheap first pass (gzip at ~0.3 s for the 46 MB archive) so the progress bar has a total.
    with tarfile.open(path, "r:*") as tf:
        return sum(1 for m in tf if m.isfile())


def _tar_entries(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    # Streaming mode ("r|*"): members are read in order, never seeking back through the gzip.
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            if member.isfile():
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                yield member.name, (lambda data=data: data)


def _place(name: str) -> tuple[int, int] | None:
    """(label, usage) for an image at ``.../{train,test}/<class>/<file>``; None for non-images."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[-1].startswith(".") or PurePosixPath(name).suffix.lower() not in _IMAGE_SUFFIXES:
        return None
    split, cls, fname = parts[-3].lower(), parts[-2].lower(), parts[-1]
    if split not in ("train", "test"):
        return None
    if cls not in CLASS_NAMES:
        raise DataError(f"unknown class folder {parts[-2]!r} in {split}/ ({name}): {EXPECTED_LAYOUT}")
    if split == "train":
        usage = TRAINING
    else:
        prefix = fname.split("_", 1)[0].lower()
        usage = _USAGE_BY_NAME.get(prefix, TEST_UNKNOWN_HALF)
        usage = TEST_UNKNOWN_HALF if usage == TRAINING else usage
    return CLASS_NAMES.index(cls), usage


def _read_image_tree(
    entries: Iterable[tuple[str, Callable[[], bytes]]], total: int, source: str, progress: bool
) -> RawDataset:
    # Not at the top: fer_model.inputs imports torch (1.4 s here); a CSV source, `python -m fer_model.data` and
    # tuning.predict's --help do without it.
    from fer_model.inputs import ImageError, is_gray48, open_image, to_gray48

    images, labels, usage = [], [], []
    corrupt: list[str] = []
    converted: list[str] = []
    seen: dict[int, set[int]] = {TRAINING: set(), 1: set()}
    for name, read in _progress(entries, total, "decoding FER2013", progress):
        place = _place(name)
        if place is None:
            continue
        label, use = place
        seen[TRAINING if use == TRAINING else 1].add(label)
        try:
            image = open_image(read())
        except ImageError:
            corrupt.append(name)
            continue
        if not is_gray48(image):
            converted.append(name)
        arr = to_gray48(image)
        images.append(arr)
        labels.append(label)
        usage.append(use)
    for split, key in (("train", TRAINING), ("test", 1)):
        missing = [c for i, c in enumerate(CLASS_NAMES) if i not in seen[key]]
        if missing:
            raise DataError(f"{source}: no {split}/ images for class(es) {', '.join(missing)}; {EXPECTED_LAYOUT}")
    notes = []
    if corrupt:
        notes.append(f"skipped {len(corrupt)} unreadable image(s) in {source}: {', '.join(corrupt[:5])}"
                     + (" ..." if len(corrupt) > 5 else ""))
    if converted:
        notes.append(f"converted {len(converted)} image(s) that were not 48x48 grayscale in {source}: "
                     f"{', '.join(converted[:5])}" + (" ..." if len(converted) > 5 else ""))
    for note in notes:
        log.warning("%s", note)
    return RawDataset(np.stack(images), np.array(labels, dtype=np.int64), np.array(usage, dtype=np.int8), tuple(notes))


def _progress(it: Iterable, total: int | None, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in logs and CI.
    return tqdm(it, total=total, desc=desc, unit="img", disable=None, mininterval=0.5)


__all__ = [
    "TRAINING", "PUBLIC_TEST", "PRIVATE_TEST", "TEST_UNKNOWN_HALF", "EXPECTED_LAYOUT", "DEFAULT_LOCAL_PATH",
    "RawDataset", "resolve_source", "fingerprint_source", "read_source", "read_csv",
]
