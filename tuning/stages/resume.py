"""`--resume`: find the interrupted stage run, check it can be continued, keep what it started with.

A resumed stage continues its own MLflow run and its own Tune experiment: finished trials are kept,
unfinished ones continue from their last checkpoint. What it started with (epochs, axes, space,
data) cannot change: a flag given again with the same value is accepted, a different value is
refused with both values named, and a flag not given takes the stored value.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from fer_model.errors import ConfigError, UserError
from tuning import names as N
from tuning.stages.context import StageContext, data_params
from tuning.tracking.liveness import driver_alive
from tuning.trials.runner import can_restore


def stage_done(run) -> bool:
    """A stage run with nothing left to do: FINISHED, and (a grid) every stage of its chain too."""
    tags = run.data.tags
    return run.info.status == N.RunStatus.FINISHED and (N.TAG_CHAIN not in tags or N.TAG_CHAIN_DONE in tags)


def check_can_continue(ctx: StageContext, run, what: str) -> str:
    """The Tune path of `run` if it can be resumed here; else a UserError that says why."""
    run_id, tags = run.info.run_id, run.data.tags
    if run.info.status == N.RunStatus.RUNNING and driver_alive(tags):
        raise UserError(f"--resume: {what} run {run_id} is still running "
                        f"(host {tags.get(N.TAG_DRIVER_HOST)}, pid {tags.get(N.TAG_DRIVER_PID)})")
    was_uri = tags.get(N.TAG_TRACKING_URI)
    if was_uri and was_uri != ctx.tracking.uri:  # e.g. `cluster.local down`, `up`: the same store, a new server
        print(f"--resume: {what} run {run_id} was tracked through {was_uri}; it continues through {ctx.tracking.uri}")
    was = run.data.params
    changed = [f"{k} was {was[k]}, now {v}" for k, v in data_params(ctx).items() if k in was and was[k] != str(v)]
    if changed:
        raise ConfigError(f"--resume: the data differs from the interrupted {what}'s ({'; '.join(changed)}); "
                          "pass the same --data, --max-samples, --val-fraction and --data-seed")
    path = tags.get(N.TAG_TUNE_PATH, "")
    # Tune's state is unpickled on restore: only a path under the configured --storage is trusted,
    # never one an MLflow tag alone points at.
    storage = ctx.cluster.storage.rstrip("/") + "/"
    if not path.startswith(storage):
        raise UserError(f"--resume: the Tune state of {what} run {run_id} ({path or 'none recorded'}) is not under "
                        f"--storage {ctx.cluster.storage}; pass the --storage it ran with")
    if run.info.status != N.RunStatus.FINISHED and not can_restore(path):
        raise UserError(f"--resume: the Tune experiment of {what} run {run_id} ({path}) cannot be restored")
    return path


def check_unchanged(run_id: str, started: Mapping[str, Any], asked: Mapping[str, Any], given: Mapping[str, str]) -> None:
    """Refuse flags given with values other than those the run started with.

    `started` and `asked` are nested dicts (a stage's stored inputs, the flags' values); `given`
    maps each flag the user gave to its dotted key in them (``"fixed.epochs"``).
    """
    changed = []
    for flag, key in given.items():
        old, new = _get(started, key), _normal(_get(asked, key))
        if old is _MISSING:
            changed.append(f"{flag}: what it started with was not recorded")
        elif old != new:
            changed.append(f"{flag} was {_show(old)}, now {_show(new)}")
    if changed:
        raise ConfigError(f"--resume: run {run_id} continues with what it started with ({'; '.join(changed)}); "
                          "drop these flags or start a new run")


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


_MISSING = object()


def _get(tree: Mapping[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if node is None:
            return None  # a part that was not there (no search in a chain): "none"
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _normal(value: Any) -> Any:
    """As it reads back from JSON (tuples are lists)."""
    return json.loads(to_json(value)) if value is not _MISSING else value


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)
