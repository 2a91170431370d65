"""The OpenAI-compatible server with the official `openai` client against a live server on loopback.

The server runs the real engine on a tiny random Llama; every answer is checked against the same
weights in PyTorch, run token by token without a cache (tests/live_server.py). The first tests
check the HTTP layer's pure parts (text streaming, protocol, keys, images) on their own.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time

import numpy as np
import openai
import PIL.Image
import pytest
import torch

from jvila.cli import main
from live_server import (
    CONTEXT,
    MODEL_NAME,
    NUM_PAGES,
    live_server,
    raw_request,
    read_metrics,
    reference_greedy,
    start_serve_process,
    stop_serve_process,
    tiny_model,
    tiny_tokenizer,
)
from serving.api_keys import ApiKeys
from serving.image_urls import ImageURLError, decode_image_url
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest
from serving.text_stream import IncrementalText

KEY_ALICE, KEY_BOB = "sk-alice-7f3a", "sk-bob-91c2"


# ---- pure parts ---------------------------------------------------------------------------------


def _letters(ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_incremental_text_holds_back_partial_stops_and_characters():
    rng = np.random.default_rng()
    ids = [int(t) for t in rng.integers(0, 26, 40)]
    text = _letters(ids)
    stop = text[17:20]  # spans several tokens (one letter per token)
    stream = IncrementalText(_letters, stop=["#never#", stop])
    sent = "".join(stream.add([t]) for t in ids) + stream.finish()
    assert sent == text[: text.find(stop)] and stream.stopped
    assert stream.add([1, 2]) == "" and stream.finish() == ""  # nothing after the stop

    # Multi-byte characters split across tokens: nothing sent until the character is whole.
    raw = "né🙂x".encode()

    def decode(byte_ids):
        return bytes(byte_ids).decode("utf-8", errors="replace")

    stream = IncrementalText(decode)
    pieces = [stream.add([b]) for b in raw]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + stream.finish() == "né🙂x"
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes

    # A decoder whose output depends on the previous token (words joined by spaces, as SentencePiece
    # drops the first word's space): the windowed decoding still sends exactly the full text.
    words = [str(w) for w in rng.integers(0, 1000, 30)]

    def join(word_ids):
        return " ".join(words[i] for i in word_ids)

    stream = IncrementalText(join)
    sent = "".join(stream.add([i]) for i in range(30)) + stream.finish()
    assert sent == join(range(30))

    # A partial stop string at the end is sent once the generation ends without completing it.
    stream = IncrementalText(_letters, stop=["xyz"])
    assert stream.add([0, 23]) == "a" and stream.add([24]) == "" and stream.finish() == "xy"


def test_request_models_refuse_bad_values():
    good = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest(**good).n == 1
    for bad in ({"temperature": 2.5}, {"temperature": -0.1}, {"max_tokens": -3}, {"max_tokens": 0}, {"top_p": 0},
                {"n": 0}, {"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21}, {"messages": []},
                {"stop": [""]}, {"presence_penalty": 0.5}, {"tools": [{"type": "function"}]}):
        with pytest.raises(ValueError):
            ChatCompletionRequest(**(good | bad))
    assert CompletionRequest(model="m", prompt=[5, 6]).prompts == [[5, 6]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts == ["a", "b"]
    with pytest.raises(ValueError, match="echo"):
        CompletionRequest(model="m", prompt="a", echo=True, logprobs=1)


def test_api_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({KEY_ALICE: {"client": "alice", "weight": 2}, "k2": {"client": "alice", "weight": 2},
                                KEY_BOB: {"client": "bob"}}))
    keys = ApiKeys.from_file(path)
    assert keys.client_for(KEY_ALICE).name == keys.client_for("k2").name == "alice"
    assert keys.client_for(KEY_BOB).weight == 1.0 and keys.weights == {"alice": 2.0, "bob": 1.0}
    assert keys.client_for("sk-unknown") is None and keys.client_for(None) is None and keys.client_for("") is None
    for table, message in (([1, 2], "JSON object"), ({"k": {"weight": 1}}, "client"),
                           ({"k": {"client": "a", "weight": 0}}, "positive"),
                           ({"k": {"client": "a", "weight": 1}, "j": {"client": "a", "weight": 2}}, "two different")):
        path.write_text(json.dumps(table))
        with pytest.raises(ValueError, match=message):
            ApiKeys.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ApiKeys.from_file(path)


def _png_data_url(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_urls_decode_only_data_urls_holding_images():
    pixels = np.random.default_rng().integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_image_url(_png_data_url(pixels))), pixels)
    truncated = _png_data_url(pixels)[:-40]
    for url, message in (("https://example.com/cat.png", "only data: URLs"), ("/etc/passwd", "only data: URLs"),
                         ("data:image/png;base64,@@@@", "base64"), ("data:text/plain;base64,aGk=", "not an image"),
                         ("data:image/png,rawbytes", "base64-encoded"),
                         ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "image"),
                         (truncated[: len(truncated) // 4 * 4], "image")):
        with pytest.raises(ImageURLError, match=message):
            decode_image_url(url)


def test_serve_refuses_a_bad_keys_file_before_loading_anything(tmp_path, capsys):
    assert main(["serve", "--api-keys", str(tmp_path / "missing.json")]) == 2
    assert "jvila: error:" in capsys.readouterr().err
    assert main(["serve", "--scheduler", "rpm"]) == 2
    assert "--rpm-limit" in capsys.readouterr().err


# ---- the live server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    tokenizer = tiny_tokenizer()
    hf, graphdef, state = tiny_model(tokenizer.vocab_size)
    keys = ApiKeys.from_dict({KEY_ALICE: {"client": "alice", "weight": 2.0}, KEY_BOB: {"client": "bob"}})
    with live_server(tokenizer, graphdef, state, api_keys=keys, scheduler="vtc") as (server, app, engine):
        yield dict(server=server, app=app, engine=engine, tokenizer=tokenizer, hf=hf)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["server"].url + "/v1", api_key=KEY_ALICE, max_retries=0, timeout=120)


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def expected(served, prompt_ids, max_tokens, *, ignore_eos=False, top=0):
    eos = () if ignore_eos else served["tokenizer"].eos_ids
    ids, tops = reference_greedy(served["hf"], prompt_ids, max_tokens, eos, top=top)
    finish = "stop" if ids[-1] in eos else "length"
    return ids, served["tokenizer"].decode(ids), finish, tops


SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}
USER = {"role": "user", "content": "Hello! What is the capital of France?"}


def test_chat_greedy_matches_the_reference_with_and_without_a_system_prompt(served, client):
    for messages in ([SYSTEM, USER], [USER]):
        prompt = chat_ids(served["tokenizer"], messages)
        ids, text, finish, _ = expected(served, prompt, 12)
        response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
        (choice,) = response.choices
        assert choice.message.role == "assistant" and choice.message.content == text
        assert choice.finish_reason == finish
        assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == len(ids)
        assert response.usage.total_tokens == len(prompt) + len(ids)
        assert response.model == MODEL_NAME and response.object == "chat.completion"


def test_streaming_chat_sends_the_same_text_in_pieces(served, client):
    prompt = chat_ids(served["tokenizer"], [SYSTEM, USER])
    ids, text, _, _ = expected(served, prompt, 16, ignore_eos=True)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=[SYSTEM, USER], max_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == text
    assert sum(1 for piece in content if piece) > 1  # streamed, not sent at the end in one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    assert len({c.id for c in chunks}) == 1


def test_completions_from_text_and_token_prompts_with_echo(served, client):
    tokenizer = served["tokenizer"]
    text_prompt = "The quick brown fox"
    prompt = tokenizer.encode(text_prompt)
    ids, text, finish, _ = expected(served, prompt, 9)
    response = client.completions.create(model=MODEL_NAME, prompt=text_prompt, max_tokens=9, temperature=0)
    assert response.choices[0].text == text and response.choices[0].finish_reason == finish
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == len(ids)

    rng = np.random.default_rng()
    token_prompt = [int(t) for t in rng.integers(3, tokenizer.vocab_size, 21)]
    ids, text, _, _ = expected(served, token_prompt, 7, ignore_eos=True)
    response = client.completions.create(model=MODEL_NAME, prompt=token_prompt, max_tokens=7, temperature=0,
                                         echo=True, extra_body={"ignore_eos": True})
    assert response.choices[0].text == tokenizer.decode(token_prompt, skip_special_tokens=False) + text

    # Several prompts: choices in prompt order, prompt tokens summed.
    response = client.completions.create(model=MODEL_NAME, prompt=[text_prompt, "Hello world"], max_tokens=4,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[1].text == expected(served, tokenizer.encode("Hello world"), 4, ignore_eos=True)[1]
    assert response.usage.prompt_tokens == len(prompt) + len(tokenizer.encode("Hello world"))


def test_n_choices_are_seeded_samples_like_single_requests(served, client):
    sampling = dict(model=MODEL_NAME, messages=[USER], max_tokens=10, temperature=1.2, top_p=0.95,
                    extra_body={"top_k": 50, "ignore_eos": True})
    both = client.chat.completions.create(n=2, seed=1234, **sampling)
    assert [c.index for c in both.choices] == [0, 1] and both.usage.completion_tokens == 20
    # Choice k draws with seed + k: the same as a one-choice request with that seed, streamed or not.
    for k in (0, 1):
        alone = client.chat.completions.create(seed=1234 + k, **sampling)
        assert alone.choices[0].message.content == both.choices[k].message.content
    streamed = client.chat.completions.create(n=2, seed=1234, stream=True, **sampling)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in both.choices]


def test_stop_strings_cut_the_text_and_end_the_request(served, client):
    prompt = chat_ids(served["tokenizer"], [USER])
    _, text, _, _ = expected(served, prompt, 24, ignore_eos=True)
    # A stop string of two characters from the middle of the free-running text (whole characters only).
    spots = [i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2]]
    stop = text[spots[len(spots) // 2]: spots[len(spots) // 2] + 2]
    cut = text[: text.find(stop)]
    args = dict(model=MODEL_NAME, messages=[USER], max_tokens=24, temperature=0, stop=["@@never@@", stop],
                extra_body={"ignore_eos": True})
    response = client.chat.completions.create(**args)
    assert response.choices[0].message.content == cut and response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 24
    pieces, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == cut and finish == "stop"


def test_max_tokens_ends_with_length(served, client):
    response = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 5


def test_logprobs_match_the_reference(served, client):
    tokenizer = served["tokenizer"]
    prompt = chat_ids(tokenizer, [USER])
    ids, _, _, tops = expected(served, prompt, 6, ignore_eos=True, top=3)
    response = client.chat.completions.create(model=MODEL_NAME, messages=[USER], max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 6
    # The engine computes in float32, the reference's log-softmax in float64 from float32 logits:
    # they agree to float32 rounding of values of a few units.
    for entry, token, (top_ids, top_values) in zip(content, ids, tops):
        assert entry.token == tokenizer.decode([token], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(top_values[0], abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t], skip_special_tokens=False)
                                                         for t in top_ids]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], top_values, atol=1e-4)

    response = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    np.testing.assert_allclose(logprobs.token_logprobs, [values[0] for _, values in tops], atol=1e-4)
    for got, (top_ids, top_values) in zip(logprobs.top_logprobs, tops):
        want = {tokenizer.decode([t], skip_special_tokens=False): v for t, v in zip(top_ids[:2], top_values[:2])}
        assert got.keys() == want.keys()  # two ids may decode alike (partial characters): keyed as OpenAI does
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], atol=1e-4)
    # Each token's offset is where its text starts in the choice's text.
    assert logprobs.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(6)]
    assert response.choices[0].text == tokenizer.decode(ids)


def test_bad_requests_get_openai_error_bodies(served):
    server, tokenizer = served["server"], served["tokenizer"]
    auth = {"Authorization": f"Bearer {KEY_ALICE}"}
    chat = {"model": MODEL_NAME, "messages": [USER]}
    pixels = np.random.default_rng().integers(0, 256, (6, 6, 3), dtype=np.uint8)

    def image_message(url):
        return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    cases = [
        ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', 400, None, "JSON"),
        ("/v1/chat/completions", chat | {"model": "gpt-9"}, 404, "model_not_found", "gpt-9"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [7] * (CONTEXT + 9)}, 400, "context_length_exceeded",
         str(CONTEXT)),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [7] * (CONTEXT - 20), "max_tokens": 30}, 400,
         "context_length_exceeded", str(CONTEXT + 10)),
        ("/v1/chat/completions", chat | {"max_tokens": -5}, 400, None, "max_tokens"),
        ("/v1/chat/completions", chat | {"temperature": 2.5}, 400, None, "temperature"),
        ("/v1/chat/completions", chat | {"messages": image_message("data:image/png;base64,%%%")}, 400,
         "invalid_image", "base64"),
        ("/v1/chat/completions", chat | {"messages": image_message("http://example.com/a.png")}, 400,
         "invalid_image", "data: URLs"),
        ("/v1/chat/completions", chat | {"messages": image_message(_png_data_url(pixels))}, 400,
         "model_is_text_only", "text-only"),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [1, tokenizer.vocab_size + 3]}, 400, None, "vocabulary"),
        ("/v1/chat/completions", {"model": MODEL_NAME}, 400, None, "messages"),
        ("/v1/nowhere", {}, 404, None, "Not Found"),
    ]
    for path, body, status, code, fragment in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body)
        got_status, got = raw_request(server, "POST", path, raw, headers=auth)
        assert got_status == status, (path, body, got)
        assert set(got["error"]) == {"message", "type", "param", "code"}, got
        assert got["error"]["code"] == code and fragment in got["error"]["message"], got
    # The official client raises its own typed errors from these bodies.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY_ALICE, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL_NAME, messages=[USER], temperature=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[USER])
    assert raw_request(server, "GET", "/health")[0] == 200  # and the server goes on


def test_api_keys_are_required_and_name_the_client(served):
    server = served["server"]
    for key in (None, "sk-wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        status, body = raw_request(server, "POST", "/v1/chat/completions",
                                   json.dumps({"model": MODEL_NAME, "messages": [USER]}), headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    bob = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY_BOB, max_retries=0, timeout=60)
    assert [m.id for m in bob.models.list().data] == [MODEL_NAME]
    before = read_metrics(server).get(f'jvila_client_service{{model="{MODEL_NAME}",client="bob"}}', 0.0)
    bob.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=3, temperature=0,
                           extra_body={"ignore_eos": True})
    after = read_metrics(server)[f'jvila_client_service{{model="{MODEL_NAME}",client="bob"}}']
    assert after >= before + 3  # bob's prompt and output tokens are charged to bob, not to alice
    # The keys file's weights reach the VTC scheduler.
    scheduler = served["engine"].scheduler
    assert scheduler.weight("alice") == 2.0 and scheduler.weight("bob") == 1.0
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok"})  # no key needed


def test_metrics_are_prometheus_text_and_pages_come_back(served, client):
    for _ in range(2):  # the second time, the shared system prompt's pages are found in the pool
        client.chat.completions.create(model=MODEL_NAME, messages=[SYSTEM, USER], max_tokens=4, temperature=0)
    samples = read_metrics(served["server"])
    label = f'{{model="{MODEL_NAME}"}}'
    for name in ("queue_length", "running_requests", "pages_used", "pages_shared", "pages_free", "pages_total",
                 "output_tokens_per_second", "generated_tokens_total", "prefix_hit_tokens_total"):
        assert f"jvila_{name}{label}" in samples, name
    assert samples[f"jvila_running_requests{label}"] == 0
    assert samples[f"jvila_pages_free{label}"] == samples[f"jvila_pages_total{label}"] == NUM_PAGES
    assert samples[f"jvila_prefix_hit_tokens_total{label}"] > 0  # the system prompt's pages were reused
    assert samples['jvila_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1


def _stream_then_hang_up(server, body: dict, *, lines: int) -> list[str]:
    """Start a streamed request, read `lines` SSE data lines, then close the connection."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY_ALICE}"})
    response = conn.getresponse()
    assert response.status == 200
    got = []
    while len(got) < lines:
        line = response.fp.readline().decode()
        assert line, "the stream ended early"
        if line.startswith("data: "):
            got.append(line)
    conn.sock.shutdown(2)
    conn.close()
    return got


def wait_for_idle(server, timeout_s: float = 60.0) -> dict[str, float]:
    label = f'{{model="{MODEL_NAME}"}}'
    deadline = time.monotonic() + timeout_s
    while True:
        samples = read_metrics(server)
        if samples[f"jvila_running_requests{label}"] == 0 and samples[f"jvila_queue_length{label}"] == 0:
            return samples
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.1)


def test_a_client_leaving_mid_stream_aborts_its_request(served):
    server = served["server"]
    label = f'{{model="{MODEL_NAME}"}}'
    before = wait_for_idle(server)
    longest = CONTEXT - len(chat_ids(served["tokenizer"], [USER]))  # as long as the context allows
    body = {"model": MODEL_NAME, "messages": [USER], "max_tokens": longest, "temperature": 0, "stream": True,
            "ignore_eos": True}
    _stream_then_hang_up(server, body, lines=3)
    after = wait_for_idle(server)
    assert after[f"jvila_aborted_requests_total{label}"] == before[f"jvila_aborted_requests_total{label}"] + 1
    assert after[f"jvila_generated_tokens_total{label}"] - before[f"jvila_generated_tokens_total{label}"] < longest
    assert after[f"jvila_pages_free{label}"] == after[f"jvila_pages_total{label}"]
    assert after[f"jvila_client_disconnects_total{label}"] == before[f"jvila_client_disconnects_total{label}"] + 1


def test_images_reach_the_media_seam_as_input_embeddings(served, client):
    """A media prompt builder (the NVILA path's seam) turns an image into embeddings the engine serves."""
    tokenizer, hf = served["tokenizer"], served["hf"]
    pixels = np.random.default_rng().integers(0, 256, (4, 4, 3), dtype=np.uint8)
    hidden = hf.config.hidden_size
    placeholder = tokenizer.token_to_id("<|endoftext|>")
    seen = []

    def media_prompt(messages):
        (message,) = messages
        image = next(p["image"] for p in message["content"] if p["type"] == "image")
        seen.append(np.asarray(image))
        text = next(p["text"] for p in message["content"] if p["type"] == "text")
        ids = chat_ids(tokenizer, [{"role": "user", "content": "<|endoftext|>" * 3 + text}])
        mask = np.asarray(ids) == placeholder
        embeddings = np.zeros((len(ids), hidden), np.float32)
        embeddings[mask] = np.resize(pixels.astype(np.float32) / 255 - 0.5, (int(mask.sum()), hidden))
        return ids, embeddings, mask

    state = served["app"].state.server
    state.media_prompt = media_prompt
    try:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url(pixels)}},
                                                 {"type": "text", "text": "Describe it."}]}]
        response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                                  extra_body={"ignore_eos": True})
    finally:
        state.media_prompt = None
    np.testing.assert_array_equal(seen[0], pixels)
    ids, embeddings, mask = media_prompt([{"role": "user", "content": [{"type": "image", "image": seen[0]},
                                                                        {"type": "text", "text": "Describe it."}]}])
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(torch.tensor(ids))
        embeds[torch.from_numpy(mask)] = torch.from_numpy(embeddings[mask])
    want, _ = reference_greedy(hf, ids, 8, (), inputs_embeds=embeds)
    assert response.choices[0].message.content == tokenizer.decode(want)
    assert response.usage.prompt_tokens == len(ids)


def test_a_rate_limited_client_gets_429(served):
    """Under the RPM scheduler, a client past its requests per minute is refused with OpenAI's 429."""
    with live_server(served["tokenizer"], *tiny_model(served["tokenizer"].vocab_size)[1:], scheduler="rpm",
                     rpm_limit=2) as (server, _, engine):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        for _ in range(2):
            client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, temperature=0)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=2, temperature=0)
        assert refused.value.body["code"] == "rate_limit_exceeded"
        assert engine.metrics()["waiting"] == 0 and raw_request(server, "GET", "/health")[0] == 200


def test_jvila_serve_command_end_to_end(tmp_path):
    """`jvila serve` on an HF directory in a child process: it answers, then stops cleanly on Ctrl-C."""
    tokenizer = tiny_tokenizer()
    hf, _, _ = tiny_model(tokenizer.vocab_size)
    model_dir = tmp_path / "tiny-hf"
    hf.save_pretrained(model_dir)
    backend = tokenizer.backend.to_str()
    (model_dir / "tokenizer.json").write_text(backend)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template}))
    proc, log_lines, ready = start_serve_process(["--model", str(model_dir), "--served-name", "tiny", "--port", "0",
                                                  "--num-pages", "40", "--page-size", "8", "--scheduler", "fcfs"])
    try:
        assert ready.wait(180), "".join(log_lines)[-3000:]
        url = re.search(r"Uvicorn running on (http://\S+)", "".join(log_lines)).group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        response = client.chat.completions.create(model="tiny", messages=[USER], max_tokens=6, temperature=0)
        ids, _ = reference_greedy(hf, chat_ids(tokenizer, [USER]), 6, tokenizer.eos_ids)
        assert response.choices[0].message.content == tokenizer.decode(ids)
    finally:
        code = stop_serve_process(proc)
    assert code == 0, "".join(log_lines)[-3000:]
