"""User-facing errors: entry points turn these into one line on stderr and exit code 2."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Something the user gave (a flag, a file, a server) is wrong; the message says what."""


class DataError(UserError):
    """The dataset is missing, malformed, or laid out in a way we cannot read."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or unknown."""


# A full disk, a quota, a file-size limit, a read-only filesystem: the machine's state, not a bug.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_STORAGE_TEXT = ("database or disk is full", "disk i/o error", "no space left", "file too large",
                 "read-only file system", "attempt to write a readonly database")


def storage_error(exc: BaseException) -> str | None:
    """What storage refused, in one line, when `exc` (or an error it was raised from, as SQLAlchemy
    and MLflow wrap them) is a full disk, a quota, a file-size limit or a read-only filesystem; else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            where = f": {exc.filename}" if exc.filename else ""
            return f"{exc.strerror or first_line(exc)}{where}"
        text = str(exc).lower()
        hit = next((t for t in _STORAGE_TEXT if t in text), None)
        if hit:
            return hit
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty.

    Library errors often carry multi-line messages (tracebacks of a server, SQL); a user sees one line.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
