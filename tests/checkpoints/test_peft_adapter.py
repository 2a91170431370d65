"""PEFT LoRA adapters: made by `peft` on tiny random Llama and Qwen2, the same logits in jvila; exported back, the
same logits in `peft`; bad directories refused with clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from tiny_hf import random_hf_model, random_tokens, to_jvila

from jvila.checkpoints.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, load_peft, save_peft
from jvila.models import functional
from jvila.models.attention import dense_attention
from jvila.models.lora import AdapterError, stack_adapters

logits = jax.jit(functional.logits, static_argnames=("graphdef", "attention"))

# (family, rank, alpha, rsLoRA, target modules): every module on Llama with rsLoRA; a subset and an odd rank on Qwen2.
CASES = [
    ("llama", 8, 12.0, True, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("qwen2", 5, 16.0, False, ["q_proj", "v_proj", "down_proj"]),
]


def peft_model(family, seed, rank, alpha, rslora, targets):
    """A peft LoRA model on a fresh random base, its LoRA matrices random too (PEFT starts B at zero)."""
    base = random_hf_model(family, seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora,
                                                      target_modules=targets, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("family,rank,alpha,rslora,targets", CASES)
def test_peft_adapter_round_trip(tmp_path, family, rank, alpha, rslora, targets):
    seed = int(np.random.default_rng().integers(1 << 20))
    model = peft_model(family, seed, rank, alpha, rslora, targets)
    model.save_pretrained(tmp_path / "peft")
    tokens = random_tokens(model.config.vocab_size, (2, 11), seed)
    with torch.no_grad():
        want = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        with model.disable_adapter():
            base_logits = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    jv = to_jvila(random_hf_model(family, seed))
    graphdef, state = nnx.split(jv)

    adapter = load_peft(tmp_path / "peft", jv.config)
    assert adapter.config.rank == rank and adapter.config.use_rslora == rslora
    assert adapter.config.target_modules == tuple(t for t in adapter.config.target_modules if t in targets)
    assert set(adapter.config.target_modules) == set(targets)
    lora = stack_adapters([adapter], max_rank=16, base_config=jv.config)
    got = logits(graphdef, state, jnp.asarray(tokens), attention=dense_attention, lora=lora)
    # float32 both sides; the 1e-4 relative bound of the parity tests (seen ~1e-6).
    assert rel_err(got, want) < 1e-4
    assert rel_err(want, base_logits) > 1e-2  # the adapter changes the logits: the check above can fail

    save_peft(adapter, tmp_path / "exported", base_model_name=f"tiny-{family}")
    config = json.loads((tmp_path / "exported" / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (rank, alpha, rslora)
    reloaded = peft.PeftModel.from_pretrained(random_hf_model(family, seed), tmp_path / "exported").eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    # The same float32 matrices transposed twice: peft computes exactly what it did before the round trip.
    assert rel_err(again, want) < 1e-6


def test_bad_adapter_directories_are_refused(tmp_path):
    model = peft_model("qwen2", 3, 4, 8.0, False, ["q_proj", "down_proj"])
    good = tmp_path / "good"
    model.save_pretrained(good)
    jv_config = to_jvila(random_hf_model("qwen2", 3)).config
    llama_config = to_jvila(random_hf_model("llama_tied", 3)).config
    assert load_peft(good, jv_config, max_rank=4).rank == 4

    def variant(name, config_edit=None, tensors_edit=None):
        path = tmp_path / name
        shutil.copytree(good, path)
        if config_edit:
            config = json.loads((path / CONFIG_FILE).read_text())
            config_edit(config)
            (path / CONFIG_FILE).write_text(json.dumps(config))
        if tensors_edit:
            tensors = load_file(str(path / WEIGHTS_FILE))
            tensors_edit(tensors)
            save_file(tensors, str(path / WEIGHTS_FILE))
        return path

    cases = [
        (tmp_path / "nowhere", jv_config, "does not exist"),
        (variant("no_weights", tensors_edit=None), jv_config, None),  # placeholder replaced below
        (variant("lm_head", lambda c: c.update(target_modules=["q_proj", "lm_head"])), jv_config,
         r"unknown LoRA target modules \['lm_head'\]"),
        (variant("dora", lambda c: c.update(use_dora=True)), jv_config, r"options \['use_dora'\]"),
        (variant("pattern", lambda c: c.update(rank_pattern={"q_proj": 8})), jv_config, "rank_pattern"),
        (variant("extra_key", tensors_edit=lambda t: t.update(
            {"base_model.model.lm_head.lora_A.weight": np.ones((4, 64), np.float32)})), jv_config,
         "not a LoRA A/B matrix"),
        (variant("half", tensors_edit=lambda t: t.pop(
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")), jv_config, "but not its pair"),
        (good, llama_config, "do not fit the base model"),
    ]
    (cases[1][0] / WEIGHTS_FILE).unlink()
    cases[1] = (cases[1][0], jv_config, f"has no {WEIGHTS_FILE}")
    for path, config, message in cases:
        with pytest.raises(AdapterError, match=message):
            load_peft(path, config)
    with pytest.raises(AdapterError, match="rank 4 is above the maximum rank 2"):
        load_peft(good, jv_config, max_rank=2)
    (tmp_path / "no_config").mkdir()
    with pytest.raises(AdapterError, match=f"has no {CONFIG_FILE}"):
        load_peft(tmp_path / "no_config", jv_config)
    with pytest.raises(ValueError, match="already exists"):
        save_peft(load_peft(good, jv_config), good)
