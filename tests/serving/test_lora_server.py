"""LoRA adapters over HTTP: vLLM's load/unload endpoints, `model` naming an adapter, /v1/models, the
refusals, and answers equal to the PEFT library's own model in PyTorch.

Adapters are made by `peft` on the tiny random Llama the server runs (lora_B randomised so that
they change the output) and saved in PEFT's format; the reference for a request on an adapter is
that PeftModel, run token by token without a cache.
"""

from __future__ import annotations

import copy
import http.client
import json
import threading

import numpy as np
import peft
import pytest
import torch
from live_server import (
    CONTEXT,
    MODEL_NAME,
    raw_request,
    reference_greedy,
    tiny_model,
    tiny_tokenizer,
)
from tiny_hf import build_tiny_model

from serving.adapters.store import AdapterStore, read_peft
from serving.api_server import ServerThread, create_app
from serving.async_engine import AsyncEngine
from serving.launch import EngineOptions, build_engine, make_scheduler_for

MAX_RANK = 16
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf, path, *, rank, targets, seed, use_rslora=False):
    """A PEFT adapter on a copy of `hf`, lora_B made non-zero, saved at `path`; the PeftModel for reference."""
    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                    target_modules=targets, use_rslora=use_rslora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(str(path))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tokenizer = tiny_tokenizer()
    hf, graphdef, state = tiny_model(tokenizer.vocab_size)
    refs = {
        "alpha": peft_adapter(hf, root / "alpha", rank=8, targets=["q_proj", "v_proj"], seed=1),
        "beta": peft_adapter(hf, root / "beta", rank=16, targets=ALL_MODULES, seed=2, use_rslora=True),
    }
    peft_adapter(hf, root / "too_big", rank=32, targets=["q_proj"], seed=3)
    # Made for a model with a wider MLP: its up_proj matrices do not fit this one.
    other = build_tiny_model("llama", tie=False, vocab_size=tokenizer.vocab_size,
                             intermediate_size=hf.config.intermediate_size + 8)
    peft_adapter(other, root / "misfit", rank=4, targets=["up_proj"], seed=4)
    (root / "empty").mkdir()

    store = AdapterStore(hf_config_of(graphdef, state), max_rank=MAX_RANK, root=str(root), reader=read_peft)
    store.add("alpha", store.read(str(root / "alpha"), check_root=False))  # what `jvila serve --lora` does
    options = EngineOptions(num_pages=96, page_size=16, max_running=4, token_budget=16, max_context=CONTEXT)
    engine = build_engine(graphdef, state, tokenizer, scheduler=make_scheduler_for("vtc"), options=options,
                          adapters=store)
    app = create_app(AsyncEngine(engine), tokenizer, model_name=MODEL_NAME, max_context=engine.max_context,
                     vocab_size=engine.vocab_size)
    server = ServerThread(app).start()
    try:
        yield server, engine, tokenizer, hf, refs, root
    finally:
        server.stop()


def hf_config_of(graphdef, state):
    from flax import nnx

    return nnx.merge(graphdef, state).config


def complete(server, model, prompt, max_tokens=5):
    status, body = raw_request(server, "POST", "/v1/completions", json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
         "logprobs": 0}))
    return status, body


def tokens_of(body, tokenizer):
    return [tokenizer.encode(t, add_special_tokens=False) for t in body["choices"][0]["logprobs"]["tokens"]]


def expect(server, tokenizer, model, reference, prompt, max_tokens=5):
    status, body = complete(server, model, prompt, max_tokens)
    assert status == 200, body
    want, _ = reference_greedy(reference, prompt, max_tokens)
    assert body["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True), model
    return want


def post(server, path, payload):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_adapters_load_serve_and_unload_over_http(setup):
    server, engine, tokenizer, hf, refs, _root = setup
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, tokenizer.vocab_size, 9)]

    status, body = raw_request(server, "GET", "/v1/models")
    assert [c["id"] for c in body["data"]] == [MODEL_NAME, "alpha"] and body["data"][1]["parent"] == MODEL_NAME
    base = expect(server, tokenizer, MODEL_NAME, hf, prompt)
    assert expect(server, tokenizer, "alpha", refs["alpha"], prompt) != base  # the adapter matters

    status, text = post(server, "/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "beta"})
    assert status == 200 and text == "Success: LoRA adapter 'beta' added successfully."
    assert "beta" in [c["id"] for c in raw_request(server, "GET", "/v1/models")[1]["data"]]
    assert expect(server, tokenizer, "beta", refs["beta"], prompt) != base
    # Without API keys, each adapter is a client of the fair scheduler.
    assert {"alpha", "beta"} <= set(engine.scheduler.service())

    status, text = post(server, "/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert status == 200 and "removed" in text
    status, body = complete(server, "beta", prompt)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert engine.metrics()["adapters_loaded"] == 1


def test_refusals_are_4xx_and_disturb_nothing(setup):
    server, engine, tokenizer, hf, refs, _root = setup
    prompt = [5, 9, 14, 20, 33, 41]
    free_before = engine.allocator.num_free
    cases = [
        ({"lora_name": "x", "lora_path": "../elsewhere"}, "outside the adapter root"),
        ({"lora_name": "x", "lora_path": "missing"}, "not a directory"),
        ({"lora_name": "x", "lora_path": "empty"}, "adapter_config.json"),
        ({"lora_name": "x", "lora_path": "too_big"}, "rank 32"),
        ({"lora_name": "x", "lora_path": "misfit"}, "up_proj"),
        ({"lora_name": "alpha", "lora_path": "alpha"}, "already loaded"),
        ({"lora_name": MODEL_NAME, "lora_path": "alpha"}, "base model"),
    ]
    for payload, message in cases:
        status, text = post(server, "/v1/load_lora_adapter", payload)
        assert status == 400, (payload, text)
        assert message in json.loads(text)["error"]["message"], (payload, text)
    status, text = post(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and "lora_path" in text
    status, text = post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert status == 404 and json.loads(text)["error"]["code"] == "adapter_not_found"
    status, _body = complete(server, "nope", prompt)
    assert status == 404

    # Unloading an adapter a request is using: 409, and that request still finishes correctly.
    result = {}

    def long_request():
        result["out"] = complete(server, "alpha", prompt, max_tokens=40)

    thread = threading.Thread(target=long_request)
    thread.start()
    refused = None
    for _ in range(400):
        if engine.adapters.requests_using("alpha"):
            refused = post(server, "/v1/unload_lora_adapter", {"lora_name": "alpha"})
            break
        threading.Event().wait(0.01)
    thread.join()
    assert refused is not None and refused[0] == 409 and "in use" in refused[1]
    want, _ = reference_greedy(refs["alpha"], prompt, 40)
    assert result["out"][0] == 200
    assert result["out"][1]["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert [c["id"] for c in raw_request(server, "GET", "/v1/models")[1]["data"]] == [MODEL_NAME, "alpha"]
    expect(server, tokenizer, MODEL_NAME, hf, prompt)
    assert engine.allocator.num_free == free_before  # no pages leaked by the refusals


def test_serve_refuses_bad_lora_flags_before_loading_anything(tmp_path, capsys):
    from jvila.cli import main

    assert main(["serve", "--model", str(tmp_path / "no-model"), "--lora", "no-equals-sign"]) == 2
    assert "--lora takes NAME=PATH" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--lora", "a=x", "--lora", "a=y"]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--lora-root", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--lora", "a=x", "--max-lora-rank", "0"]) == 2
    assert "--max-lora-rank" in capsys.readouterr().err
