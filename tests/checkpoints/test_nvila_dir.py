"""NVILA directories (VILA's save_pretrained layout) ↔ jvila checkpoints: values, round trips, bad input."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import transformers

from jvila.checkpoints.convert import convert
from jvila.checkpoints.errors import CheckpointError
from jvila.checkpoints.nvila_dir import is_nvila_dir
from jvila.checkpoints.orbax_io import load_checkpoint
from jvila.vision_config import NVILAConfig
from nvila_fixture import (
    IMAGE_TOKEN,
    S2_SCALES,
    VIDEO_TOKEN,
    build_nvila_parts,
    vila_vision_state,
    write_nvila_dir,
)

PARTS = ("llm", "vision_tower", "mm_projector")


@pytest.fixture(scope="module")
def parts():
    return build_nvila_parts()


@pytest.fixture
def nvila_dir(parts, tmp_path):
    return write_nvila_dir(parts, tmp_path / "nvila")


def read_tensors(folder):
    return safetensors.numpy.load_file(folder / "model.safetensors")


def test_conversion_reads_every_part(parts, nvila_dir, tmp_path):
    convert(nvila_dir, tmp_path / "jv")
    cfg, params, tok_dir = load_checkpoint(tmp_path / "jv")
    assert isinstance(cfg, NVILAConfig)
    tokenizer = parts.tokenizer
    assert (cfg.image_token_id, cfg.video_token_id) == (tokenizer.token_to_id(IMAGE_TOKEN),
                                                       tokenizer.token_to_id(VIDEO_TOKEN))
    assert cfg.media_end_token_ids == tuple(tokenizer.encode("\n").ids)
    assert (cfg.projector_type, cfg.image_aspect_ratio, cfg.s2_scales) == (parts.projector_type, "dynamic_s2",
                                                                           S2_SCALES)
    assert (cfg.select_layer, cfg.video_pool_sizes, cfg.mm_hidden_size) == (-2, ((8, 1, 1),), 32 * 3)
    assert (cfg.llm.hidden_size, cfg.vision.num_layers, cfg.vision.patch_size) == (64, 3, 7)
    # Values land where they belong, in jvila's layouts ([in, out] kernels; NHWC-style conv kernels).
    llm, vision, projector = parts.llm.state_dict(), vila_vision_state(parts.vision), parts.projector.state_dict()
    np.testing.assert_array_equal(params["llm.embed"], llm["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(params["llm.lm_head"], llm["lm_head.weight"].numpy().T)
    np.testing.assert_array_equal(params["vision_tower.position_embed"],
                                  vision["vision_model.embeddings.position_embedding.weight"].numpy())
    np.testing.assert_array_equal(params["projector.layers.2.kernel"], projector["2.weight"].numpy().T)
    np.testing.assert_array_equal(params["projector.layers.1.scale"], projector["1.weight"].numpy())
    counts = {prefix: sum(n.startswith(prefix + ".") for n in params) for prefix in ("llm", "vision_tower",
                                                                                     "projector")}
    assert counts == {"llm": len(llm), "vision_tower": len(vision), "projector": len(projector)}
    # The image preprocessing settings travel with the tokenizer.
    assert json.loads((tok_dir / "preprocessor_config.json").read_text())["size"] == {"height": 28, "width": 28}
    assert (tok_dir / "tokenizer.json").is_file()


def test_round_trips_are_bit_identical(nvila_dir, tmp_path):
    convert(nvila_dir, tmp_path / "jv")
    convert(tmp_path / "jv", tmp_path / "back")
    assert is_nvila_dir(tmp_path / "back")
    # NVILA → jvila → NVILA: every tensor of every part, and the tokenizer, unchanged.
    for part in PARTS:
        want, got = read_tensors(nvila_dir / part), read_tensors(tmp_path / "back" / part)
        assert want.keys() == got.keys(), part
        for name in want:
            assert want[name].dtype == got[name].dtype
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{part}/{name}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / "llm" / name).read_text() == (nvila_dir / "llm" / name).read_text()
    # jvila → NVILA → jvila: config and params unchanged.
    convert(tmp_path / "back", tmp_path / "again")
    cfg1, params1, _ = load_checkpoint(tmp_path / "jv")
    cfg2, params2, _ = load_checkpoint(tmp_path / "again")
    assert cfg1 == cfg2 and params1.keys() == params2.keys()
    for name in params1:
        np.testing.assert_array_equal(params2[name], params1[name], err_msg=name)


def test_written_parts_load_in_transformers(parts, nvila_dir, tmp_path):
    convert(nvila_dir, tmp_path / "jv")
    convert(tmp_path / "jv", tmp_path / "back")
    top = json.loads((tmp_path / "back" / "config.json").read_text())
    assert top["architectures"] == ["LlavaLlamaModel"] and top["mm_projector_cfg"]["mm_projector_type"] == (
        parts.projector_type)
    assert top["s2_scales"] == "28,56,84" and top["image_aspect_ratio"] == "dynamic_s2"
    llm = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "back" / "llm")
    vision = transformers.SiglipVisionModel.from_pretrained(tmp_path / "back" / "vision_tower")
    for loaded, original in ((llm, parts.llm), (vision, parts.vision)):
        want = original.state_dict()
        assert loaded.state_dict().keys() == want.keys()
        for name, value in loaded.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), want[name].numpy(), err_msg=name)


def test_tied_llm_and_3x3_projector(tmp_path):
    parts = build_nvila_parts(projector_type="mlp_downsample_3x3_fix", tie_embeddings=True)
    src = write_nvila_dir(parts, tmp_path / "nvila")
    convert(src, tmp_path / "jv")
    cfg, params, _ = load_checkpoint(tmp_path / "jv")
    assert cfg.llm.tie_embeddings and "llm.lm_head" not in params
    assert cfg.projector_type == "mlp_downsample_3x3_fix"
    np.testing.assert_array_equal(params["projector.layers.5.kernel"], parts.projector.state_dict()["5.weight"].T)
    convert(tmp_path / "jv", tmp_path / "back")
    for part in PARTS:
        want, got = read_tensors(src / part), read_tensors(tmp_path / "back" / part)
        assert want.keys() == got.keys()
        assert all(np.array_equal(want[n], got[n]) for n in want)


@pytest.mark.parametrize("part", PARTS)
def test_missing_subfolder_is_named(nvila_dir, tmp_path, part):
    shutil.rmtree(nvila_dir / part)
    with pytest.raises(CheckpointError, match=f"{part}/"):
        convert(nvila_dir, tmp_path / "jv")
    assert not (tmp_path / "jv").exists()


def test_missing_preprocessor_config(nvila_dir, tmp_path):
    (nvila_dir / "vision_tower" / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        convert(nvila_dir, tmp_path / "jv")


def test_missing_tokenizer(nvila_dir, tmp_path):
    (nvila_dir / "llm" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        convert(nvila_dir, tmp_path / "jv")


def test_tower_config_without_head_flag(nvila_dir, tmp_path):
    # Towers saved before `vision_use_head` existed omit it (transformers then assumes a head);
    # NVILA's carries no head tensors, and those decide.
    for config_file in (nvila_dir / "vision_tower" / "config.json", nvila_dir / "config.json"):
        config = json.loads(config_file.read_text())
        tower = config.get("vision_tower_cfg", config)
        tower.pop("vision_use_head", None)
        config_file.write_text(json.dumps(config))
    convert(nvila_dir, tmp_path / "jv")
    cfg, _, _ = load_checkpoint(tmp_path / "jv")
    assert cfg.vision.use_head is False


def test_unknown_projector_type(nvila_dir, tmp_path):
    config = json.loads((nvila_dir / "mm_projector" / "config.json").read_text())
    (nvila_dir / "mm_projector" / "config.json").write_text(json.dumps(config | {"mm_projector_type": "qformer"}))
    with pytest.raises(CheckpointError, match="qformer"):
        convert(nvila_dir, tmp_path / "jv")
    assert not (tmp_path / "jv").exists()


def test_stray_projector_tensor_writes_nothing(nvila_dir, tmp_path):
    tensors = read_tensors(nvila_dir / "mm_projector")
    tensors["layers.9.weight"] = np.ones((2, 2), np.float32)
    safetensors.numpy.save_file(tensors, nvila_dir / "mm_projector" / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.9.weight"):
        convert(nvila_dir, tmp_path / "jv")
    assert not (tmp_path / "jv").exists()
    assert not list(tmp_path.glob(".jv*"))  # no half-written staging directory either


def tokenizer_without_media_tokens(nvila_dir):
    """Rewrite llm/tokenizer.json as the base LLM's tokenizer: no <image>, no <vila/video>."""
    data = json.loads((nvila_dir / "llm" / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith(("<image>", "<vila/"))]
    for token in ("<image>", "<vila/video>", "<vila/sentinel>"):
        data["model"]["vocab"].pop(token, None)
    (nvila_dir / "llm" / "tokenizer.json").write_text(json.dumps(data))


def test_media_tokens_are_added_when_missing(nvila_dir, tmp_path):
    tokenizer_without_media_tokens(nvila_dir)
    base = tokenizers.Tokenizer.from_file(str(nvila_dir / "llm" / "tokenizer.json"))
    assert base.token_to_id(IMAGE_TOKEN) is None
    convert(nvila_dir, tmp_path / "jv")
    cfg, _, tok_dir = load_checkpoint(tmp_path / "jv")
    tokenizer = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # As VILA's builder does: appended after the base vocabulary, as special tokens.
    size = base.get_vocab_size(with_added_tokens=True)
    assert (cfg.image_token_id, cfg.video_token_id) == (size, size + 1)
    assert tokenizer.encode(f"a{IMAGE_TOKEN}b").ids.count(cfg.image_token_id) == 1


def test_media_token_outside_the_embedding(nvila_dir, tmp_path):
    config = json.loads((nvila_dir / "llm" / "config.json").read_text())
    tokenizer = tokenizers.Tokenizer.from_file(str(nvila_dir / "llm" / "tokenizer.json"))
    config["vocab_size"] = tokenizer.token_to_id(IMAGE_TOKEN)  # the embedding ends just before <image>
    (nvila_dir / "llm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="outside the LLM"):
        convert(nvila_dir, tmp_path / "jv")


def test_not_an_nvila_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{not json")
    assert not is_nvila_dir(tmp_path / "x")


def test_tensor_of_the_wrong_shape(nvila_dir, tmp_path):
    tensors = read_tensors(nvila_dir / "mm_projector")
    tensors["layers.4.weight"] = tensors["layers.4.weight"][:, :-1].copy()
    safetensors.numpy.save_file(tensors, nvila_dir / "mm_projector" / "model.safetensors")
    with pytest.raises(CheckpointError, match="projector.layers.4"):
        convert(nvila_dir, tmp_path / "jv")
    assert not (tmp_path / "jv").exists()
