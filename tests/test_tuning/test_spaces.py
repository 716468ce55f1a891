"""`tuning.spaces`: the study's grid, the named search spaces, and space files, accepted or refused in
one ConfigError that names the key at fault (and the file)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from fer_model.config import TrainConfig
from fer_model.errors import ConfigError
from tuning.spaces import (DEFAULT_SEARCH_SPACE, GRID_FIXED, LAPTOP_SEARCH_SPACE, NAMED_SPACES, STRONG_SEARCH_SPACE,
                           STUDY_GRID, STUDY_GRID_TEST_ACC, VGG_CPU_RECIPE, load_space, outside, validate_space)


def test_the_study_grid_is_three_dropouts_by_three_learning_rates_with_the_studys_results():
    assert STUDY_GRID == {"dropout": [0.3, 0.5, 0.7], "lr": [1e-3, 1e-2, 1e-4]}
    assert set(STUDY_GRID_TEST_ACC) == set(itertools.product(STUDY_GRID["dropout"], STUDY_GRID["lr"]))
    assert max(STUDY_GRID_TEST_ACC, key=STUDY_GRID_TEST_ACC.get) == (0.3, 1e-3)
    assert STUDY_GRID_TEST_ACC[(0.3, 1e-3)] == 0.5730 and STUDY_GRID_TEST_ACC[(0.5, 1e-2)] == 0.2471
    assert GRID_FIXED["arch"] == "cnn" and GRID_FIXED["epochs"] == 10
    for dropout, lr in STUDY_GRID_TEST_ACC:  # every cell is a valid configuration of the study's CNN
        cfg = TrainConfig.from_dict({**GRID_FIXED, "dropout": dropout, "lr": lr})
        assert (cfg.model.options["dropout"], cfg.lr, cfg.epochs) == (dropout, lr, 10)


@pytest.mark.parametrize("name", sorted(NAMED_SPACES))
def test_the_named_spaces_are_valid_for_their_trial_length(name):
    named = NAMED_SPACES[name]
    space = validate_space(named.space, named.epochs)
    assert space == named.space and space is not named.space  # a copy: the caller may change it
    assert 1 <= named.grace_period < named.epochs


def test_the_named_spaces_are_the_studys_next_steps_and_the_strong_recipe():
    assert NAMED_SPACES["default"].space is DEFAULT_SEARCH_SPACE and NAMED_SPACES["strong"].space is STRONG_SEARCH_SPACE
    assert set(DEFAULT_SEARCH_SPACE) == {"batch_size", "optimizer", "lr", "dropout", "weight_decay"}
    assert (NAMED_SPACES["default"].epochs, NAMED_SPACES["default"].grace_period) == (15, 2)
    assert (NAMED_SPACES["strong"].epochs, NAMED_SPACES["strong"].grace_period) == (30, 5)
    # The strong space's warm-up fits its trials, not a 1-epoch one.
    with pytest.raises(ConfigError, match="^warmup: value 2 is not allowed"):
        validate_space(STRONG_SEARCH_SPACE, epochs=1)


def test_every_kind_and_a_fixed_value_are_accepted():
    space = {"lr": {"loguniform": [1e-4, 1e-2]}, "dropout": {"uniform": [0.2, 0.7]}, "seed": {"randint": [0, 10]},
             "batch_size": {"choice": [32, 64]}, "optimizer": "sgd", "flip": True}
    assert validate_space(space) == space


@pytest.mark.parametrize("space, message", [
    ({}, "a space must be a non-empty mapping"),
    ([{"lr": 0.1}], "a space must be a non-empty mapping"),
    ({"momentum": {"uniform": [0.8, 0.99]}}, "unknown key 'momentum' (known: "),
    ({"epochs": {"choice": [5, 10]}}, "epochs is not searched: set it with --epochs"),
    ({"lr": {"normal": [1e-3, 1e-4]}}, "lr: give exactly one of choice, uniform, loguniform, randint, got {'normal'"),
    ({"lr": {"choice": [1e-3], "uniform": [1e-4, 1e-2]}}, "lr: give exactly one of choice"),
    ({"dropout": {"choice": []}}, "dropout: choice needs a non-empty list"),
    ({"dropout": {"choice": 0.3}}, "dropout: choice needs a non-empty list"),
    ({"dropout": {"uniform": [0.5]}}, "dropout: uniform needs [low, high] numbers, got [0.5]"),
    ({"dropout": {"uniform": [0.2, "0.5"]}}, "dropout: uniform needs [low, high] numbers"),
    ({"dropout": {"uniform": [False, 0.5]}}, "dropout: uniform needs [low, high] numbers"),
    ({"dropout": {"uniform": [0.5, 0.2]}}, "dropout: uniform range [0.5, 0.2] is empty (low must be < high)"),
    ({"lr": {"loguniform": [0.0, 1e-2]}}, "lr: loguniform needs low > 0, got 0.0"),
    ({"batch_size": {"uniform": [32, 256]}}, "batch_size takes integers: use choice or randint, not uniform"),
    ({"dropout": {"randint": [0, 1]}}, "dropout: randint does not fit it; use choice"),
    ({"hidden": {"randint": [64, 129]}}, "hidden: randint does not fit it; use choice"),
    ({"dropout": 1.5}, "dropout: value 1.5 is not allowed"),
    ({"dropout": {"choice": [0.3, 1.5]}}, "dropout: value 1.5 is not allowed"),
    ({"dropout": {"uniform": [0.5, 1.5]}}, "dropout: value 1.5 is not allowed"),  # each bound is checked
    ({"optimizer": {"choice": ["adam", "nadam"]}}, "optimizer: value 'nadam' is not allowed"),
    ({"arch": {"choice": ["cnn", "resnet"]}, "width": {"choice": [0.5]}}, "width: value 0.5 is not allowed with arch cnn"),
    ({"arch": "nope"}, "arch: value 'nope' is not allowed"),
])
def test_a_bad_space_is_one_config_error_naming_its_key(space, message):
    with pytest.raises(ConfigError) as info:
        validate_space(space)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_a_value_bounded_by_the_epochs_is_checked_against_the_trials_epochs():
    assert validate_space({"warmup": {"choice": [0, 5]}}, epochs=5) == {"warmup": {"choice": [0, 5]}}
    with pytest.raises(ConfigError, match=r"^warmup: value 5 is not allowed \(warmup must be an integer within 0..epochs \(3\)"):
        validate_space({"warmup": {"choice": [0, 5]}}, epochs=3)


def test_a_yaml_file_reads_as_its_json_twin_numbers_included(tmp_path):
    yaml_file = tmp_path / "space.yml"
    # YAML 1.1 reads 1e-4 and 2e-3 (no dot) as strings: a space file means the numbers.
    yaml_file.write_text("lr: {loguniform: [1e-4, 2e-3]}\nweight_decay: 1e-5\noptimizer: {choice: [adam, sgd]}\n"
                         "flip: true\nbatch_size: {choice: [32, 64]}\n")
    expected = {"lr": {"loguniform": [1e-4, 2e-3]}, "weight_decay": 1e-5, "optimizer": {"choice": ["adam", "sgd"]},
                "flip": True, "batch_size": {"choice": [32, 64]}}
    json_file = tmp_path / "space.JSON"
    json_file.write_text(json.dumps(expected))
    assert load_space(yaml_file) == load_space(json_file) == load_space(str(yaml_file)) == expected
    assert isinstance(load_space(yaml_file)["lr"]["loguniform"][0], float)


def test_a_named_space_written_to_a_file_loads_back(tmp_path):
    path = tmp_path / "strong.json"
    path.write_text(json.dumps(STRONG_SEARCH_SPACE))
    assert load_space(path, epochs=NAMED_SPACES["strong"].epochs) == STRONG_SEARCH_SPACE


@pytest.mark.parametrize("name, text, message", [
    ("s.yaml", "lr: {loguniform: [0, 1e-2]}\n", "lr: loguniform needs low > 0"),
    ("s.yaml", "momentum: 0.9\n", "unknown key 'momentum'"),
    ("s.yaml", "dropout: {uniform: [0.2, 0.7]\n", "not valid YAML: "),
    ("s.json", '{"dropout": {"uniform": [0.2, 0.7]}', "not valid JSON: "),
    ("s.yaml", "", "a space must be a non-empty mapping"),
    ("s.yaml", "- lr\n- dropout\n", "a space must be a non-empty mapping"),
])
def test_a_bad_space_file_is_one_config_error_naming_the_file_and_the_key(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert str(info.value).startswith(f"space file {path}: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_space_file_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^cannot read space file '.*nowhere\.yaml': No such file or directory$"):
        load_space(tmp_path / "nowhere.yaml")


# --------------------------------------------------------------------------- --space laptop

RECIPE_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "recipe-vgg-cpu.yaml"


def test_the_laptop_space_is_the_fast_cpu_nets_with_the_cpu_recipe_first():
    from tuning.budget import EPOCH_SPEED, space_nets, table_speed

    laptop = NAMED_SPACES["laptop"]
    assert laptop.space is LAPTOP_SEARCH_SPACE and laptop.start_points == (VGG_CPU_RECIPE,)
    assert (laptop.epochs, laptop.grace_period) == (27, 3)  # ASHA 3 -> 9 -> 27
    assert LAPTOP_SEARCH_SPACE["ema"] == {"choice": [0.0, 0.999]}
    # Every net it can produce trains at ~400 img/s on 2 fp32 cores (a shallower one at least as fast).
    nets = space_nets(LAPTOP_SEARCH_SPACE)
    assert set(nets) == {"vgg:width=0.25,depth=1", "vgg:width=0.25,depth=2", "resnet:width=0.25,depth=1",
                         "resnet:width=0.25,depth=2"}
    assert all(table_speed(n) >= 390 for n in nets) and EPOCH_SPEED["cnn-bn:width=1"] < 120


def test_the_recipe_start_point_is_the_shipped_yaml():
    """recipe-vgg-cpu.yaml's fixed values and one-value choices, as the flat config it trains."""
    recipe = {k: v["choice"][0] if isinstance(v, dict) else v for k, v in load_space(RECIPE_FILE).items()}
    assert all(len(v["choice"]) == 1 for v in load_space(RECIPE_FILE).values() if isinstance(v, dict))
    assert recipe == VGG_CPU_RECIPE
    TrainConfig.from_dict(VGG_CPU_RECIPE)


@pytest.mark.parametrize("name", sorted(NAMED_SPACES))
def test_each_start_point_lies_inside_its_space(name):
    named = NAMED_SPACES[name]
    for point in named.start_points:
        assert outside(point, named.space) == [], point
        assert set(point) - set(named.space) <= {"epochs"}  # it is the space's: nothing it could not search or fix


def test_outside_names_the_keys_a_space_cannot_produce():
    space = {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [32, 64]}, "seed": {"randint": [0, 3]},
             "flip": True}
    assert outside({"lr": 1e-3, "batch_size": 64, "seed": 2, "flip": True}, space) == []
    assert outside({"lr": 1e-1, "batch_size": 16, "seed": 3}, space) == ["lr", "batch_size", "seed", "flip"]


def test_the_planned_search_starts_with_the_recipe_then_the_start_from_point(tmp_path):
    """Unit, no Ray session: tuning.stages.search.plan's start points, which become OptunaStudy.start_points."""
    from tuning.options import SearchOptions
    from tuning.stages.search import plan, starting_point

    laptop = NAMED_SPACES["laptop"]
    options = SearchOptions(space=dict(laptop.space), start_points=laptop.start_points,
                            storage_url=f"sqlite:///{tmp_path / 'optuna.db'}")
    first = plan(None, options, None).start_points
    recipe = starting_point(VGG_CPU_RECIPE, laptop.space)
    assert first == (recipe,)
    assert recipe == {k: VGG_CPU_RECIPE.get(k, TrainConfig().to_dict().get(k)) for k, v in laptop.space.items()
                      if isinstance(v, dict)}  # the recipe exactly: already inside the space
    assert recipe["arch"] == "vgg" and recipe["ema"] == 0.0 and recipe["erase"] == 0.0
    grid_best = {"arch": "cnn", "dropout": 0.3, "lr": 1e-3, "batch_size": 32, "optimizer": "adam"}
    p = plan(None, options, grid_best)
    assert p.start_points == (recipe, starting_point(grid_best, laptop.space)) and p.start_point == p.start_points[1]
    # Another space has no recipe: the --start-from point alone, as before.
    plain = SearchOptions(space=dict(NAMED_SPACES["default"].space), storage_url=options.storage_url)
    assert plan(None, plain, None).start_points == ()
    assert plan(None, plain, grid_best).start_points == (starting_point(grid_best, plain.space),)
