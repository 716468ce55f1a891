"""tuning.options: every search flag is declared once, on its SearchOptions field, and the rest follows."""

from __future__ import annotations

import dataclasses

import pytest

from fer_model.errors import ConfigError
from tuning import grid, options, search
from tuning.options import SearchOptions


def _flags_of(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _options(workdir, argv, command=search, **kw) -> SearchOptions:
    parser = command.build_parser()
    return options.search_options(parser.parse_args([str(a) for a in argv]), f"sqlite:///{workdir / 'm.db'}", **kw)


def test_every_declared_search_flag_is_in_both_parsers_under_its_names():
    in_search, in_grid = _flags_of(search.build_parser()), _flags_of(grid.build_parser())
    for name, flag in options.search_flags():
        assert flag.flag in in_search, name
        if flag.grid_flag:
            assert flag.grid_flag in in_grid, name
    assert {"--search-trials", "--search-epochs", "--search-scheduler", "--search-grace-period"} <= in_grid
    assert "--start-from" not in in_grid and "--trials" not in in_grid  # a chain's search starts from the grid's best


def test_resume_keys_come_from_the_fields_and_name_keys_the_stored_options_have(tmp_path):
    stored = _options(tmp_path, []).stored()
    for dest, (flag, key) in options.SEARCH_RESUME_KEYS.items():
        if key != "max_concurrent":  # the cluster's, stored beside the search's options
            head, _, rest = key.partition(".")
            assert head in stored and (not rest or rest in stored[head]), (dest, key)
    chain = {k: v for k, v in grid.RESUME_KEYS.items() if v[1].startswith("chain.search.")}
    # the grid's chain names every flag the search resumes with, under its --search- name where the grid has one
    assert {v[1].removeprefix("chain.search.") for v in chain.values()} >= {
        "trials", "epochs", "space", "storage_url", "time_budget", "sampler_seed", "study_name", "scheduler.kind"}
    assert grid.RESUME_KEYS["search_epochs"] == ("--search-epochs", "chain.search.epochs")
    assert options.SEARCH_RESUME_KEYS["search_epochs"] == ("--epochs", "epochs")
    assert "study_name" not in options.SEARCH_RESUME_KEYS  # --resume picks the study by name; the grid's chain keeps its own


def test_stored_options_round_trip_and_drop_what_a_resume_does_not_keep(tmp_path):
    asked = _options(tmp_path, ["--trials", 7, "--epochs", 3, "--time-budget", 90, "--search-seed", 4, "--scheduler", "none",
                                "--start-from", "latest-grid"])
    stored = asked.stored()
    assert {"resume", "start_from", "given"}.isdisjoint(stored)
    back = SearchOptions.from_stored(stored)
    assert back == dataclasses.replace(asked, start_from=None)
    assert (back.trials, back.epochs, back.time_budget, back.sampler_seed, back.scheduler.kind) == (7, 3, 90.0, 4, "none")


@pytest.mark.parametrize("command, argv, message", [
    (search, ["--trials", 0], "--trials must be >= 1, got 0"),
    (grid, ["--search-trials", 0], "--search-trials must be >= 1, got 0"),
    (search, ["--epochs", 0], "--epochs must be >= 1, got 0"),
    (grid, ["--search-trials", 2, "--search-epochs", 0], "--search-epochs must be >= 1, got 0"),
    (search, ["--time-budget", -5], "--time-budget must be > 0 seconds, got -5"),
])
def test_a_bad_value_is_refused_under_the_name_it_was_given(tmp_path, command, argv, message):
    with pytest.raises(ConfigError, match=message):
        _options(tmp_path, argv, command, in_grid=command is grid)


def test_a_new_field_is_a_new_flag_everywhere(tmp_path, monkeypatch):
    """What adding a search flag takes: one field. Parsers, check, stored options and resume keys follow."""

    @dataclasses.dataclass(frozen=True)
    class WithDummy(SearchOptions):
        dummy: int = options.search_flag(3, "--dummy", "--search-dummy", "a dummy (default 3)", type=int,
                                         check=lambda v: None if v % 2 else f"must be odd, got {v}")

    monkeypatch.setattr(options, "SearchOptions", WithDummy)
    assert "--dummy" in _flags_of(search.build_parser()) and "--search-dummy" in _flags_of(grid.build_parser())
    assert _options(tmp_path, []).dummy == 3
    assert _options(tmp_path, ["--dummy", 5]).stored()["dummy"] == 5
    with pytest.raises(ConfigError, match="--dummy must be odd, got 4"):
        _options(tmp_path, ["--dummy", 4])
    assert options.search_resume_keys(in_grid=False)["dummy"] == ("--dummy", "dummy")
    assert options.search_resume_keys(in_grid=True)["dummy"] == ("--search-dummy", "chain.search.dummy")


def test_the_quick_preset_fills_unset_flags_and_a_typed_one_wins(tmp_path):
    args, typed = grid.parse_args(["--quick", "--epochs", "3"])
    assert (args.max_samples, args.epochs, args.final_epochs) == (grid.QUICK["max_samples"], 3, grid.QUICK["final_epochs"])
    assert typed.final_epochs is None
    final = options.final_options(args, trial_epochs=3, typed=typed)
    assert final.epochs == grid.QUICK["final_epochs"] and final.why_epochs == "the preset's"
    args, typed = grid.parse_args(["--quick", "--final-epochs", "5"])
    assert options.final_options(args, typed=typed).why_epochs == "--final-epochs"
    # --quick's final epochs are the preset's, not the user's: --no-final is not refused for them
    args, typed = grid.parse_args(["--quick", "--no-final"])
    assert options.final_options(args, typed=typed).enabled is False


@pytest.mark.parametrize("flags, whose", [([], "the trials' 15"), (["--time-budget", "35m"], "the space's 15"),
                                          (["--time-budget", "35m", "--epochs", "15"], "the trials' 15")])
def test_the_final_stage_epochs_say_whose_epochs_they_follow(flags, whose):
    # A budget plans the trials' epochs after this (the 35m default search's trials stopped at 6): the final
    # stage's 22 follow the space's 15, and the plan line must not call them the trials'.
    args = search.build_parser().parse_args(flags)
    final = options.final_options(args, trial_epochs=options.search_epochs(args))
    assert final.epochs == 22 and final.why_epochs.startswith(f"1.5 x {whose},")
