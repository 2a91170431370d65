"""`jvila convert`: HF/GGUF → Orbax → HF, exact round trips and clear errors that leave nothing behind."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jvila.checkpoints.convert import convert
from jvila.checkpoints.hf_dir import read_hf_dir
from jvila.checkpoints.pretrained import load_pretrained
from jvila.cli import main
from jvila.models import functional
from jvila.models.attention import dense_attention


def bits(array):
    """Raw bytes view, so that equality is bit equality whatever the dtype (bf16 included)."""
    array = np.ascontiguousarray(array)
    return array.view(np.uint8)


@pytest.mark.parametrize("family,tie,dtype", [("llama", False, torch.float32), ("qwen2", True, torch.bfloat16),
                                              ("llama", True, torch.bfloat16)])
def test_hf_orbax_hf_round_trip_is_bit_identical(tmp_path, make_tiny_model, family, tie, dtype):
    model = make_tiny_model(family, tie=tie, dtype=dtype)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    before, after = read_hf_dir(tmp_path / "hf"), read_hf_dir(tmp_path / "back")
    # A tied checkpoint may or may not spell out lm_head; the weights that define the model must agree.
    names = set(before.tensors) - ({"lm_head.weight"} if tie else set())
    assert names <= set(after.tensors)
    for name in names:
        assert before.tensors[name].dtype == after.tensors[name].dtype, name
        assert np.array_equal(bits(before.tensors[name]), bits(after.tensors[name])), name
    original, reloaded = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("hf", "back"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, reloaded(tokens).logits)


def test_orbax_checkpoint_loads_into_the_same_model(tmp_path, make_tiny_model):
    hf = make_tiny_model("qwen2", tie=False)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "orbax")
    graphdef, state = nnx.split(load_pretrained(str(tmp_path / "orbax"))[0])
    tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 13))
    ours = functional.logits(graphdef, state, jnp.asarray(tokens), attention=dense_attention)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    # float32 on both sides, different op order: see tests/models/test_llm_parity.py.
    assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() < 1e-4


def test_gguf_converts_to_the_model_it_was_made_from(tmp_path, make_tiny_model, make_gguf):
    hf = make_tiny_model("llama", tie=False)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    make_gguf(tmp_path / "m.gguf", state, hf.config.to_dict(), arch="llama")  # float32, q/k rows permuted
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "orbax")]) == 0
    graphdef, st = nnx.split(load_pretrained(str(tmp_path / "orbax"))[0])
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, (1, 17))
    ours = functional.logits(graphdef, st, jnp.asarray(tokens), attention=dense_attention)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() < 1e-4


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_existing_destination_needs_overwrite(tmp_path, make_tiny_model, capsys):
    make_tiny_model("llama", tie=True).save_pretrained(tmp_path / "hf")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("precious")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err
    assert (tmp_path / "dst" / "keep.txt").read_text() == "precious"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "dst"), "--overwrite"]) == 0
    assert not (tmp_path / "dst" / "keep.txt").exists() and (tmp_path / "dst" / "jvila_config.json").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "break_it,message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: _edit_config(d, model_type="gpt2"), "gpt2"),
        (lambda d: _edit_config(d, hidden_size=80), "shape"),
    ],
    ids=["missing-config", "unknown-architecture", "shape-mismatch"],
)
def test_bad_sources_fail_clearly_and_write_nothing(tmp_path, make_tiny_model, capsys, break_it, message):
    make_tiny_model("llama", tie=False).save_pretrained(tmp_path / "hf")
    break_it(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert "jvila: error:" in err and message in err
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_failure_while_writing_leaves_no_destination(tmp_path, make_tiny_model, monkeypatch):
    make_tiny_model("llama", tie=False).save_pretrained(tmp_path / "hf")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("orbax.checkpoint.PyTreeCheckpointer.save", disk_full)
    with pytest.raises(OSError):
        convert(tmp_path / "hf", tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_an_hf_directory_is_converted_once_and_again_when_edited(tmp_path, make_tiny_model):
    import os

    from jvila.checkpoints.pretrained import resolve_checkpoint

    make_tiny_model("llama", tie=True).save_pretrained(tmp_path / "hf")
    first = resolve_checkpoint(str(tmp_path / "hf"))
    assert resolve_checkpoint(str(tmp_path / "hf")) == first  # cached
    weights = tmp_path / "hf" / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert resolve_checkpoint(str(tmp_path / "hf")) != first
    assert resolve_checkpoint(str(first)) == first  # a jvila checkpoint is used where it is
