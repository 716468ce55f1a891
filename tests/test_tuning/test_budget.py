"""tuning.budget: a --time-budget planned into trials and ASHA rungs that fit it (hand-computed cases),
its durations, and tuning.search's flags filled from the plan (speeds passed in: nothing is timed)."""

from __future__ import annotations

import math
from datetime import datetime

import pytest

from fer_model.errors import ConfigError
from tuning import budget, options, search
from tuning.budget import (EPOCH_OVERHEAD, EPOCH_SPEED, Plan, data_sizes, duration_text, net_key, parse_duration, plan,
                           rungs, space_nets, table_epoch_seconds)
from tuning.spaces import NAMED_SPACES


@pytest.mark.parametrize("text, seconds", [("60m", 3600), ("90m", 5400), ("2h", 7200), ("3600", 3600), ("45s", 45),
                                           ("1.5h", 5400), (" 90 min ", 5400), ("2H", 7200), ("0.5", 0.5), ("1d", 86400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "1h30m", "ninety", "0", "0s", "-5", "inf", "nan"])
def test_a_bad_duration_is_a_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError, match=r"^--time-budget: (expected a duration such as 45s, 90m, 2h|must be > 0)"):
        parse_duration(text)


def test_duration_text():
    assert [duration_text(s) for s in (45, 90, 3600, 5400, 3725, 0)] == ["45s", "1m30s", "1h", "1h30m", "1h2m5s", "0s"]


def test_rungs_are_ashas_milestones_then_the_longest_trial():
    assert rungs(3, 3, 27) == [3, 9, 27]
    assert rungs(3, 3, 30) == [3, 9, 27, 30]  # Ray's milestones stop at 27; trials passing it run on to 30
    assert rungs(2, 2, 16) == [2, 4, 8, 16]
    assert rungs(5, 3, 5) == [5] and rungs(3, 3, 27, asha=False) == [27]


def test_an_hour_at_a_minute_an_epoch_two_at_a_time():
    """3600 s, 60 s an epoch, 2 at once: 120 trial-epochs. Rungs 3 -> 9 -> 27 (grace >= 3, at most 27
    epochs): 16 trials -> 16 x 3 + 6 x 6 + 2 x 18 = 120; 17 would need 17 x 3 + 6 x 6 + 2 x 18 = 123."""
    p = plan(3600, 60.0, 2, 15, max_epochs=27, min_grace=3)
    assert (p.trials, p.grace_period, p.reduction_factor, p.max_epochs) == (16, 3, 3.0, 27)
    assert p.stops() == [3, 9, 27] and p.reaching() == [16, 6, 2]
    assert p.trial_epochs == 16 * 3 + 6 * (9 - 3) + 2 * (27 - 9) == 120
    assert p.trial_epochs * 60 / 2 <= 3600 and p.reaching()[-1] >= 1  # fits, and the best reach 27 epochs
    assert plan(3600, 60.0, 2, 15, max_epochs=27, min_grace=3, trials=17) is not None  # a fixed count plans shorter
    more = Plan(17, 3, 3.0, 27, 2, 60.0, 3600)
    assert more.trial_epochs == 123 and more.search_seconds > 3600
    assert p.line(datetime(2026, 12, 1, 13, 30)) == \
        "~16 trials, ASHA 3->9->27 epochs, 2 at a time, ends by 14:30 (~1.0 min an epoch, ~1h of 1h); final stage ~15 min"


def test_the_longest_trial_must_fit_the_budget_on_its_own():
    """150 s an epoch, 2 at once, an hour: one 27-epoch trial alone takes 67.5 min, so the rungs stop at 9.
    3 -> 9: 9 trials -> 9 x 3 + 3 x 6 = 45 trial-epochs (56 min); 10 -> 10 x 3 + 4 x 6 = 54 (67.5 min)."""
    p = plan(3600, 150.0, 2, 40, max_epochs=27, min_grace=3)
    assert (p.trials, p.stops(), p.trial_epochs) == (9, [3, 9], 45)
    assert p.search_seconds == 45 * 150 / 2 <= 3600 and p.final_seconds == 40 * 150
    # Two hours: the 27-epoch trial fits; 12 trials -> 12 x 3 + 4 x 6 + 2 x 18 = 96 trial-epochs = 2 h.
    p2 = plan(7200, 150.0, 2, 40, max_epochs=27, min_grace=3)
    assert (p2.trials, p2.stops(), p2.trial_epochs) == (12, [3, 9, 27], 96)


def test_the_slowest_net_is_planned_with_and_given_values_are_kept():
    p = plan(3600, {"fast": 30.0, "slow": 60.0}, 2, 0, max_epochs=27, min_grace=3)
    assert p.seconds_per_epoch == 60.0 and p.trials == 16 and p.final_seconds == 0
    fixed = plan(3600, 60.0, 2, 0, max_epochs=27, min_grace=3, epochs=12, grace_period=4, reduction_factor=3)
    assert (fixed.max_epochs, fixed.grace_period, fixed.stops()) == (12, 4, [4, 12])
    # 4 -> 12: N x 4 + ceil(N / 3) x 8 trial-epochs; 21 trials -> 84 + 56 = 140 > 120, 20 -> 80 + 56 = 136 > 120,
    # 18 -> 72 + 48 = 120: the most that fit.
    assert fixed.trials == 18 and fixed.trial_epochs == 120 and fixed.trial_epochs * 60 / 2 <= 3600
    assert Plan(19, 4, 3.0, 12, 2, 60.0, 3600).search_seconds > 3600
    no_asha = plan(3600, 60.0, 2, 0, max_epochs=30, asha=False)
    assert (no_asha.trials, no_asha.max_epochs, no_asha.stops()) == (4, 30, [30])  # 4 x 30 = 120 trial-epochs


def test_plenty_of_budget_fills_the_rungs_with_trials():
    p = plan(3600, 5.0, 8, 15, max_epochs=27, min_grace=3)
    assert p.stops() == [3, 9, 27] and p.trials >= 27 * 20 and p.search_seconds <= 3600
    assert Plan(p.trials + 1, 3, 3.0, 27, 8, 5.0, 3600).search_seconds > 3600  # the most that fit


def test_a_budget_too_short_for_one_trial_says_the_least_budget():
    # One trial of the 3-epoch grace period at 60 s an epoch: 3 minutes.
    with pytest.raises(ConfigError, match=r"^--time-budget 1m40s is too short for one trial of 3 epochs here "
                                          r"\(~60 s an epoch, 2 at a time\): give at least 3m$"):
        plan(100, 60.0, 2, 15, max_epochs=27, min_grace=3)
    assert plan(180, 60.0, 2, 15, max_epochs=27, min_grace=3).trials == 2  # exactly enough: 3 epochs each, 2 at once
    with pytest.raises(ConfigError, match="too short for 50 trials of 3 epochs .* give at least 1h15m"):
        plan(600, 60.0, 2, 15, max_epochs=27, min_grace=3, trials=50)


def test_the_speed_table_covers_the_laptop_space_not_the_strong_one():
    assert net_key({"arch": "vgg", "width": 0.25}) == "vgg:width=0.25,depth=2" and net_key({}) == "cnn"
    sizes = data_sizes(None, 0.1)
    assert sizes == {"train": 25_838, "val": 2_871}
    laptop = table_epoch_seconds(NAMED_SPACES["laptop"].space, sizes, threads=2)
    assert laptop["vgg:width=0.25,depth=2"] == pytest.approx(25_838 / 415.1 * EPOCH_OVERHEAD)  # ~79 s, as measured
    assert laptop["vgg:width=0.25,depth=1"] == laptop["vgg:width=0.25,depth=2"]  # a shallower net: no slower
    assert table_epoch_seconds(NAMED_SPACES["laptop"].space, sizes, threads=1)["vgg:width=0.25,depth=2"] == \
        pytest.approx(2 * laptop["vgg:width=0.25,depth=2"])
    assert table_epoch_seconds(NAMED_SPACES["strong"].space, sizes) is None  # width 1 was never measured: timed
    assert set(space_nets(NAMED_SPACES["default"].space)) == {"cnn"} and "cnn" in EPOCH_SPEED


# --------------------------------------------------------------------------- tuning.search's flags


def _options(tmp_path, argv, **kw):
    args = search.build_parser().parse_args([str(a) for a in argv])
    return options.search_options(args, f"sqlite:///{tmp_path / 'm.db'}", **kw)


def test_time_budget_takes_durations_and_plans_the_flags_not_given(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(budget.os, "cpu_count", lambda: 2)  # the final stage's threads: 2, a trial's 1
    speeds = lambda space, sizes: {net: 60.0 for net in space_nets(space)}
    o = _options(tmp_path, ["--space", "laptop", "--time-budget", "60m", "--max-concurrent", 2], epoch_seconds=speeds)
    assert o.time_budget == 3600.0
    assert (o.trials, o.epochs, o.scheduler.grace_period, o.scheduler.reduction_factor) == (16, 27, 3, 3.0)
    assert o.budget_plan.trials == 16 and o.budget_plan.concurrent == 2
    assert "budget_plan" not in o.stored()
    out = capsys.readouterr().out
    assert out.startswith("time budget 1h: ~16 trials, ASHA 3->9->27 epochs, 2 at a time, ends by ")
    assert "final stage ~20 min" in out  # 1.5 x the space's 27 epochs at a minute each, on 2 threads, not 1


def test_time_budget_keeps_what_is_given(tmp_path, capsys):
    speeds = lambda space, sizes: {net: 60.0 for net in space_nets(space)}
    o = _options(tmp_path, ["--space", "laptop", "--time-budget", "1h", "--max-concurrent", 2, "--trials", 8],
                 epoch_seconds=speeds)
    assert o.trials == 8 and o.budget_plan.trials == 8 and o.budget_plan.trial_epochs * 60 / 2 <= 3600
    every = _options(tmp_path, ["--time-budget", "2h", "--trials", 5, "--epochs", 4, "--grace-period", 2,
                                "--reduction-factor", 2], epoch_seconds=speeds)
    assert (every.trials, every.epochs, every.budget_plan) == (5, 4, None)  # nothing planned, nothing printed
    assert capsys.readouterr().out.count("time budget") == 1
    plain = _options(tmp_path, ["--trials", 3])
    assert plain.time_budget is None and plain.budget_plan is None and plain.trials == 3


def test_a_bad_or_too_short_time_budget_is_one_error(tmp_path):
    with pytest.raises(SystemExit):  # argparse: "argument --time-budget: expected a duration such as 45s, ..."
        _options(tmp_path, ["--time-budget", "soon"])
    with pytest.raises(ConfigError, match="^--time-budget must be > 0 seconds, got -5"):
        _options(tmp_path, ["--time-budget", "-5"])
    with pytest.raises(ConfigError, match="^--time-budget 1m is too short for one trial of 3 epochs .* give at least"):
        _options(tmp_path, ["--space", "laptop", "--time-budget", "1m", "--max-concurrent", 2],
                 epoch_seconds=lambda space, sizes: {"vgg": 100.0})


def test_the_default_speeds_are_timed_here_and_the_table_only_where_timing_fails(tmp_path, capsys, monkeypatch):
    timed = []

    def measure(space, sizes, threads=None, **kw):
        timed.append((sorted(space_nets(space)), dict(sizes), threads))
        return {net: 30.0 + i for i, net in enumerate(sorted(space_nets(space)))}

    monkeypatch.setattr(budget, "measure_epoch_seconds", measure)
    argv = ["--space", "laptop", "--time-budget", "2h", "--max-concurrent", 2, "--cpus-per-trial", 1, "--max-samples", 2800]
    o = _options(tmp_path, argv)
    assert timed == [(sorted(space_nets(NAMED_SPACES["laptop"].space)), {"train": 2520, "val": 280}, 1)]
    assert o.budget_plan.seconds_per_epoch == 33.0  # the slowest of the four nets timed
    assert "timing a few training steps" in capsys.readouterr().out

    def broken(space, sizes, threads=None, **kw):
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(budget, "measure_epoch_seconds", broken)
    o = _options(tmp_path, argv)
    # 2520 training images at the slowest net's table speed (resnet 0.25, 395.5 img/s on 2 threads), here on 1.
    assert o.budget_plan.seconds_per_epoch == pytest.approx(2520 / 395.5 * EPOCH_OVERHEAD * 2)
    assert math.isclose(o.budget_plan.budget_s, 7200) and o.budget_plan.search_seconds <= 7200
    assert "timing failed (no such kernel here); planning with benchmarks/RESULTS.md's speeds" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no such kernel"):  # a space the table does not know: the error stands
        _options(tmp_path, ["--space", "strong", "--time-budget", "2h", "--max-concurrent", 2])


def test_the_final_stage_estimate_takes_the_final_threads():
    # 10 final epochs at 60 s a trial-epoch (1 thread), the final stage on 4 threads: 10 * 60 / 4 = 150 s.
    p = plan(3600, 60.0, 2, 10, max_epochs=9, min_grace=3, final_scale=0.25)
    assert p.final_seconds == 150.0 and p.line().endswith("final stage ~2 min")
    assert plan(3600, 60.0, 2, 10, max_epochs=9, min_grace=3).final_seconds == 600.0


def test_measure_epoch_seconds_times_each_net_of_the_space_with_the_trainer():
    from tuning.budget import measure_epoch_seconds

    space = {"arch": "resnet", "width": 0.25, "depth": {"choice": [1, 2]}}
    seconds = measure_epoch_seconds(space, {"train": 6400, "val": 640}, steps=1, batch_size=8, device="cpu")
    assert set(seconds) == {"resnet:width=0.25,depth=1", "resnet:width=0.25,depth=2"}
    assert all(0 < s < 3600 and math.isfinite(s) for s in seconds.values())


def test_a_resumed_search_keeps_what_it_started_with_and_plans_nothing(tmp_path, capsys):
    o = _options(tmp_path, ["--resume", "--time-budget", "1h"], epoch_seconds=lambda space, sizes: {"cnn": 60.0})
    assert o.resume and o.time_budget == 3600 and o.budget_plan is None and o.trials == options.DEFAULT_TRIALS
    assert "time budget" not in capsys.readouterr().out
