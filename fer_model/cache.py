"""The decoded-data cache: `fer_model.sources.read_source` memoised on disk.

Each decoded source is one ``fer2013-<fingerprint>.npz`` entry in $FER2013_CACHE (default
~/.cache/fer2013), named by a fingerprint of the source's content, so a changed source is never served
stale. The cache (`read_cached`) keeps at most `DataConfig.cache_max` decoded sources, least recently used
dropped first; ``python -m fer_model.data --cache-info`` lists it (`cache_info`), ``--cache-clear``
empties it (`clear_cache`).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_model.config import DEFAULT_CACHE_MAX, IMAGE_SIZE, NUM_CLASSES
from fer_model.errors import DataError
from fer_model.sources import TEST_UNKNOWN_HALF, TRAINING, RawDataset, fingerprint_source, read_source

log = logging.getLogger(__name__)

# Bump when the arrays stored in a cache entry change: entries of another format are rewritten.
_CACHE_FORMAT = 2
_ENTRY_ARRAYS = ("images", "labels", "usage", "notes", "fingerprint", "format")
_ENTRY_NAME = re.compile(r"fer2013-[0-9a-f]{32}\.npz")  # only these are ever pruned or cleared


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


__all__ = ["CacheEntry", "read_cached", "cache_entry_path", "cache_info", "clear_cache", "default_cache_dir"]
