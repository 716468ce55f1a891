"""The flags every stage shares, and their validation (all before Ray starts)."""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fer_model.data import DataConfig
from fer_model.errors import ConfigError, DataError, UserError
from fer_model.training import resolve_device
from tuning.names import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME


class TrackingError(UserError):
    """The MLflow tracking server cannot be reached."""


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """Data, resources, cluster, tracking and final-stage flags (grid and search alike)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="FER2013 folder, .zip, .tar.gz or .csv (else $FER2013_DATA, ./data/fer2013, kagglehub)")
    g.add_argument("--max-samples", type=int, help="use a stratified subset of this many Training images (test cut alike)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="stratified share of Training for validation (default 0.1)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the validation split and subsets (default 0)")
    g.add_argument("--cache-dir", help="decoded-data cache (default $FER2013_CACHE or ~/.cache/fer2013)")
    g = p.add_argument_group("resources and cluster")
    g.add_argument("--gpus-per-trial", type=float, help="GPU share per trial (default 0.25 where GPUs exist, else 0)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    g.add_argument("--max-concurrent", type=int, help="at most this many trials at once (default: as resources allow)")
    g.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="join this Ray cluster (default $RAY_ADDRESS, else a local Ray)")
    g.add_argument("--storage", help="where Tune keeps trial results and checkpoints (default ./ray_results; shared path or URI on a cluster)")
    g.add_argument("--storage-shared", action="store_true", help="--storage is a folder every node mounts (NFS), not a local one")
    g = p.add_argument_group("tracking")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    g.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help=f"registered model name (default {DEFAULT_MODEL_NAME})")
    g = p.add_argument_group("final stage")
    g.add_argument("--final-epochs", type=int, help="epochs of the final retrain (default 15)")
    g.add_argument("--no-final", action="store_true", help="stop after the trials: no retrain, no registration")
    g.add_argument("--device", help="device of the final retrain (default cuda if available)")


@dataclass(frozen=True)
class CommonOptions:
    """Validated common flags."""

    data: DataConfig
    tracking_uri: str
    experiment: str
    model_name: str
    address: str | None
    storage: str
    storage_shared: bool
    gpus_per_trial: float | None
    cpus_per_trial: float
    max_concurrent: int | None
    final_epochs: int
    run_final: bool
    device: str | None


def common_options(args: argparse.Namespace, final_epochs_default: int = 15) -> CommonOptions:
    """Validate the common flags: a bad value or an unreachable server raises a UserError."""
    if args.data and not Path(args.data).expanduser().exists():
        raise DataError(f"--data {args.data!r} does not exist")
    data = DataConfig(args.data, args.val_fraction, args.max_samples, args.data_seed, args.cache_dir)
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    final_epochs = args.final_epochs if args.final_epochs is not None else final_epochs_default
    if final_epochs < 1:
        raise ConfigError(f"--final-epochs must be >= 1, got {final_epochs}")
    if not args.experiment.strip():
        raise ConfigError("--experiment must not be empty")
    resolve_device(args.device)  # the final stage runs there: refuse a device this machine lacks now
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    storage = args.storage or str(Path("ray_results").resolve())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return CommonOptions(data, uri, args.experiment, args.model_name, args.address, storage, args.storage_shared, args.gpus_per_trial,
                         args.cpus_per_trial, args.max_concurrent, final_epochs, not args.no_final, args.device)


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    Local stores become absolute: Ray runs trials in other working directories.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if not db.startswith("/"):
            uri = "sqlite:///" + str(Path(db).resolve())
    elif uri.startswith("file:"):
        pass
    elif "://" not in uri:  # a bare folder: MLflow's file store
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
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason})") from None
        return
    if uri.startswith("sqlite:///"):  # creating the file is all it takes: no side effect before Ray starts
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise TrackingError(f"tracking URI {uri}: folder {parent} does not exist")
        return
    # Any other store is opened for real: a database server may be down, and MLflow 3 refuses
    # its file store only when a client opens it.
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - whatever the store raises, the URI is unusable
        raise TrackingError(f"tracking URI {uri} cannot be used: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def apply_preset(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """Fill the flags the user left unset from `preset`: explicit flags win."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
