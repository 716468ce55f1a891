"""FER2013 in every form users have it, decoded once into cached uint8 arrays, then split.

Sources (`read_source`):
  * the Kaggle ``msambare/fer2013`` layout ``train/<class>/*.jpg`` + ``test/<class>/*.jpg``,
    as a folder, a ``.zip`` or a ``.tar.gz``/``.tgz``/``.tar``;
  * the original ``fer2013.csv`` (``emotion,pixels,Usage``), optionally gzipped;
  * the challenge file ``icml_face_data.csv`` (header ``emotion, Usage, pixels``).

Labels follow the CSV numbering (`CLASS_NAMES`); class folders map by name, never by position.
Splits (`split_dataset`): train = Training minus a stratified, seeded validation fraction;
test = PublicTest + PrivateTest (7,178 images), each image keeping which half it came from.

The cache (`read_cached`) keeps at most `DataConfig.cache_max` decoded sources, least recently used
dropped first; ``python -m fer_model.data --cache-info`` lists it, ``--cache-clear`` empties it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import re
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from fer_model.cli import Parser, run_cli
from fer_model.config import CLASS_NAMES, DEFAULT_CACHE_MAX, IMAGE_SIZE, NUM_CLASSES, DataConfig
from fer_model.errors import DataError, first_line

if TYPE_CHECKING:  # torch is imported where used: the cache commands answer without loading it (~3 s)
    import torch

log = logging.getLogger(__name__)

PIXELS = IMAGE_SIZE * IMAGE_SIZE

# Where each image came from in the original FER2013 split.
TRAINING, PUBLIC_TEST, PRIVATE_TEST, TEST_UNKNOWN_HALF = 0, 1, 2, 3
_USAGE_BY_NAME = {"training": TRAINING, "publictest": PUBLIC_TEST, "privatetest": PRIVATE_TEST}

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
_CSV_NAMES = ("fer2013.csv", "icml_face_data.csv", "fer2013.csv.gz", "icml_face_data.csv.gz")
# Bump when decoding changes, so caches written by older code are not served.
_READER_VERSION = "1"
# Bump when the arrays stored in a cache entry change: entries of another format are rewritten.
_CACHE_FORMAT = 2
_ENTRY_ARRAYS = ("images", "labels", "usage", "notes", "fingerprint", "format")
_ENTRY_NAME = re.compile(r"fer2013-[0-9a-f]{32}\.npz")  # only these are ever pruned or cleared
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


def default_cache_dir() -> Path:
    """The decoded-data cache: $FER2013_CACHE, else ~/.cache/fer2013."""
    return Path(os.environ.get("FER2013_CACHE") or Path.home() / ".cache" / "fer2013")


def cache_entry_path(cache_dir: str | os.PathLike, fingerprint: str) -> Path:
    """The cache entry of the source with this fingerprint."""
    return Path(cache_dir) / f"fer2013-{fingerprint[:32]}.npz"


def read_cached(
    source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True,
    cache_max: int = DEFAULT_CACHE_MAX,
) -> tuple[RawDataset, str]:
    """`read_source`, memoised on disk under a fingerprint of the source's content.

    A changed source gets a new fingerprint and so a new cache entry: a stale cache is never served.
    An entry that is unreadable, or readable but not what its name promises (arrays missing or
    mis-shaped, another fingerprint or format), is discarded with a warning and written again.
    After a new entry is written, the least recently used beyond `cache_max` are deleted; a hit
    marks its entry used (its mtime).
    """
    source = Path(source)
    try:
        fingerprint = fingerprint_source(source)
    except OSError as exc:
        raise DataError(f"cannot read {str(source)!r}: {exc.strerror or exc}") from None
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache_entry_path(cache, fingerprint)
    discard = False
    try:
        raw = _read_entry(entry, fingerprint)
    except FileNotFoundError:  # a miss (or pruned by another process just now)
        pass
    except _BadEntry as exc:
        log.warning("cache entry %s is invalid (%s); decoding the source again", entry, exc)
        discard = True
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        log.warning("cache entry %s is unreadable; decoding the source again", entry)
        discard = True
    else:
        try:
            os.utime(entry)  # "last used", for pruning; a read-only cache is still served
        except OSError:
            pass
        for note in raw.notes:
            log.warning("%s", note)
        return raw, fingerprint
    raw = read_source(source, progress=progress)
    # A source without test images fails in `split_dataset` naming the source; caching it would
    # only make every later load warn about an invalid entry first.
    if _content_problem(raw) is None:
        _write_entry(cache, entry, raw, fingerprint)
        _prune(cache, cache_max, keep=entry)
    elif discard:
        try:
            entry.unlink()
        except OSError:
            pass
    return raw, fingerprint


class _BadEntry(Exception):
    """A cache entry that reads but is not what its name promises; the message says what is wrong."""


def _read_entry(entry: Path, fingerprint: str) -> RawDataset:
    """The data of a cache entry, checked against the fingerprint it was looked up by."""
    z = np.load(entry, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _BadEntry("a single array, not an .npz archive")
    with z:
        missing = [name for name in _ENTRY_ARRAYS if name not in z.files]
        if missing:
            raise _BadEntry(f"missing array(s) {', '.join(missing)}")
        fmt, stored = z["format"], z["fingerprint"]
        if fmt.shape != () or str(fmt.item()) != str(_CACHE_FORMAT):
            raise _BadEntry(f"format {fmt.tolist()!r}, expected {_CACHE_FORMAT}")
        if stored.shape != () or str(stored.item()) != fingerprint:
            raise _BadEntry(f"stored fingerprint {str(stored.tolist())[:16]}... is not {fingerprint[:16]}...")
        notes = z["notes"]
        if notes.ndim != 1 or notes.dtype.kind != "U":
            raise _BadEntry(f"notes are {notes.dtype} {notes.shape}, expected strings (k,)")
        raw = RawDataset(z["images"], z["labels"], z["usage"], tuple(str(n) for n in notes))
    problem = _content_problem(raw)
    if problem:
        raise _BadEntry(problem)
    return raw


def _content_problem(raw: RawDataset) -> str | None:
    """What makes `raw` unusable as decoded FER2013, or None."""
    images = raw.images
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        return f"images are {images.dtype} {images.shape}, expected uint8 (n, {IMAGE_SIZE}, {IMAGE_SIZE})"
    n = len(images)
    for name, arr, top in (("labels", raw.labels, NUM_CLASSES - 1), ("usage", raw.usage, TEST_UNKNOWN_HALF)):
        if arr.shape != (n,) or arr.dtype.kind not in "iu":
            return f"{name} are {arr.dtype} {arr.shape}, expected integers ({n},) for {n} images"
        if n and (arr.min() < 0 or arr.max() > top):
            return f"{name} outside 0..{top}"
    if not (raw.usage != TRAINING).any():
        return "no test images"
    return None


def _write_entry(cache: Path, entry: Path, raw: RawDataset, fingerprint: str) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: concurrent loaders never see half a file.
        tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=raw.images, labels=raw.labels, usage=raw.usage, notes=np.array(raw.notes, dtype=str),
                 fingerprint=np.array(fingerprint), format=np.array(_CACHE_FORMAT))
        os.replace(tmp, entry)
    except OSError as exc:  # the data is decoded: a cache we cannot write only costs the next load
        log.warning("cannot write the data cache in %s (%s); the next load decodes again", cache, exc.strerror or exc)


def _entries(cache: Path) -> list[tuple[Path, os.stat_result]]:
    """The cache entries in `cache` with their stat, most recently used first."""
    found = []
    try:
        names = sorted(os.listdir(cache))
    except FileNotFoundError:
        return []
    for name in names:
        if _ENTRY_NAME.fullmatch(name):
            path = cache / name
            try:
                st = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            if path.is_file():
                found.append((path, st))
    return sorted(found, key=lambda e: -e[1].st_mtime_ns)


def _prune(cache: Path, cache_max: int, keep: Path) -> None:
    """Delete the least recently used entries beyond `cache_max`, never `keep` (the one just written)."""
    others = [(p, st) for p, st in _entries(cache) if p != keep]
    stale = others[max(cache_max - 1, 0):]
    removed = freed = 0
    for path, st in stale:
        try:
            path.unlink()
        except FileNotFoundError:  # another process pruned it first
            continue
        except OSError as exc:  # a shared, read-only cache: keep going, it only costs disk
            log.warning("cannot remove old cache entry %s (%s)", path, exc.strerror or exc)
            continue
        removed, freed = removed + 1, freed + st.st_size
    if removed:
        log.info("data cache: removed %d least recently used entr%s (%.1f MB) to keep %d",
                 removed, "y" if removed == 1 else "ies", freed / 1e6, cache_max)


@dataclass(frozen=True)
class CacheEntry:
    """One decoded source in the cache. Counts are None where the entry cannot be read."""

    path: Path
    size: int  # bytes
    last_used: float  # mtime, seconds since the epoch
    images: int | None
    test_images: int | None

    @property
    def size_mb(self) -> float:
        return self.size / 1e6


def cache_info(cache_dir: str | os.PathLike | None = None) -> list[CacheEntry]:
    """The entries of the cache (default `default_cache_dir()`), most recently used first."""
    cache = _cache_folder(cache_dir)
    result = []
    for path, st in _entries(cache):
        images = test = None
        try:  # only the usage codes (1 byte an image): cheap even for the full set
            with np.load(path, allow_pickle=False) as z:
                usage = z["usage"]
            if usage.ndim == 1:
                images, test = len(usage), int((usage != TRAINING).sum())
        except (OSError, ValueError, KeyError, EOFError, AttributeError, TypeError, zipfile.BadZipFile):
            pass
        result.append(CacheEntry(path, st.st_size, st.st_mtime, images, test))
    return result


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every cache entry (nothing else in the folder); the bytes freed."""
    cache = _cache_folder(cache_dir)
    freed = 0
    for path, st in _entries(cache):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DataError(f"cannot delete {path}: {exc.strerror or exc}") from None
        freed += st.st_size
    return freed


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if cache.exists() and not cache.is_dir():
        raise DataError(f"cache folder {str(cache)!r} is not a folder")
    return cache


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


def describe(data: FerData) -> str:
    """One line of split sizes and test halves, for CLIs."""
    import torch

    halves = torch.bincount(data.test.usage.long().cpu(), minlength=4).tolist()
    return (f"train {len(data.train)}, val {len(data.val)}, test {len(data.test)} "
            f"(PublicTest {halves[PUBLIC_TEST]}, PrivateTest {halves[PRIVATE_TEST]}) from {data.source}")


__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "IMAGE_SIZE", "DataConfig", "FerData", "Split", "RawDataset",
    "load", "resolve_source", "read_cached", "read_source", "read_csv", "split_dataset",
    "stratified_sample", "fingerprint_source", "describe",
    "CacheEntry", "cache_entry_path", "cache_info", "clear_cache", "default_cache_dir",
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
