"""The Arena's parts without a server: the vote store (SQLite through SQLAlchemy), contestants files, pair draws,
and the battle records it exports (read back by jvila.eval.battles)."""

from __future__ import annotations

import collections
import json
import random
import sqlite3
import threading

import pytest

from jvila.eval.battles import WINNERS, parse_battle
from serving.arena.contestants import Contestant, contestants_for, draw_pair, read_contestants
from serving.arena.export import battle_record, markdown_counts
from serving.arena.store import ArenaError, ArenaStore, database_url


def _answered_battle(store: ArenaStore, rng: random.Random, a="alpha", b="beta"):
    battle = store.create_battle(f"question {rng.random()}", a, b)
    store.start(battle.id)
    store.save_answer(battle.id, "a", f"answer A {rng.random()}", rng.randint(1, 50))
    store.save_answer(battle.id, "b", f"answer B {rng.random()}", rng.randint(1, 50))
    return battle


def test_votes_are_stored_once_checked_and_kept_across_reopening(tmp_path):
    rng = random.Random()
    path = tmp_path / "votes.db"
    store = ArenaStore(str(path))
    battles = [_answered_battle(store, rng) for _ in range(3)]
    winners = [rng.choice(WINNERS) for _ in battles]
    for battle, winner in zip(battles, winners):
        voted = store.vote(battle.id, winner)
        assert voted.winner == winner and voted.vote_tstamp is not None

    with pytest.raises(ArenaError, match="already been voted") as e:
        store.vote(battles[0].id, "model_b")
    assert e.value.status == 409
    with pytest.raises(ArenaError, match="no battle") as e:
        store.vote("0" * 32, "tie")
    assert e.value.status == 404
    with pytest.raises(ArenaError, match="winner must be one of") as e:
        store.vote(battles[1].id, "left")
    assert e.value.status == 400
    unanswered = store.create_battle("no answers yet", "alpha", "beta")
    with pytest.raises(ArenaError, match="before both answers") as e:
        store.vote(unanswered.id, "tie")
    assert e.value.status == 409
    store.start(unanswered.id)
    with pytest.raises(ArenaError, match="already been streamed"):
        store.start(unanswered.id)
    store.release(unanswered.id)  # a failed submission can be streamed again
    store.start(unanswered.id)
    store.close()

    # A new store on the same file (a restarted server) sees the same votes, and still refuses a second one.
    reopened = ArenaStore(f"sqlite:///{path}")
    assert [(b.id, b.winner) for b in reopened.voted_battles()] == list(zip([b.id for b in battles], winners))
    assert reopened.count() == (4, 3)
    with pytest.raises(ArenaError, match="already been voted"):
        reopened.vote(battles[2].id, "tie")
    reopened.close()
    # The rows as any SQLite client reads them.
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT battle_id, winner FROM arena_votes ORDER BY id").fetchall()
    assert rows == list(zip([b.id for b in battles], winners))


def test_racing_votes_on_one_battle_store_exactly_one(tmp_path):
    store = ArenaStore(str(tmp_path / "race.db"))
    battle = _answered_battle(store, random.Random())
    outcomes = []

    def vote(winner):
        try:
            store.vote(battle.id, winner)
            outcomes.append("stored")
        except ArenaError as e:
            outcomes.append(e.status)

    threads = [threading.Thread(target=vote, args=(WINNERS[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [409] * 7 + ["stored"]
    assert store.count() == (1, 1)


def test_bad_database_locations_are_clear_errors(tmp_path):
    assert database_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    assert database_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ValueError, match="does not exist"):
        database_url(str(tmp_path / "missing" / "a.db"))
    with pytest.raises(ValueError, match="cannot be opened"):
        ArenaStore("nosuchdialect://x/y")


def test_contestants_files_and_defaults(tmp_path):
    served = ["tiny-chat", "tiny-chat:lora-1"]
    assert contestants_for(served) == [Contestant("tiny-chat", "tiny-chat"),
                                       Contestant("tiny-chat:lora-1", "tiny-chat:lora-1")]
    with pytest.raises(ValueError, match="at least two contestants.*--arena-contestants"):
        contestants_for(["only-one"])

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("contestants:\n  - {name: terse, model: tiny-chat, system: Be brief., temperature: 0}\n"
                         "  - name: chatty\n    model: tiny-chat:lora-1\n")
    terse, chatty = contestants_for(served, yaml_file)
    assert terse == Contestant("terse", "tiny-chat", "Be brief.", 0.0)
    assert chatty.model == "tiny-chat:lora-1" and chatty.system is None and chatty.temperature == 0.7

    json_file = tmp_path / "c.json"
    for entries, message in (([{"name": "x", "model": "nope"}, {"name": "y", "model": "tiny-chat"}],
                              "does not serve"),
                             ([{"name": "x", "model": "tiny-chat"}, {"name": "x", "model": "tiny-chat"}],
                              "two contestants are named 'x'"),
                             ([{"name": "x", "model": "tiny-chat", "temperature": 3}], "from 0 to 2"),
                             ([{"name": "x", "model": "tiny-chat", "colour": "red"}], "unknown field"),
                             ([{"model": "tiny-chat"}], "entry 1: 'name'"),
                             ([{"name": "x", "model": "tiny-chat"}], "at least two"),
                             ({"x": 1}, "expected a list"), (["x"], "expected an object")):
        json_file.write_text(json.dumps(entries))
        with pytest.raises(ValueError, match=message):
            contestants_for(served, json_file)
    json_file.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_contestants(json_file)
    with pytest.raises(ValueError, match="does not exist"):
        read_contestants(tmp_path / "missing.yaml")


def test_pairs_are_two_different_contestants_in_every_order_about_equally():
    contestants = [Contestant(n, "m") for n in "pqr"]
    rng = random.Random(1234)
    draws = collections.Counter((a.name, b.name) for a, b in (draw_pair(contestants, rng) for _ in range(6000)))
    assert set(draws) == {(a, b) for a in "pqr" for b in "pqr" if a != b}
    # 6 ordered pairs, 1000 expected each; the binomial sd is ~29, so 150 is over 5 sd.
    assert all(abs(count - 1000) < 150 for count in draws.values()), draws


def test_markdown_counts_follow_fastchat_rules_and_skip_code():
    text = ("# Title\n## Part\nplain # not a header\n1. one\n2. two\n - dash\n* star\n**bold** and __also__\n"
            "```\n# comment in code\n- not a list\n```\n### Three\n")
    counts = markdown_counts(text, "a")
    assert counts["header_count_a"] == {"h1": 1, "h2": 1, "h3": 1, "h4": 0, "h5": 0, "h6": 0}
    assert counts["list_count_a"] == {"ordered": 2, "unordered": 2}
    assert counts["bold_count_a"] == {"**": 1, "__": 1}


def test_exported_record_is_a_battle_jvila_eval_reads(tmp_path):
    rng = random.Random()
    store = ArenaStore(str(tmp_path / "x.db"))
    battle = _answered_battle(store, rng, "terse", "chatty")
    voted = store.vote(battle.id, "tie (bothbad)")
    record = json.loads(json.dumps(battle_record(voted)))
    parsed = parse_battle(record)
    assert (parsed.model_a, parsed.model_b, parsed.winner, parsed.tstamp) == ("terse", "chatty", "tie (bothbad)",
                                                                             voted.vote_tstamp)
    assert record["conversation_a"] == [{"role": "user", "content": voted.prompt},
                                        {"role": "assistant", "content": voted.answer_a}]
    assert record["conv_metadata"]["sum_assistant_b_tokens"] == voted.tokens_b
    with pytest.raises(ValueError, match="no vote"):
        battle_record(store.get(store.create_battle("q", "terse", "chatty").id))
