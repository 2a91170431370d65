"""Train → serve: an adapter fine-tuned by the LoRA training loop, saved in PEFT's format, is loaded by a
running `jvila serve` through POST /v1/load_lora_adapter and serves what it learned.

The server is the real command in a child process (`--lora` preloads a `peft`-made adapter,
`--lora-root` allows run-time loads). The trained adapter learns to continue one prompt with a
fixed random continuation; the server's greedy answer must be that continuation, and both
adapters' answers must equal those of PEFT's own PeftModel in PyTorch on the saved directories.
"""

from __future__ import annotations

import copy
import json
import re

import jax
import numpy as np
import peft
from live_server import reference_greedy, start_serve_process, stop_serve_process, tiny_model, tiny_tokenizer
from test_lora_server import ALL_MODULES, peft_adapter, post

from jvila.checkpoints.peft_adapter import save_peft
from jvila.models.lora import LoraConfig
from jvila.models.lora_train import train_lora

def test_trained_adapter_is_loaded_by_a_running_server_and_serves_what_it_learned(tmp_path):
    tokenizer = tiny_tokenizer()
    hf, graphdef, state = tiny_model(tokenizer.vocab_size)
    model_dir, root = tmp_path / "tiny-hf", tmp_path / "adapters"
    hf.save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_text(tokenizer.backend.to_str())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template}))
    root.mkdir()
    pre_ref = peft_adapter(hf, tmp_path / "pre", rank=8, targets=ALL_MODULES, seed=5)

    proc, lines, ready = start_serve_process(
        ["--model", str(model_dir), "--served-name", "tiny", "--port", "0", "--num-pages", "200", "--page-size", "8",
         "--max-context", "128", "--scheduler", "fcfs", "--lora", f"pre={tmp_path / 'pre'}", "--max-lora-rank", "16",
         "--lora-root", str(root)])
    try:
        # Train while the server starts: prompt → a fixed random continuation, the base model frozen.
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(3, tokenizer.vocab_size, 7)]
        target = [int(t) for t in rng.integers(3, tokenizer.vocab_size, 5)]
        seq = np.asarray([prompt + target], np.int32)
        weights = np.zeros((1, seq.shape[1] - 1), np.float32)
        weights[0, len(prompt) - 1:] = 1.0  # only the continuation is learned
        batch = (seq[:, :-1], seq[:, 1:], weights)
        adapter, losses = train_lora(graphdef, state, LoraConfig(8, alpha=16.0, target_modules=tuple(ALL_MODULES)),
                                     [batch] * 60, learning_rate=1e-2, key=jax.random.key(1))
        # The tiny model's logits are bounded (random final norm and head, which LoRA does not touch), so the
        # loss plateaus at 0.4-0.8 from ~6 depending on the draw; what matters is the greedy check below.
        assert losses[-1] < 0.25 * losses[0], losses
        save_peft(adapter, root / "trained", base_model_name="tiny")

        assert ready.wait(240), "".join(lines)[-3000:]
        url = re.search(r"Uvicorn running on http://([\d.]+):(\d+)", "".join(lines))

        class Server:
            host, port = url.group(1), int(url.group(2))

        status, text = post(Server, "/v1/load_lora_adapter", {"lora_name": "trained", "lora_path": "trained"})
        assert status == 200, text
        status, text = post(Server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "pre")})
        assert status == 400 and "outside the adapter root" in text

        def complete(model):
            status, body = post(Server, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 5,
                                                            "temperature": 0, "ignore_eos": True})
            assert status == 200, body
            return json.loads(body)["choices"][0]["text"]

        trained_ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(root / "trained")).eval()
        trained_ids, _ = reference_greedy(trained_ref, prompt, 5)
        assert trained_ids == target  # PEFT agrees the adapter learned the continuation
        assert complete("trained") == tokenizer.decode(target, skip_special_tokens=True)
        pre_ids, _ = reference_greedy(pre_ref, prompt, 5)
        assert complete("pre") == tokenizer.decode(pre_ids, skip_special_tokens=True)
        base_ids, _ = reference_greedy(hf, prompt, 5)
        assert base_ids != target and complete("tiny") == tokenizer.decode(base_ids, skip_special_tokens=True)
    finally:
        code = stop_serve_process(proc)
    assert code == 0, "".join(lines)[-3000:]
