"""The Arena's HTTP API on a live server (the real engine on a tiny random Llama), its votes in SQLite.

Both anonymous answers are checked token for token against the same weights in PyTorch (greedy
contestants), which also proves that the names revealed after the vote belong to the answers shown.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from arena_server import MAX_TOKENS, SYSTEMS, arena_server, write_contestants
from jvila.cli import main
from jvila.eval.battles import parse_battles_text
from live_server import MODEL_NAME, raw_request, reference_greedy, tiny_model, tiny_tokenizer


def stream_answers(server, battle_id: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=300)  # the first answers compile
    try:
        conn.request("POST", f"/arena/api/battles/{battle_id}/answers")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def events(raw: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ")]


def expected_answer(hf, tokenizer, name: str, prompt: str) -> str:
    messages = ([{"role": "system", "content": SYSTEMS[name]}] if SYSTEMS[name] else []) + [
        {"role": "user", "content": prompt}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)
    tokens, _ = reference_greedy(hf, ids, MAX_TOKENS, tokenizer.eos_ids)
    return tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    hf, graphdef, state = tiny_model(tokenizer.vocab_size)
    return tokenizer, hf, graphdef, state


def test_battle_streams_anonymous_answers_then_takes_one_vote_and_survives_a_restart(tiny, tmp_path):
    tokenizer, hf, graphdef, state = tiny
    rng = random.Random()
    database = str(tmp_path / "arena.db")
    contestants = write_contestants(tmp_path / "contestants.json")
    prompt = f"Hello {rng.randint(0, 10**6)}! What is the capital of France?"
    with arena_server(tokenizer, graphdef, state, database, contestants) as (server, arena, engine):
        status, created = raw_request(server, "POST", "/arena/api/battles", json.dumps({"prompt": prompt}))
        assert status == 201, created
        battle_id = created["battle_id"]
        status, body = raw_request(server, "POST", f"/arena/api/battles/{battle_id}/vote", '{"winner": "tie"}')
        assert status == 409 and "before both answers" in body["error"]["message"]

        status, raw = stream_answers(server, battle_id)
        assert status == 200
        # Nothing in the stream may name a contestant or the model before the vote.
        for name in (*SYSTEMS, MODEL_NAME):
            assert name not in raw
        received = events(raw)
        assert received[-1] == {"done": True}
        streamed = {side: "".join(e.get("text", "") for e in received if e.get("side") == side) for side in "ab"}
        finals = {e["side"]: e for e in received if e.get("done") and "side" in e}
        assert set(finals) == {"a", "b"} and all(set(e) == {"side", "done", "finish_reason"} for e in finals.values())
        assert {k for e in received for k in e} <= {"side", "text", "done", "finish_reason"}
        assert raw_request(server, "GET", f"/arena/api/battles/{battle_id}")[1]["model_a"] is None
        status, body = stream_answers(server, battle_id)
        assert status == 409 and "already been streamed" in body

        winner = rng.choice(["model_a", "model_b", "tie", "tie (bothbad)"])
        status, voted = raw_request(server, "POST", f"/arena/api/battles/{battle_id}/vote",
                                    json.dumps({"winner": winner}))
        assert status == 200 and voted["winner"] == winner
        assert {voted["model_a"], voted["model_b"]} == set(SYSTEMS)
        # The revealed names belong to the answers shown: each side is its contestant's greedy answer.
        for side in "ab":
            assert streamed[side] == voted[f"answer_{side}"] == expected_answer(hf, tokenizer, voted[f"model_{side}"],
                                                                                 prompt)
        status, body = raw_request(server, "POST", f"/arena/api/battles/{battle_id}/vote", '{"winner": "model_b"}')
        assert status == 409 and "already been voted" in body["error"]["message"]

        # Bad input: clear 4xx answers, and nothing stored.
        before = arena.store.count()
        for path, payload, expected_status, message in (
                (f"/arena/api/battles/{'f' * 32}/vote", {"winner": "tie"}, 404, "no battle"),
                (f"/arena/api/battles/{'f' * 32}/answers", None, 404, "no battle"),
                ("/arena/api/battles", {"prompt": "x" * 8001}, 413, "at most 8000"),
                ("/arena/api/battles", {"prompt": "   "}, 400, "empty"),
                ("/arena/api/battles", {"prompt": "capital " * 150}, 400, "no room for an answer"),
                ("/arena/api/battles", {"text": "hi"}, 400, "prompt"),
                ("/arena/api/battles", "{not json", 400, "")):
            body = payload if isinstance(payload, str) else json.dumps(payload) if payload is not None else None
            status, answer = raw_request(server, "POST", path, body)
            assert status == expected_status and message in answer["error"]["message"], (path, answer)
        assert arena.store.count() == before

        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("GET", "/arena/battles.jsonl")
        exported = conn.getresponse().read().decode()
        conn.close()
        assert engine.metrics()["running"] == 0

    (battle,) = parse_battles_text(exported)
    assert (battle.model_a, battle.model_b, battle.winner) == (voted["model_a"], voted["model_b"], winner)
    # The vote, as any SQLite client finds it.
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT battle_id, winner FROM arena_votes").fetchall() == [(battle_id, winner)]

    # A restarted server on the same database: the vote is there, once, and cannot be cast again.
    with arena_server(tokenizer, graphdef, state, database, contestants) as (server, arena, _):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("GET", "/arena/battles.jsonl")
        assert conn.getresponse().read().decode() == exported
        conn.close()
        status, board = raw_request(server, "GET", "/arena/api/leaderboard")
        assert status == 200 and board["votes"] == 1
        assert sorted(row["model"] for row in board["rows"]) == sorted(SYSTEMS)
        assert all(row["num_battles"] == 1 for row in board["rows"])
        status, body = raw_request(server, "POST", f"/arena/api/battles/{battle_id}/vote", '{"winner": "tie"}')
        assert status == 409

    # The export is what `jvila eval arena` reads.
    path = tmp_path / "battles.jsonl"
    path.write_text(exported)
    done = subprocess.run([sys.executable, "-m", "jvila.cli", "eval", "arena", str(path), "--bootstrap", "10"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "alpha" in done.stdout and "beta" in done.stdout


def _styled_answer(rng: random.Random) -> str:
    lines = [f"{'#' * rng.randint(1, 3)} Title"] * rng.randint(0, 2) + ["- item"] * rng.randint(0, 3)
    return "\n".join(lines + ["**bold** text"] * rng.randint(0, 2) + ["plain words"])


def test_leaderboard_views_and_chart_follow_the_votes(tiny, tmp_path):
    """Votes stored straight into the database are rated as jvila.eval.leaderboard rates the exported battles,
    in each of the three views (Bradley-Terry, with style control, online Elo)."""
    from jvila.eval.leaderboard import leaderboard

    tokenizer, _, graphdef, state = tiny
    rng = random.Random()
    with arena_server(tokenizer, graphdef, state, str(tmp_path / "arena.db"), write_contestants(tmp_path / "c.json")) \
            as (server, arena, _):
        status, board = raw_request(server, "GET", "/arena/api/leaderboard")
        assert status == 200 and board["votes"] == 0 and board["rows"] == []
        assert raw_request(server, "GET", "/arena/leaderboard.png")[0] == 404
        for _ in range(16):
            a, b = rng.sample(sorted(SYSTEMS), 2)
            battle = arena.store.create_battle("q", a, b)
            arena.store.save_answer(battle.id, "a", _styled_answer(rng), rng.randint(1, 200))
            arena.store.save_answer(battle.id, "b", _styled_answer(rng), rng.randint(1, 200))
            arena.store.vote(battle.id, rng.choice(["model_a", "model_b", "tie", "tie (bothbad)"]))
        boards = {query: raw_request(server, "GET", f"/arena/api/leaderboard?{query}")
                  for query in ("method=bt", "method=bt&style_control=true", "method=elo")}
        for query, message in (("method=glicko", "'bt' or 'elo'"), ("method=elo&style_control=true", "Bradley-Terry")):
            status, body = raw_request(server, "GET", f"/arena/api/leaderboard?{query}")
            assert status == 400 and message in body["error"]["message"]
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("GET", "/arena/battles.jsonl")
        battles = parse_battles_text(conn.getresponse().read().decode())
        conn.request("GET", "/arena/leaderboard.png?method=bt&style_control=true")
        chart = conn.getresponse()
        png = chart.read()
        conn.close()
    assert len(battles) == 16
    for query, kwargs in (("method=bt", {"method": "bt"}), ("method=bt&style_control=true",
                                                          {"method": "bt", "style_control": True}),
                          ("method=elo", {"method": "elo"})):
        status, board = boards[query]
        expected = leaderboard(battles, bootstrap_rounds=20, seed=0, **kwargs)
        assert status == 200 and board["votes"] == 16 and board["unavailable"] is None
        assert [(r["model"], r["rank"], r["num_battles"]) for r in board["rows"]] == [
            (r.model, r.rank, r.num_battles) for r in expected]
        for key in ("rating", "lower", "upper"):
            assert [r[key] for r in board["rows"]] == pytest.approx([getattr(r, key) for r in expected], rel=1e-12)
    assert chart.getheader("Content-Type") == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")


def test_without_a_contestants_file_the_contestants_follow_the_served_models(tiny, tmp_path, monkeypatch):
    """The models served at each moment are the contestants (adapters come and go while the server runs)."""
    tokenizer, _, graphdef, state = tiny
    served = [MODEL_NAME, f"{MODEL_NAME}:adapter-1", f"{MODEL_NAME}:adapter-2"]
    monkeypatch.setattr("serving.arena.routes.served_model_names", lambda server: list(served))
    with arena_server(tokenizer, graphdef, state, str(tmp_path / "d.db"), None) as (server, arena, _):
        assert raw_request(server, "GET", "/arena/api/info")[1]["contestants"] == sorted(served)
        served.pop()
        assert raw_request(server, "GET", "/arena/api/info")[1]["contestants"] == sorted(served)
        served.pop()
        status, body = raw_request(server, "POST", "/arena/api/battles", '{"prompt": "hi"}')
        assert status == 503 and "at least two contestants" in body["error"]["message"]
        assert arena.store.count() == (0, 0)
        assert raw_request(server, "GET", "/arena/api/leaderboard")[0] == 200


def test_arena_refuses_a_bad_setup(tiny, tmp_path, capsys):
    tokenizer, _, graphdef, state = tiny
    # One served model and no contestants file: fewer than two contestants.
    with (pytest.raises(ValueError, match="at least two contestants"),
          arena_server(tokenizer, graphdef, state, str(tmp_path / "a.db"), None)):
        pass
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"- {{name: a, model: {MODEL_NAME}}}\n- {{name: b, model: gpt-17}}\n")
    with (pytest.raises(ValueError, match="'gpt-17', which this server does not serve"),
          arena_server(tokenizer, graphdef, state, str(tmp_path / "a.db"), str(unknown))):
        pass
    # The command line checks the Arena's files before loading any model.
    for argv, message in ((["--arena", "--arena-contestants", str(tmp_path / "missing.yaml")], "does not exist"),
                          (["--arena", "--arena-db", str(tmp_path / "no" / "dir.db")], "does not exist"),
                          (["--arena-db", "x.db"], "apply to --arena")):
        assert main(["serve", "--model", str(tmp_path / "not-a-model"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_a_reader_hanging_up_leaves_the_battle_unanswered_and_frees_the_engine(tiny, tmp_path):
    tokenizer, _, graphdef, state = tiny
    with arena_server(tokenizer, graphdef, state, str(tmp_path / "arena.db"), write_contestants(tmp_path / "c.json")) \
            as (server, arena, engine):
        # A pause per engine step: the answers are still being generated when the reader goes away.
        step = engine.step

        def slow_step():
            time.sleep(0.2)
            return step()

        engine.step = slow_step
        status, created = raw_request(server, "POST", "/arena/api/battles", json.dumps({"prompt": "Hello!"}))
        assert status == 201
        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)  # compilations on a busy machine
        conn.request("POST", f"/arena/api/battles/{created['battle_id']}/answers")
        response = conn.getresponse()
        assert response.status == 200 and response.read(13) == b'data: {"side"'
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 120
        while engine.metrics()["running"] or engine.metrics()["waiting"]:
            assert time.monotonic() < deadline, "the engine still runs the answers of a reader who left"
            time.sleep(0.05)
        battle = arena.store.get(created["battle_id"])
        assert battle.answer_a is None or battle.answer_b is None
        assert engine.metrics()["aborted"] >= 1  # stopped in the engine, not left to run to the end
        status, body = raw_request(server, "POST", f"/arena/api/battles/{battle.id}/vote", '{"winner": "tie"}')
        assert status == 409 and "before both answers" in body["error"]["message"]
        assert arena.store.count() == (1, 0)


def test_a_lora_adapter_fights_its_base_model(tiny, tmp_path):
    """Contestants are any served model names: here the base model and a LoRA adapter on the same engine, each
    side's answer equal to its own PyTorch reference (the adapter's made and run by peft)."""
    import copy

    import peft
    import torch
    from flax import nnx

    from serving.adapters.store import AdapterStore, read_peft

    tokenizer, hf, graphdef, state = tiny
    lora = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                       "v_proj"]))
    with torch.no_grad():  # PEFT starts lora_B at zero; random factors make the adapter change the answers
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape) * 0.3)
    lora.save_pretrained(str(tmp_path / "terse"))
    adapters = AdapterStore(nnx.merge(graphdef, state).config, max_rank=8, reader=read_peft)
    adapters.add("terse-lora", adapters.read(str(tmp_path / "terse"), check_root=False))
    contestants = tmp_path / "c.yaml"
    contestants.write_text(f"- {{name: base, model: {MODEL_NAME}, temperature: 0}}\n"
                           "- {name: lora, model: terse-lora, temperature: 0}\n")
    # Longer than a KV page (16 tokens) with the chat template, as most prompts are: the two sides' requests
    # share full prompt pages, which must not let one side reuse KV computed with the other side's weights.
    prompt = f"Hello {random.randint(0, 10**6)}! The quick brown fox jumps over the lazy dog. How are you today?"
    with arena_server(tokenizer, graphdef, state, str(tmp_path / "arena.db"), str(contestants),
                      adapters=adapters) as (server, arena, _):
        status, created = raw_request(server, "POST", "/arena/api/battles", json.dumps({"prompt": prompt}))
        assert status == 201
        status, raw = stream_answers(server, created["battle_id"])
        assert status == 200 and "terse-lora" not in raw
        status, voted = raw_request(server, "POST", f"/arena/api/battles/{created['battle_id']}/vote",
                                    '{"winner": "model_a"}')
        assert status == 200
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True), add_special_tokens=False)
    references = {"base": hf, "lora": lora.eval()}
    answers = {}
    for side in "ab":
        tokens, _ = reference_greedy(references[voted[f"model_{side}"]], ids, MAX_TOKENS, tokenizer.eos_ids)
        answers[voted[f"model_{side}"]] = voted[f"answer_{side}"]
        assert voted[f"answer_{side}"] == tokenizer.decode(tokens, skip_special_tokens=True), (
            f"{voted[f'model_{side}']}'s answer is not its model's (prefix-cache pages shared between the base model "
            "and an adapter? their keys must include the adapter)")
    assert answers["base"] != answers["lora"]  # the adapter is really applied
