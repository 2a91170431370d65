"""A bounded load on the live server: hundreds of requests from concurrent clients, some malformed, some
hanging up mid-request. Every valid request must get exactly the reference answer, every bad one an
OpenAI error body, and afterwards no page may be held and the server must be healthy.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import random
import time

import numpy as np
import openai
import pytest

from live_server import (
    CONTEXT,
    MODEL_NAME,
    NUM_PAGES,
    live_server,
    raw_request,
    read_metrics,
    reference_greedy,
    tiny_model,
    tiny_tokenizer,
)

NUM_VALID = 150
NUM_MALFORMED = 40
NUM_STREAM_HANGUPS = 16
NUM_BLOCKING_HANGUPS = 8
WORKERS = 16
DEADLINE_S = 420  # the whole load; it takes well under a minute on two CPU cores
LABEL = f'{{model="{MODEL_NAME}"}}'

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}
QUESTIONS = ["Hello world!", "How are you today?", "What is the capital of Italy?", "Count: 0123456789",
             "The quick brown fox?", "Thank you, I am fine."]


@pytest.fixture(scope="module")
def served():
    tokenizer = tiny_tokenizer()
    hf, graphdef, state = tiny_model(tokenizer.vocab_size)
    with live_server(tokenizer, graphdef, state, scheduler="vtc") as (server, app, engine):
        yield dict(server=server, tokenizer=tokenizer, hf=hf)


def _valid_jobs(rng: random.Random, tokenizer, hf):
    """(kind, request kwargs, expected text, expected finish) for every valid request, references computed once."""
    references = {}

    def reference(prompt_ids, max_tokens):
        key = (tuple(prompt_ids), max_tokens)
        if key not in references:
            ids, _ = reference_greedy(hf, prompt_ids, max_tokens, tokenizer.eos_ids)
            references[key] = (tokenizer.decode(ids), "stop" if ids[-1] in tokenizer.eos_ids else "length")
        return references[key]

    jobs = []
    for _ in range(NUM_VALID):
        kind = rng.choice(["chat", "chat_stream", "completion", "completion_stream"])
        question, max_tokens = rng.choice(QUESTIONS), rng.choice([3, 6, 9])
        if kind.startswith("chat"):
            # Most chats share the system prompt: their first pages are shared in the pool.
            messages = ([SYSTEM] if rng.random() < 0.7 else []) + [{"role": "user", "content": question}]
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
            kwargs = dict(messages=messages)
        else:
            prompt = tokenizer.encode(question)
            kwargs = dict(prompt=question)
        kwargs |= dict(model=MODEL_NAME, max_tokens=max_tokens, temperature=0, stream=kind.endswith("stream"))
        jobs.append((kind, kwargs, *reference(prompt, max_tokens)))
    return jobs


def _run_valid(client: openai.OpenAI, kind: str, kwargs: dict):
    if kind == "chat":
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    if kind == "completion":
        choice = client.completions.create(**kwargs).choices[0]
        return choice.text, choice.finish_reason
    text, finish = "", None
    create = client.chat.completions.create if kind == "chat_stream" else client.completions.create
    for chunk in create(**kwargs):
        for choice in chunk.choices:
            text += (choice.delta.content or "") if kind == "chat_stream" else choice.text
            finish = choice.finish_reason or finish
    return text, finish


MALFORMED = [
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user"', 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": -1}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                              "temperature": 9}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [5] * (CONTEXT + 10)}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64"}}]}]}, 400),
    ("/v1/completions", {"model": MODEL_NAME}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 0}, 400),
]


def _run_malformed(server, path, body):
    raw = body if isinstance(body, bytes) else json.dumps(body)
    return raw_request(server, "POST", path, raw)


def _hang_up(server, *, stream: bool, tokenizer):
    """Ask for as long an answer as the context allows, then leave: after two SSE lines, or at once."""
    messages = [{"role": "user", "content": "Tell me a long story."}]
    prompt_len = len(tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False))
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": CONTEXT - prompt_len, "temperature": 0,
            "stream": stream, "ignore_eos": True}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        if stream:
            response = conn.getresponse()
            assert response.status == 200
            lines = 0
            while lines < 2:
                line = response.fp.readline()
                assert line, "the stream ended before the client left"
                lines += line.startswith(b"data: ")
        conn.sock.shutdown(2)
    finally:
        conn.close()


def test_hundreds_of_mixed_requests(served):
    server, tokenizer = served["server"], served["tokenizer"]
    rng = random.Random(np.random.SeedSequence().entropy)
    valid = _valid_jobs(rng, tokenizer, served["hf"])
    before = read_metrics(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=DEADLINE_S)

    tasks = [("valid", job) for job in valid]
    tasks += [("malformed", rng.choice(MALFORMED)) for _ in range(NUM_MALFORMED)]
    tasks += [("hangup_stream", None)] * NUM_STREAM_HANGUPS + [("hangup_blocking", None)] * NUM_BLOCKING_HANGUPS
    rng.shuffle(tasks)

    def run(task):
        kind, job = task
        if kind == "valid":
            return _run_valid(client, job[0], job[1])
        if kind == "malformed":
            return _run_malformed(server, job[0], job[1])
        return _hang_up(server, stream=kind == "hangup_stream", tokenizer=tokenizer)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(run, task) for task in tasks]
        done, not_done = concurrent.futures.wait(futures, timeout=DEADLINE_S)
        assert not not_done, f"{len(not_done)} requests unanswered after {DEADLINE_S}s"
    wrong = []
    for (kind, job), future in zip(tasks, futures):
        result = future.result()
        if kind == "valid" and result != (job[2], job[3]):
            wrong.append((job[0], job[1], result, job[2:]))
        elif kind == "malformed":
            status, body = result
            if status != job[2] or set(body.get("error", {})) != {"message", "type", "param", "code"}:
                wrong.append((job, status, body))
    assert not wrong, wrong[:5]

    after = _wait_for_idle(server)
    assert after[f"jvila_pages_free{LABEL}"] == after[f"jvila_pages_total{LABEL}"] == NUM_PAGES  # nothing leaked
    assert after[f"jvila_pages_used{LABEL}"] == 0
    aborted = after[f"jvila_aborted_requests_total{LABEL}"] - before[f"jvila_aborted_requests_total{LABEL}"]
    # Streams left after two lines were running; a blocking request may be refused before it reached the engine.
    assert NUM_STREAM_HANGUPS <= aborted <= NUM_STREAM_HANGUPS + NUM_BLOCKING_HANGUPS
    finished = after[f"jvila_finished_requests_total{LABEL}"] - before[f"jvila_finished_requests_total{LABEL}"]
    assert finished == NUM_VALID
    assert after[f"jvila_prefix_hit_tokens_total{LABEL}"] > before[f"jvila_prefix_hit_tokens_total{LABEL}"]
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok"})
    # And it still answers.
    kind, kwargs, text, finish = valid[0]
    assert _run_valid(client, kind, kwargs) == (text, finish)


def _wait_for_idle(server, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        samples = read_metrics(server)
        if samples[f"jvila_running_requests{LABEL}"] == 0 and samples[f"jvila_queue_length{LABEL}"] == 0:
            return samples
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.1)
