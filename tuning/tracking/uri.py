"""Tracking URIs: which store a command writes to, and whether it can be used (before Ray starts).

Light on purpose: the commands' flags are checked with it before MLflow is imported (only a store that
is neither sqlite nor HTTP is opened, with MLflow, to be checked).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from fer_model.errors import UserError, first_line

SQLITE = "sqlite:///"


class TrackingError(UserError):
    """The MLflow tracking store cannot be used."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    Local stores become absolute: Ray runs trials in other working directories.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or SQLITE + "mlflow.db"
    db = sqlite_path(uri)
    if db is not None:
        uri = SQLITE + str(db.resolve())
    elif "://" not in uri and not uri.startswith("file:"):  # a bare folder: MLflow's file store
        uri = Path(uri).resolve().as_uri()
    return uri


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """An http(s) server must answer /health, a sqlite file's folder must exist, any other store must open."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered HTTP {r.status} to /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)})") from None
        return
    db = sqlite_path(uri)
    if db is not None:  # creating the file is all it takes: no side effect before Ray starts
        parent = db.parent
        if not parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {parent} does not exist")
        return
    # Any other store is opened for real: a database server may be down, and MLflow 3 refuses
    # its file store only when a client opens it.
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - whatever the store raises, the URI is unusable
        raise TrackingError(f"tracking URI {uri} cannot be used: {first_line(exc)}") from None
