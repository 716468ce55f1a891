"""User-facing errors: entry points turn these into one line on stderr and exit code 2."""


class UserError(Exception):
    """Something the user gave (a flag, a file, a server) is wrong; the message says what."""


class DataError(UserError):
    """The dataset is missing, malformed, or laid out in a way we cannot read."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or unknown."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty.

    Library errors often carry multi-line messages (tracebacks of a server, SQL); a user sees one line.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
