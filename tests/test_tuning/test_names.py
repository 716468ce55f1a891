"""`tuning.names`: the stored strings of `Outcome` and `RunStatus`, and how runs are named."""

from __future__ import annotations

import json
import time

import pytest

from tuning import names as N
from tuning.names import Outcome, RunStatus, config_name, final_run_name, stage_run_name, value_text

# What the stores hold: tag `outcome` on trial and final runs, MLflow's run status. Runs written by an
# earlier version carry these very strings, so they must never change.
STORED_OUTCOMES = {"COMPLETED": "completed", "DIVERGED": "diverged", "STOPPED_EARLY": "stopped_early",
                   "ERROR": "error", "DRIVER_LOST": "driver_lost"}
STORED_STATUSES = {"RUNNING": "RUNNING", "FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED"}


@pytest.mark.parametrize("enum, stored", [(Outcome, STORED_OUTCOMES), (RunStatus, STORED_STATUSES)],
                         ids=["Outcome", "RunStatus"])
def test_members_are_the_stored_strings_and_compare_equal_to_them(enum, stored):
    assert {m.name: m.value for m in enum} == stored
    for name, value in stored.items():
        member = enum[name]
        assert member == value and value == member and member != value.swapcase()
        assert enum(value) is member  # a tag read back from the store is the member
        assert isinstance(member, str) and hash(member) == hash(value)
        assert {value: 1}[member] == 1 and {member: 1}[value] == 1  # dict keys mix freely
        # What MLflow and a log see: the value, never "Outcome.COMPLETED".
        assert str(member) == f"{member}" == "{}".format(member) == "%s" % member == value
        assert json.dumps({"outcome": member}) == json.dumps({"outcome": value})
    with pytest.raises(ValueError):
        enum("no such value")


def test_run_status_spells_mlflows_statuses():
    from mlflow.entities import RunStatus as MlflowRunStatus

    for status in RunStatus:
        assert MlflowRunStatus.to_string(MlflowRunStatus.from_string(status)) == status
    assert set(N.UNFINISHED) == {"RUNNING", "KILLED", "FAILED"} and "FINISHED" not in N.UNFINISHED


@pytest.mark.parametrize("key, value, text", [
    ("lr", 1e-3, "1e-3"),
    ("lr", 3.2e-4, "3.2e-4"),
    ("lr", 0.01, "1e-2"),
    ("lr", 2.5e-2, "2.5e-2"),
    ("lr", 1.0, "1e0"),
    ("weight_decay", 1e-6, "1e-6"),
    ("weight_decay", 0.0, "0"),
    ("dropout", 0.41234, "0.41"),  # two significant digits
    ("dropout", 0.3, "0.3"),
    ("dropout", 0.5, "0.5"),
    ("width", 0.25, "0.25"),
    ("batch_size", 64, "64"),  # not floats: as they are
    ("flip", True, "True"),
    ("optimizer", "adamw", "adamw"),
    ("lr", None, "None"),
])
def test_value_text(key, value, text):
    assert value_text(key, value) == text


def test_config_name_shortens_known_keys_in_the_order_given():
    assert config_name({"dropout": 0.3, "lr": 1e-3}, ["dropout", "lr"]) == "d0.3 lr1e-3"
    assert config_name({"dropout": 0.3, "lr": 1e-3}, ["lr", "dropout"]) == "lr1e-3 d0.3"
    searched = {"optimizer": "adamw", "batch_size": 64, "lr": 3.2e-4, "dropout": 0.4123, "weight_decay": 1e-5}
    assert config_name(searched, ["optimizer", "batch_size", "lr", "dropout"]) == "adamw b64 lr3.2e-4 d0.41"
    assert config_name(searched, ["weight_decay"]) == "wd1e-5"
    assert config_name({"arch": "resnet", "width": 0.5, "depth": 2}, ["arch", "width", "depth"]) == "resnet w0.5 depth2"
    assert config_name({"momentum": 0.9}, ["momentum"]) == "momentum=0.9"  # a key without a short name
    assert config_name({"dropout": 0.3}, []) == ""


def test_stage_run_name_says_stage_start_and_trials():
    when = time.mktime((2025, 5, 1, 14, 3, 27, 0, 0, -1))  # local time, as the name shows it
    assert stage_run_name(N.STAGE_GRID, 9, when) == "grid 2025-05-01 14:03 (9 trials)"
    assert stage_run_name(N.STAGE_SEARCH, 1, when) == "search 2025-05-01 14:03 (1 trial)"
    assert stage_run_name(N.STAGE_SEARCH, 0, when) == "search 2025-05-01 14:03 (0 trials)"
    before, name, after = time.time(), stage_run_name(N.STAGE_GRID, 2), time.time()  # default: now
    assert name in {f"grid {time.strftime('%Y-%m-%d %H:%M', time.localtime(t))} (2 trials)" for t in (before, after)}


def test_final_run_name_is_the_configuration_it_retrains():
    config = {"optimizer": "sgd", "batch_size": 128, "lr": 2.5e-2, "dropout": 0.45, "epochs": 1, "arch": "vgg"}
    assert final_run_name(config) == "final sgd b128 lr2.5e-2 d0.45 (1 epoch)"
    assert final_run_name({**config, "epochs": 30}) == "final sgd b128 lr2.5e-2 d0.45 (30 epochs)"
