"""`tuning.reporting`: the console's tables and lines (`report`) and the stage runs' Markdown descriptions
(`describe`), on hand-made rows: the values put in come out, where and in the order they should."""

from __future__ import annotations

import math

import pytest

from tuning import names as N
from tuning.reporting import describe, report
from tuning.trials.rows import TrialRow, best_row

NAN = math.nan


def row(trial_id: str, config: dict, *val_accs: float, outcome: str = N.Outcome.COMPLETED, run_name: str = "") -> TrialRow:
    return TrialRow(trial_id, dict(config), outcome, [{"val_acc": v} for v in val_accs], run_id=f"run-{trial_id}",
                    run_name=run_name)


# --------------------------------------------------------------------------- report: the console


def test_varying_keys_are_the_sorted_keys_whose_values_differ():
    rows = [row("a", {"lr": 1e-3, "dropout": 0.3, "batch_size": 64}, 0.1),
            row("b", {"lr": 1e-3, "dropout": 0.5, "batch_size": 64, "flip": True}, 0.1),
            row("c", {"lr": 1e-3, "dropout": 0.3, "batch_size": 64, "arch": "cnn"}, 0.1)]
    assert report.varying_keys(rows) == ["arch", "dropout", "flip"]  # a key some rows lack varies too
    assert report.varying_keys(rows[:1]) == [] and report.varying_keys([]) == []


TRIALS = [  # ranked by last-epoch validation accuracy: b, a, d; c diverged (NaN) comes last
    row("a", {"dropout": 0.3, "lr": 1e-3, "batch_size": 64}, 0.30, 0.45),
    row("b", {"dropout": 0.5, "lr": 1e-3, "batch_size": 64}, 0.52, outcome=N.Outcome.STOPPED_EARLY),
    row("c", {"dropout": 0.7, "lr": 1e-2, "batch_size": 64}, 0.20, NAN, outcome=N.Outcome.DIVERGED),
    row("d", {"dropout": 0.5, "lr": 1e-2, "batch_size": 64}, 0.40, 0.41),
]


def test_trials_text_lists_trials_best_first_with_the_keys_that_vary():
    lines = report.trials_text(TRIALS).splitlines()
    assert lines[0].split() == ["val", "acc", "epochs", "outcome", "dropout", "lr"]  # batch_size is the same for all
    assert lines[1:] == [
        "  52.00%      1 stopped_early           0.5        0.001",
        "  45.00%      2 completed               0.3        0.001",
        "  41.00%      2 completed               0.5         0.01",
        "    nan%      2 diverged                0.7         0.01",
    ]
    assert [line.split()[0] for line in report.trials_text(TRIALS, limit=2).splitlines()[1:]] == ["52.00%", "45.00%"]


def test_grid_text_lays_out_dropout_by_lr_in_the_order_given_with_the_studys_cells():
    rows = [row("a", {"dropout": 0.3, "lr": 1e-3}, 0.45), row("b", {"dropout": 0.3, "lr": 1e-2}, 0.2533),
            row("c", {"dropout": 0.4, "lr": 1e-3}, 0.50)]  # 0.4: a dropout the study did not try
    lines = report.grid_text(rows, [0.4, 0.3], [1e-3, 1e-2]).splitlines()
    assert [cell.split() for cell in lines[0].split(" | ")] == [
        ["dropout"], ["lr", "0.001", "val", "(study", "test)"], ["lr", "0.01", "val", "(study", "test)"]]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    cells = [[c.strip() for c in line.split(" | ")] for line in lines[2:]]
    assert cells == [["0.4", "50.00% (  -  )", "n/a (  -  )"],
                     ["0.3", "45.00% (57.30%)", "25.33% (42.03%)"]]
    assert len(lines) == 4


def test_grid_text_without_the_study_shows_our_cells_only():
    rows = [row("a", {"dropout": 0.3, "lr": 1e-3}, 0.45), row("b", {"dropout": 0.7, "lr": 1e-4}, 0.30)]
    text = report.grid_text(rows, [0.3, 0.7], [1e-4, 1e-3], study=False)
    lines = text.splitlines()
    assert [cell.split() for cell in lines[0].split(" | ")] == [["dropout"], ["lr", "0.0001", "val"], ["lr", "0.001", "val"]]
    assert [[c.strip() for c in line.split(" | ")] for line in lines[2:]] == [["0.3", "n/a", "45.00%"],
                                                                             ["0.7", "30.00%", "n/a"]]
    assert "(" not in text and "study" not in text and "57.30" not in text


def test_tie_line_names_every_tied_trial_in_trial_order():
    rows = [row("t0", {"dropout": 0.3}, 0.40, outcome=N.Outcome.STOPPED_EARLY),
            row("t1", {"dropout": 0.4}, 0.50, outcome=N.Outcome.STOPPED_EARLY, run_name="d0.4"),
            row("t2", {"dropout": 0.5}, 0.60, 0.50, outcome=N.Outcome.STOPPED_EARLY),
            row("t3", {"dropout": 0.6}, 0.50, outcome=N.Outcome.STOPPED_EARLY, run_name="d0.6"),
            row("t4", {"dropout": 0.7}, NAN, outcome=N.Outcome.DIVERGED)]
    # None ran to the end: the scored ones compete; unnamed trials by their id.
    assert report.tie_line(rows) == ("3 trials tie at 50.00% validation accuracy; picked the first in trial order "
                                     "(d0.4, t2, d0.6)")
    assert report.tie_line(rows[:2]) is None and report.tie_line(rows[1:2]) is None
    # A completed trial below them leads alone: nothing to say.
    assert report.tie_line([*rows, row("t5", {"dropout": 0.8}, 0.10)]) is None


# --------------------------------------------------------------------------- describe: the stage runs' pages


GRID = [  # in trial order, the order the flags gave the axes: --dropouts 0.5,0.7,0.3 --lrs 1e-3,1e-2
    row("c", {"dropout": 0.5, "lr": 1e-3, "batch_size": 64}, 0.40, 0.45),
    row("d", {"dropout": 0.7, "lr": 1e-2, "batch_size": 64}, 0.20, outcome=N.Outcome.STOPPED_EARLY),
    row("a", {"dropout": 0.3, "lr": 1e-3, "batch_size": 64}, 0.50, 0.48, run_name="d0.3 lr1e-3"),  # the best
    row("b", {"dropout": 0.3, "lr": 1e-2, "batch_size": 64}, 0.25),
]


def test_grid_description_tables_the_cells_beside_the_study_then_the_best():
    best = best_row(GRID)
    assert best is GRID[2]
    lines = describe.grid_description(GRID, best).splitlines()
    assert lines[0] == "**Grid** of 4 trials: best `d0.3 lr1e-3`, validation accuracy **48.00%**."
    # Both axes in the order the trials were made (as the console's table); the best cell in bold.
    assert lines[2:7] == ["| dropout \\ lr | 0.001 | 0.01 |",
                          "|---|---|---|",
                          "| 0.5 | 45.00% (55.98%) | n/a (24.71%) |",
                          "| 0.7 | n/a (56.26%) | 20.00% (24.71%) |",
                          "| 0.3 | **48.00%** (57.30%) | 25.00% (42.03%) |"]
    text = "\n".join(lines)
    assert "(2 epochs; 3 completed, 1 stopped early)" in text and "In brackets: the study's test accuracy" in text
    assert ("**Best trial** `d0.3 lr1e-3`: validation accuracy 48.00% at its last epoch (its best epoch 50.00%); "
            "run `run-a`. The final stage retrains it.") in lines
    table = lines[lines.index("**Best configuration**") + 2:]
    assert table == ["| key | value |", "|---|---|", "| **dropout** | **`0.3`** |", "| **lr** | **`0.001`** |",
                     "| batch_size | `64` |"]


def test_grid_description_on_a_subset_leaves_the_study_out_and_follows_the_axes_given():
    best = best_row(GRID)
    text = describe.grid_description(GRID, best, dropouts=[0.7, 0.3], lrs=[1e-3], full_data=False)
    lines = text.splitlines()
    assert lines[2:6] == ["| dropout \\ lr | 0.001 |", "|---|---|", "| 0.7 | n/a |", "| 0.3 | **48.00%** |"]
    assert "(--max-samples)" in text and "57.30" not in text and "In brackets" not in text


SEARCH = [
    row("s0", {"optimizer": "adam", "lr": 3.2e-4, "batch_size": 64, "dropout": 0.5}, 0.40, 0.47),
    row("s1", {"optimizer": "sgd", "lr": 1e-2, "batch_size": 32, "dropout": 0.5}, 0.52, outcome=N.Outcome.STOPPED_EARLY),
    row("s2", {"optimizer": "adamw", "lr": 1e-3, "batch_size": 128, "dropout": 0.5}, 0.20, NAN, outcome=N.Outcome.DIVERGED),
    row("s3", {"optimizer": "adam", "lr": 1e-3, "batch_size": 32, "dropout": 0.5}, 0.30, 0.35),
]


def test_search_description_lists_the_top_trials_by_validation_accuracy_then_the_best():
    best = best_row(SEARCH)  # completed trials first: s0, though s1 scored higher before ASHA stopped it
    assert best is SEARCH[0]
    lines = describe.search_description(SEARCH, best, study_name="study-7").splitlines()
    assert lines[0] == "**Search** of 4 trials: best `b64 lr3.2e-4 adam`, validation accuracy **47.00%**."
    assert lines[2:7] == [
        "| # | run | val acc | best val acc | epochs | outcome | batch_size | lr | optimizer |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 1 | `b32 lr1e-2 sgd` | 52.00% | 52.00% | 1 | stopped early | 32 | 1e-2 | sgd |",
        "| 2 | `b64 lr3.2e-4 adam` | 47.00% | 47.00% | 2 | completed | 64 | 3.2e-4 | adam |",
        "| 3 | `b32 lr1e-3 adam` | 35.00% | 35.00% | 2 | completed | 32 | 1e-3 | adam |",  # s2 (NaN) is left out
    ]
    assert lines[8] == ("The top 3 by validation accuracy at their last epoch, of Optuna study `study-7` "
                        "(2 completed, 1 diverged, 1 stopped early); searched: batch_size, lr, optimizer.")
    table = lines[lines.index("**Best configuration**") + 2:]
    assert table == ["| key | value |", "|---|---|", "| **batch_size** | **`64`** |", "| **lr** | **`0.00032`** |",
                     "| **optimizer** | **`adam`** |", "| dropout | `0.5` |"]


def test_search_description_keeps_its_top_and_names_runs_by_their_run_names():
    rows = [row("s0", {"lr": 1e-3}, 0.30, run_name="trial one"), row("s1", {"lr": 1e-2}, 0.50), row("s2", {"lr": 1e-4}, 0.40)]
    lines = describe.search_description(rows, best_row(rows), top=2).splitlines()
    assert [line.split(" | ")[1] for line in lines[4:6]] == ["`lr1e-2`", "`lr1e-4`"]
    assert lines[6] == "" and lines[7].startswith("The top 2 by validation accuracy at their last epoch (3 completed)")
    assert describe.search_description(rows, rows[0]).splitlines()[0] == (
        "**Search** of 3 trials: best `trial one`, validation accuracy **30.00%**.")


@pytest.mark.parametrize("stage", [N.STAGE_GRID, N.STAGE_SEARCH])
def test_stage_description_is_the_stages_own(stage):
    rows = GRID if stage == N.STAGE_GRID else SEARCH
    best = best_row(rows)
    expected = describe.grid_description(rows, best) if stage == N.STAGE_GRID else describe.search_description(rows, best)
    assert describe.stage_description(stage, rows, best) == expected
    assert describe.stage_description(stage, rows, best).startswith(f"**{stage.capitalize()}** of 4 trials")
