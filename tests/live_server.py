"""A tiny chat model served over HTTP on loopback, and an independent reference for what it must answer.

Everything is built offline in a second: a byte-level BPE tokenizer trained on a few sentences
(with ChatML special tokens and template), a tiny random Hugging Face Llama converted to jvila,
and the real engine behind the OpenAI-compatible server in a background thread. The reference is
the PyTorch model itself, run token by token without any cache.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import tokenizers
import torch
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from jvila.processing.tokenizer import Tokenizer
from serving.api_server import ServerThread, create_app
from serving.async_engine import AsyncEngine
from serving.launch import EngineOptions, build_engine, make_scheduler_for
from tiny_hf import build_tiny_model, to_jvila

MODEL_NAME = "tiny-chat"
CONTEXT = 128
NUM_PAGES = 64
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer in one short sentence.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ?",
]


def tiny_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """Byte-level BPE (every byte representable) with <|endoftext|>, <|im_start|>, <|im_end|> and ChatML."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer)
    config = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML}
    return Tokenizer.from_files({"tokenizer.json": backend.to_str(), "tokenizer_config.json": json.dumps(config)})


def tiny_model(vocab_size: int):
    """(torch model, jvila graphdef, jvila state): the same fresh random weights on both sides."""
    hf = build_tiny_model("llama", tie=False, vocab_size=vocab_size, max_position_embeddings=CONTEXT)
    return hf, *nnx.split(to_jvila(hf))


@torch.no_grad()
def reference_greedy(hf, prompt_ids: list[int], max_tokens: int, eos_ids=(), *, top: int = 0,
                     inputs_embeds: torch.Tensor | None = None):
    """Greedy tokens (an EOS is kept and ends the run) and each step's log-softmax top-`top` (ids, values).

    Without a cache: each step runs the whole sequence again, a different path from the engine's paged one.
    """
    with _one_torch_thread():
        return _greedy(hf, list(prompt_ids), max_tokens, eos_ids, top, inputs_embeds)


@contextlib.contextmanager
def _one_torch_thread():
    # A tiny model gains nothing from threads, and on a busy two-core machine they thrash (30x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _greedy(hf, ids, max_tokens, eos_ids, top, embeds):
    out, tops = [], []
    for _ in range(max_tokens):
        if embeds is None:
            logits = hf(input_ids=torch.tensor([ids])).logits[0, -1]
        else:
            logits = hf(inputs_embeds=embeds[None]).logits[0, -1]
        log_probs = torch.log_softmax(logits.double(), -1).numpy()
        token = int(np.argmax(log_probs))
        order = np.argsort(-log_probs)[:top]
        tops.append((order.tolist(), log_probs[order].tolist()))
        out.append(token)
        ids.append(token)
        if embeds is not None:
            embeds = torch.cat([embeds, hf.get_input_embeddings()(torch.tensor([token]))])
        if token in eos_ids:
            break
    return out, tops


@contextlib.contextmanager
def live_server(tokenizer, graphdef, state, *, api_keys=None, scheduler: str = "fcfs",
                num_pages: int = NUM_PAGES, page_size: int = 16, max_running: int = 4, token_budget: int = 8,
                media_prompt=None, rpm_limit: int | None = None):
    """The real engine behind the HTTP server on 127.0.0.1 (a free port); stopped on exit.

    The defaults keep the step's bucket shapes few (each is one compilation) and equal across test
    modules, so that one process compiles each shape once.
    """
    options = EngineOptions(num_pages=num_pages, page_size=page_size, max_running=max_running,
                            token_budget=token_budget, max_context=CONTEXT)
    policy = make_scheduler_for(scheduler, api_keys=api_keys, rpm_limit=rpm_limit)
    engine = build_engine(graphdef, state, tokenizer, scheduler=policy, options=options)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, tokenizer, model_name=MODEL_NAME, max_context=engine.max_context,
                     vocab_size=engine.vocab_size, api_keys=api_keys, media_prompt=media_prompt)
    server = ServerThread(app).start()
    try:
        yield server, app, engine
    finally:
        server.stop()


def raw_request(server: ServerThread, method: str, path: str, body: bytes | str | None = None, *,
                headers: dict[str, str] | None = None, timeout_s: float = 60.0) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request: for bodies the official client will not send."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def read_metrics(server: ServerThread, timeout_s: float = 30.0) -> dict[str, float]:
    """/metrics as {sample name with labels: value}; every line must be a comment or a well-formed sample."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout_s)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    finally:
        conn.close()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        name, _, value = line.rpartition(" ")
        assert name and not name.startswith("#"), line
        samples[name] = float(value)
    return samples


def start_serve_process(args):
    """`jvila serve ARGS` in a child process (one CPU device, not the suite's eight).

    Returns (process, stderr lines so far, an Event set once uvicorn listens).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "jvila.cli", "serve", *args], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1])
    lines: list[str] = []
    ready = threading.Event()

    def read_log():
        for line in proc.stderr:
            lines.append(line)
            if "Uvicorn running on" in line:
                ready.set()

    threading.Thread(target=read_log, daemon=True).start()
    return proc, lines, ready


def stop_serve_process(proc) -> int:
    """Ctrl-C the child `jvila serve` as a user would; its exit code (killed if it hangs)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
