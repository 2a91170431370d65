"""HF model directories: read → write → read is bit-identical and transformers loads what is written."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.hf_dir import INDEX_FILE, SINGLE_FILE, read_hf_dir, write_hf_dir
from jvila.checkpoints.hf_form import HFCheckpoint, expected_tensor_shapes


def _bits(array: np.ndarray) -> np.ndarray:
    """Raw bits, so that equality means bit-identical (and NaN-safe) for any float dtype."""
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def _torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            state[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            state[name] = tensor.numpy()
    return state


def _assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        assert actual[name].shape == array.shape, name
        np.testing.assert_array_equal(_bits(actual[name]), _bits(array), err_msg=name)


CASES = [
    # family, tied embeddings, dtype, shard transformers' save, shard jvila's write
    pytest.param("llama", False, torch.float32, False, True, id="llama-f32"),
    pytest.param("qwen2", True, torch.float32, True, False, id="qwen2-tied-f32-sharded"),
    pytest.param("llama", True, torch.bfloat16, True, True, id="llama-tied-bf16-sharded"),
    pytest.param("qwen2", False, torch.bfloat16, False, False, id="qwen2-bf16"),
]


@pytest.mark.parametrize("family, tie, dtype, shard_source, shard_copy", CASES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(
    tmp_path, make_tiny_model, family, tie, dtype, shard_source, shard_copy
):
    model = make_tiny_model(family, tie=tie, dtype=dtype)
    source = tmp_path / "source"
    model.save_pretrained(source, max_shard_size="20KB" if shard_source else "5GB")
    assert (source / INDEX_FILE).exists() == shard_source
    expected = {k: v for k, v in _torch_state(model).items() if not (tie and k == "lm_head.weight")}

    first = read_hf_dir(source)
    _assert_same_tensors(first.tensors, expected)
    assert first.config["model_type"] == family

    copy = write_hf_dir(first, tmp_path / "copy", max_shard_bytes=16_000 if shard_copy else 10**9)
    assert (copy / INDEX_FILE).exists() == shard_copy
    assert (copy / SINGLE_FILE).exists() == (not shard_copy)
    if shard_copy:
        index = json.loads((copy / INDEX_FILE).read_text())
        assert sorted(index["weight_map"]) == sorted(expected)
        assert len(set(index["weight_map"].values())) > 1

    second = read_hf_dir(copy)
    _assert_same_tensors(second.tensors, first.tensors)
    assert second.config == first.config

    loaded = transformers.AutoModelForCausalLM.from_pretrained(copy, dtype="auto")
    assert type(loaded) is type(model)
    _assert_same_tensors(_torch_state(loaded), _torch_state(model))


def test_dtype_cast_on_write_matches_torch_rounding(tmp_path, make_tiny_model):
    model = make_tiny_model("llama", tie=False)
    model.save_pretrained(tmp_path / "f32")
    ckpt = read_hf_dir(tmp_path / "f32")

    out = write_hf_dir(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cast = read_hf_dir(out)
    assert {a.dtype for a in cast.tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    _assert_same_tensors(cast.tensors, _torch_state(model.to(torch.bfloat16)))
    # The source checkpoint is left as it was.
    assert {a.dtype for a in ckpt.tensors.values()} == {np.dtype(np.float32)}

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16


def test_tokenizer_files_travel_and_load_in_transformers(tmp_path, make_tiny_model, smollm2_tokenizer_files):
    model = make_tiny_model("llama", tie=True)
    model.save_pretrained(tmp_path / "model")
    ckpt = read_hf_dir(tmp_path / "model")
    ckpt.tokenizer_files = dict(smollm2_tokenizer_files)

    out = write_hf_dir(ckpt, tmp_path / "with_tokenizer")
    again = read_hf_dir(out)
    assert again.tokenizer_files == ckpt.tokenizer_files

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    plain = tokenizers.Tokenizer.from_str(smollm2_tokenizer_files["tokenizer.json"])
    text = "<|im_start|>user\nWrite 12 words, quickly!<|im_end|>\n"
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == plain.encode(text).ids


def test_binary_tokenizer_file_round_trips(tmp_path, make_tiny_model):
    make_tiny_model("qwen2", tie=True).save_pretrained(tmp_path / "model")
    ckpt = read_hf_dir(tmp_path / "model")
    sentencepiece_model = np.random.default_rng().bytes(1000)  # not valid UTF-8
    ckpt.tokenizer_files = {"tokenizer.model": sentencepiece_model, "generation_config.json": '{"eos_token_id": 7}'}
    again = read_hf_dir(write_hf_dir(ckpt, tmp_path / "copy"))
    assert again.tokenizer_files == ckpt.tokenizer_files


@pytest.mark.parametrize(
    "family, tie, extra",
    [("llama", True, {}), ("llama", False, {"attention_bias": True, "mlp_bias": True}), ("qwen2", False, {})],
)
def test_expected_shapes_list_exactly_the_transformers_parameters(make_tiny_model, family, tie, extra):
    model = make_tiny_model(family, tie=tie, **extra)
    actual = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if tie:
        del actual["lm_head.weight"]
    assert expected_tensor_shapes(model.config.to_dict()) == actual
    with pytest.raises(CheckpointError, match="unknown architecture model_type='gpt2'"):
        expected_tensor_shapes({"model_type": "gpt2"})


def test_errors_name_the_problem(tmp_path, make_tiny_model):
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_dir(tmp_path)

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_hf_dir(tmp_path)

    model = make_tiny_model("qwen2", tie=False)
    model.save_pretrained(tmp_path / "model")
    ckpt = read_hf_dir(tmp_path / "model")
    with pytest.raises(CheckpointError, match="already exists"):
        write_hf_dir(ckpt, tmp_path / "model")

    name = "model.layers.1.self_attn.k_proj.weight"
    broken = HFCheckpoint(ckpt.config, ckpt.tensors | {name: ckpt.tensors[name][:-1]})
    with pytest.raises(CheckpointError, match=f"shape mismatch for {name}"):
        write_hf_dir(broken, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()

    with pytest.raises(CheckpointError, match="unsupported checkpoint dtype"):
        write_hf_dir(ckpt, tmp_path / "int8", dtype="int8")
    # Nothing half-written is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model"]
