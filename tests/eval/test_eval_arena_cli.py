"""The leaderboard entry point, the win-rate matrices, the ratings chart and `jvila eval arena` end to end."""

import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from jvila.cli import main
from styled_battles import random_styled_battles

from jvila.eval.battles import Battle, write_battles
from jvila.eval.bradley_terry import bt_ratings
from jvila.eval.elo import elo_ratings
from jvila.eval.leaderboard import (LeaderboardRow, format_leaderboard, is_finite_row, leaderboard,
                                    predicted_win_rate_matrix, win_rate_matrix)
from jvila.eval.plots import plot_leaderboard

STRENGTHS = {"gold": 0.6, "silver": 0.25, "bronze": 0.0, "tin": -0.45}


def _league(seed, n=400, strengths=STRENGTHS):
    rng = random.Random(seed)
    battles = []
    for _ in range(n):
        a, b = rng.sample(list(strengths), 2)
        p = 1 / (1 + 10 ** (strengths[b] - strengths[a]))
        u = rng.random()
        winner = "tie" if u < 0.1 else "tie (bothbad)" if u < 0.15 else "model_a" if rng.random() < p else "model_b"
        battles.append(Battle(a, b, winner, rng.uniform(1.7e9, 1.8e9)))
    return battles


def test_bt_leaderboard_rows():
    battles = _league(1)
    rows = leaderboard(battles, bootstrap_rounds=40, seed=3)
    assert [row.model for row in rows] == ["gold", "silver", "bronze", "tin"]
    reference = bt_ratings(battles)
    for row in rows:
        assert row.rating == pytest.approx(reference[row.model], abs=1e-9)  # the point estimate: all battles
        assert row.lower < row.rating < row.upper
        assert row.num_battles == sum(row.model in (b.model_a, b.model_b) for b in battles)
    assert rows[0].rank == 1 and rows[-1].rank > 1
    assert sum(row.num_battles for row in rows) == 2 * len(battles)
    assert leaderboard(battles, bootstrap_rounds=40, seed=3) == rows  # seeded


def test_elo_leaderboard_reports_the_rounded_bootstrap_median():
    battles = _league(2)
    rows = leaderboard(battles, method="elo", bootstrap_rounds=30, seed=1)
    for row in rows:
        assert row.rating == math.floor(row.rating) and row.lower <= row.rating <= row.upper
    without_bootstrap = leaderboard(battles, method="elo", bootstrap_rounds=0)
    online = elo_ratings(battles)
    for row in without_bootstrap:
        assert row.rating == pytest.approx(online[row.model]) and row.lower == row.upper == row.rating
    # Without intervals, ranks fall back to strict rating order.
    assert [row.rank for row in without_bootstrap] == [1, 2, 3, 4]


def test_a_model_that_never_lost_stays_finite_and_first():
    battles = [Battle("champ", other, "model_a", float(i)) for i, other in enumerate(["x", "y", "x", "y"])]
    battles += [Battle("x", "y", "model_b", 10.0), Battle("y", "x", "tie", 11.0)]
    rows = leaderboard(battles, bootstrap_rounds=10)
    assert rows[0].model == "champ"
    assert all(math.isfinite(v) for row in rows for v in (row.rating, row.lower, row.upper))


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "glicko"}, "method must be one of"),
    ({"bootstrap_rounds": -1}, "non-negative integer"),
    ({"bootstrap_rounds": 2.5}, "non-negative integer"),
    ({"method": "elo", "style_control": True}, "style control applies to Bradley-Terry"),
])
def test_leaderboard_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        leaderboard(_league(3, n=20), **kwargs)
    with pytest.raises(ValueError, match="no battles"):
        leaderboard([])


def test_win_rate_matrix_counts_both_seats_and_skips_ties():
    battles = [Battle("a", "b", "model_a", 0), Battle("b", "a", "model_a", 1), Battle("b", "a", "model_b", 2),
               Battle("a", "b", "tie", 3), Battle("a", "c", "model_a", 4), Battle("c", "b", "tie (bothbad)", 5)]
    models, rates = win_rate_matrix(battles, ["a", "b", "c"])
    assert models == ["a", "b", "c"]
    assert rates[0, 1] == pytest.approx(2 / 3) and rates[1, 0] == pytest.approx(1 / 3)
    assert rates[0, 2] == 1.0 and rates[2, 0] == 0.0
    assert np.isnan(rates[1, 2]) and np.isnan(rates[2, 1]) and np.isnan(rates[0, 0])  # only a tie: undecided
    default_models, _ = win_rate_matrix(battles)
    assert default_models[0] == "a"  # best average win rate first
    with pytest.raises(ValueError, match="not in the battles"):
        win_rate_matrix(battles, ["a", "zzz"])


def test_predicted_win_rates_follow_the_logistic_on_rating_gaps():
    rows = [LeaderboardRow("p", 1200.0, 1190.0, 1210.0, 1, 10), LeaderboardRow("q", 1000.0, 990.0, 1010.0, 2, 10),
            LeaderboardRow("r", 1000.0 - 400 * math.log10(3), 900.0, 1000.0, 2, 10)]
    models, predicted = predicted_win_rate_matrix(rows)
    assert models == ["p", "q", "r"]
    assert predicted[0, 1] == pytest.approx(1 / (1 + 10 ** (-0.5)))  # 200 points: 76%
    assert predicted[1, 2] == pytest.approx(0.75)  # a gap of 400*log10(3) is 3:1 odds
    off_diagonal = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose((predicted + predicted.T)[off_diagonal], 1.0)
    assert np.all(np.isnan(np.diag(predicted)))


def test_plot_writes_a_png_with_the_chart(tmp_path):
    rows = leaderboard(_league(4), bootstrap_rounds=20)
    path = tmp_path / "ratings.png"
    plot_leaderboard(rows, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 100 and pixels.max() > 200  # something drawn on a light background
    with pytest.raises(ValueError, match="no leaderboard rows"):
        plot_leaderboard([], tmp_path / "empty.png")


def test_format_leaderboard_lines_up():
    text = format_leaderboard([LeaderboardRow("long-model-name", 1034.56, 1020.0, 1050.5, 1, 12),
                               LeaderboardRow("m", 965.4, 950.0, 980.0, 2, 12)])
    header, first, second = text.splitlines()
    assert header.split() == ["rank", "model", "rating", "95%", "CI", "battles"]
    assert first.split() == ["1", "long-model-name", "1034.6", "-14.6/+15.9", "12"]
    assert second.split()[:3] == ["2", "m", "965.4"]


def test_cli_prints_the_leaderboard_and_draws_it(tmp_path, capsys):
    battles = _league(5)
    path = tmp_path / "battles.jsonl"
    write_battles(battles, path)
    plot = tmp_path / "chart.png"
    assert main(["eval", "arena", str(path), "--bootstrap", "20", "--seed", "2", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[:2] == ["rank", "model"] and len(lines) == 1 + len(STRENGTHS)
    expected = leaderboard(battles, bootstrap_rounds=20, seed=2)
    for line, row in zip(lines[1:], expected):
        assert line.split()[1] == row.model and float(line.split()[2]) == pytest.approx(row.rating, abs=0.05)
    assert plot.stat().st_size > 1000

    assert main(["eval", "arena", str(path), "--method", "elo", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    online = elo_ratings(battles)
    best = max(online, key=online.get)
    assert out.splitlines()[1].split()[1] == best


def test_cli_style_control(tmp_path, capsys):
    battles = random_styled_battles(6, 150, max_markdown=9)
    path = tmp_path / "styled.jsonl"
    write_battles(battles, path)
    assert main(["eval", "arena", str(path), "--style-control", "--bootstrap", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = {"model_a": "a", "model_b": "b", "winner": "model_a", "tstamp": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "winner": "a"}) + "\n")
    assert main(["eval", "arena", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jvila: error: ") and "line 2" in err and "Traceback" not in err

    path.write_text(json.dumps(good) + "\n")
    assert main(["eval", "arena", str(path), "--style-control"]) == 2
    assert "conv_metadata" in capsys.readouterr().err
    assert main(["eval", "arena", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "arena", str(path), "--bootstrap", "-3"])
    assert exit_info.value.code == 2
    assert "--bootstrap" in capsys.readouterr().err


def test_the_arena_anchor_pins_mixtral_when_it_is_rated(tmp_path, capsys):
    names = {"gold": "mixtral-8x7b-instruct-v0.1", "silver": "silver", "bronze": "bronze", "tin": "tin"}
    battles = [Battle(names[b.model_a], names[b.model_b], b.winner, b.tstamp) for b in _league(8, n=200)]
    anchored = leaderboard(battles, bootstrap_rounds=10)
    mixtral = next(row for row in anchored if row.model.startswith("mixtral"))
    assert mixtral.rating == pytest.approx(1114.0, abs=1e-9)
    plain = {row.model: row for row in leaderboard(battles, bootstrap_rounds=10, anchor=None)}
    assert np.mean([row.rating for row in plain.values()]) == pytest.approx(1000.0, abs=1e-6)
    for row in anchored:  # one shift for every point rating
        shift = 1114.0 - plain[mixtral.model].rating
        assert row.rating - plain[row.model].rating == pytest.approx(shift, abs=1e-6)
    # Each bootstrap round is anchored too (as FastChat does): intervals are relative to the anchor, whose own
    # interval shrinks to its rating.
    assert mixtral.lower == pytest.approx(1114.0, abs=1e-6) and mixtral.upper == pytest.approx(1114.0, abs=1e-6)
    path = tmp_path / "b.jsonl"
    write_battles(battles, path)
    assert main(["eval", "arena", str(path), "--bootstrap", "0", "--anchor", "tin=900"]) == 0
    tin_line = next(line for line in capsys.readouterr().out.splitlines() if " tin " in line)
    assert tin_line.split()[2] == "900.0"
    with pytest.raises(SystemExit):
        main(["eval", "arena", str(path), "--anchor", "tin"])
    assert "MODEL=RATING" in capsys.readouterr().err


def test_is_finite_row():
    assert is_finite_row(LeaderboardRow("m", 1000.0, 990.0, 1010.0, 1, 3))
    assert not is_finite_row(LeaderboardRow("m", 1000.0, -math.inf, 1010.0, 1, 3))
    assert not is_finite_row(LeaderboardRow("m", math.nan, 990.0, 1010.0, 1, 3))
