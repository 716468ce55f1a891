"""Shared command-line plumbing: one-line errors with exit code 2, flags made from the typed configs.

Nothing here imports torch, Ray or MLflow: a command parses (and answers --help or a bad flag)
before anything heavy loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

from fer_model.config import ARCHITECTURES, DEFAULT_ARCH, TrainConfig, model_option_names, option
from fer_model.errors import UserError, storage_error

USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump) and exit code 2, and no flag
    may be abbreviated (``--epoch`` for ``--epochs`` would silently change a run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _flag(parser: argparse._ActionsContainer, name: str, default: Any, help: str) -> None:
    """A ``--name`` flag defaulting to None ("not given"), typed like `default`."""
    flag = "--" + name.replace("_", "-")
    text = f"{help} (default {default})".strip()
    if isinstance(default, bool):
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
    else:
        parser.add_argument(flag, dest=name, type=type(default) if default is not None else str, default=None, help=text)


def add_train_flags(parser: argparse._ActionsContainer, help_for: Mapping[str, str] | None = None,
                    skip: Sequence[str] = ()) -> None:
    """A flag per flat training key: ``--arch``, every architecture's options, every TrainConfig field.

    All default to None, meaning "not given", so presets and stage defaults fill the rest.
    """
    help_for = help_for or {}
    if "arch" not in skip:
        parser.add_argument("--arch", default=None, choices=list(ARCHITECTURES),
                            help=help_for.get("arch", "; ".join(f"{a.name}: {a.description}" for a in ARCHITECTURES.values()))
                            + f" (default {DEFAULT_ARCH})")
    for name in model_option_names():
        if name not in skip:
            opt = option(name)
            archs = [a.name for a in ARCHITECTURES.values() if name in a.options]
            _flag(parser, name, opt.default, f"{help_for.get(name, opt.help)}, {opt.rule} [{', '.join(archs)}]")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model" and f.name not in skip:
            _flag(parser, f.name, getattr(defaults, f.name), help_for.get(f.name, ""))


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among `names` the user actually gave (flags default to None, meaning "not given")."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts` (on the logger that emits them)."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def drop_log_messages(logger: str, *starts: str) -> None:
    """Drop `logger`'s messages that start with one of `starts`; calling again adds nothing.

    A filter on the emitting logger itself: its other messages, warnings included, still show.
    """
    target = logging.getLogger(logger)
    if not any(isinstance(f, DropMessages) and f.starts == starts for f in target.filters):
        target.addFilter(DropMessages(*starts))


def quiet_libraries() -> None:
    """Library chatter off the console: matplotlib's font notices, PIL's plugin list, MLflow's
    progress bars for every model download, and the notices below, each named. Loggers are only
    named here, nothing is imported: this runs before a command parses its flags."""
    import os
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # "View run ... at: http://..." and "View experiment at: ..." for every run closed against a server:
    # 22 of 51 lines of a cluster run's console. The commands print the one link that matters themselves.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # mlflow.store.db.utils: "Creating initial MLflow database tables..." / "Updating database tables"
    # on a new sqlite store; optuna.storages: "A new study created in RDB with name: ..." (the search
    # stage prints the study's name and storage itself).
    for name in ("matplotlib", "PIL", "urllib3", "alembic", "git", "mlflow.store.db.utils", "optuna.storages"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # urllib3's "Retrying (Retry(total=3 ...)) after connection broken" for each retry of each MLflow call
    # against a server that is down: the commands say in one line of their own when a server is gone.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # Saving the registered model (tuning.pyfunc): MLflow's advice to log models from code instead of
    # a Python object is about a design choice made once here (the model's code travels with it as
    # code_paths), not something the user can act on; the input-example check is routine.
    drop_log_messages("mlflow.pyfunc", "Passing a Python object as `python_model`",
                      "Validating input example against model signature")
    # A failed store write (full disk, locked or read-only database): MLflow logs the SQL error with its
    # traceback, then raises it to the caller, which retries or says what failed in one line of its own.
    drop_log_messages("mlflow.store.db.utils", "SQLAlchemy database error")
    # Optuna's plots (search stage) are laid out with tight_layout; some have a colorbar axes it
    # cannot place, and matplotlib says so on every plot. The plot is saved all the same.
    warnings.filterwarnings("ignore", message="This figure includes Axes that are not compatible with tight_layout",
                            category=UserWarning)


# Set when SIGTERM asked this process to stop: code that retries (tracking writes) gives up at once,
# so the stop takes seconds whatever the process waits on. `on_stop` adds what else must happen then.
STOPPING = threading.Event()
_ON_STOP: list[tuple[Callable[[], None], Callable[[], None]]] = []


def on_stop(apply: Callable[[], None], undo: Callable[[], None]) -> None:
    """Run `apply` (in the signal handler) when SIGTERM stops this process; `undo` when the command it
    stopped has returned (`run_cli`), so a process that runs commands in turn (the tests) starts afresh."""
    if all(apply is not a for a, _ in _ON_STOP):
        _ON_STOP.append((apply, undo))


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill`, a scheduler's stop, `timeout`) is handled as Ctrl-C: Ray Tune saves its state,
    runs are marked KILLED and the message says what resumes them, instead of a silent death that
    leaves runs RUNNING until the next command settles them. ray.init replaces it (with a sys.exit
    that aborts the process mid-Tune): `tuning.trials.runner` sets it again after ray.init. It also sets
    `STOPPING` and runs the `on_stop` hooks first."""
    import os
    import signal

    def handler(signum, frame) -> None:
        STOPPING.set()
        for apply, _ in _ON_STOP:
            apply()
        if callable(signal.getsignal(signal.SIGINT)):  # Python's KeyboardInterrupt, or Ray Tune's stop during fit()
            os.kill(os.getpid(), signal.SIGINT)
        else:  # SIGINT ignored (a background job of a non-interactive shell, `cmd &`, starts so): nothing would raise
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
        signal.signal(signal.SIGTERM, handler)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point: user errors become one line and exit 2; Ctrl-C (or SIGTERM) exits 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    sigterm_as_ctrl_c()
    try:
        return _run(main, argv)
    finally:
        if STOPPING.is_set():
            STOPPING.clear()
            for _, undo in _ON_STOP:
                undo()


def _run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None) -> int:
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as exc:
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    except Exception as exc:  # a full disk or a read-only folder is the machine's state: one line, exit 2
        refused = storage_error(exc)
        if refused is None:
            raise
        print(f"error: storage refused a write ({refused}); free space (or fix the folder) and run the command "
              "again (a tuning command: with --resume)", file=sys.stderr)
        return USAGE_ERROR
