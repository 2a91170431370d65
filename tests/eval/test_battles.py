"""Battle records: parsing, validation with line numbers, file round trips and time order."""

import json
import random

import numpy as np
import pytest

from jvila.eval.battles import (WINNERS, Battle, encode, parse_battle, parse_battles_text, read_battles,
                                sorted_by_time, write_battles)


def _record(**overrides):
    record = {"model_a": "alpha", "model_b": "beta", "winner": "model_a", "tstamp": 1700000000.5}
    record.update(overrides)
    return record


def test_parse_battle_keeps_fields_and_ignores_extras():
    meta = {"sum_assistant_a_tokens": 10, "header_count_a": {"h1": 1}}
    battle = parse_battle(_record(winner="tie (bothbad)", conv_metadata=meta, judge="arena_user_1", anony=True))
    assert battle == Battle("alpha", "beta", "tie (bothbad)", 1700000000.5)
    assert battle.conv_metadata == meta and battle.is_tie
    assert parse_battle(_record(tstamp=3)).tstamp == 3.0


@pytest.mark.parametrize("overrides, message", [
    ({"winner": "model_c"}, "winner must be one of"),
    ({"winner": "Tie"}, "winner must be one of"),
    ({"model_b": "alpha"}, "the same model"),
    ({"model_a": ""}, "model_a must be a non-empty string"),
    ({"model_b": 7}, "model_b must be a non-empty string"),
    ({"tstamp": "yesterday"}, "tstamp must be a finite number"),
    ({"tstamp": True}, "tstamp must be a finite number"),
    ({"tstamp": float("nan")}, "tstamp must be a finite number"),
    ({"conv_metadata": [1, 2]}, "conv_metadata must be a JSON object"),
])
def test_parse_battle_names_the_bad_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse_battle(_record(**overrides))


@pytest.mark.parametrize("missing", ["model_a", "model_b", "winner", "tstamp"])
def test_parse_battle_names_a_missing_field(missing):
    record = _record()
    del record[missing]
    with pytest.raises(ValueError, match=f"missing field '{missing}'"):
        parse_battle(record)


def test_parse_battle_rejects_non_objects():
    with pytest.raises(ValueError, match="JSON object"):
        parse_battle(["alpha", "beta"])


def test_malformed_line_is_an_error_naming_its_line_number(tmp_path):
    path = tmp_path / "battles.jsonl"
    lines = [json.dumps(_record()), "", json.dumps(_record(winner="model_b")), json.dumps(_record(winner="draw"))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"battles.jsonl line 4: winner must be one of"):
        read_battles(path)
    path.write_text(json.dumps(_record()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        read_battles(path)


def test_json_array_files_are_read_and_errors_name_the_item(tmp_path):
    path = tmp_path / "clean_battle.json"
    path.write_text(json.dumps([_record(), _record(winner="tie")]))
    assert [b.winner for b in read_battles(path)] == ["model_a", "tie"]
    path.write_text(json.dumps([_record(), _record(model_a=None)]))
    with pytest.raises(ValueError, match="item 2: model_a"):
        read_battles(path)


def test_empty_and_missing_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no battles"):
        read_battles(empty)
    with pytest.raises(ValueError, match="does not exist"):
        read_battles(tmp_path / "nowhere.jsonl")


def test_write_then_read_round_trips(tmp_path):
    rng = random.Random(4)
    battles = [Battle(*rng.sample(["m1", "m2", "m3", "m4"], 2), rng.choice(WINNERS), rng.uniform(0, 1e9),
                      {"sum_assistant_a_tokens": rng.randint(1, 99)} if rng.random() < 0.5 else None)
               for _ in range(23)]
    write_battles(battles, tmp_path / "b.jsonl")
    again = read_battles(tmp_path / "b.jsonl")
    assert again == battles
    assert [b.conv_metadata for b in again] == [b.conv_metadata for b in battles]
    assert parse_battles_text((tmp_path / "b.jsonl").read_text()) == battles


def test_sorted_by_time_is_stable_for_equal_timestamps():
    battles = [Battle("a", "b", "model_a", 5.0), Battle("b", "c", "tie", 1.0), Battle("c", "a", "model_b", 5.0),
               Battle("a", "c", "model_a", 0.5)]
    assert sorted_by_time(battles) == [battles[3], battles[1], battles[0], battles[2]]


def test_encode_orders_models_by_first_appearance_and_scores_model_a():
    battles = [Battle("x", "y", "model_a", 0), Battle("z", "x", "model_b", 1), Battle("y", "w", "tie", 2)]
    models, matchups, outcomes = encode(battles)
    assert models == ["x", "z", "y", "w"]  # every model_a first, then the new model_b names
    np.testing.assert_array_equal(matchups, [[0, 2], [1, 0], [2, 3]])
    np.testing.assert_array_equal(outcomes, [1.0, 0.0, 0.5])
