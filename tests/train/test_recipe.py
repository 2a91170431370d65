"""Recipes: every shipped one parses and validates; overrides apply with YAML types; unknown keys and
bad values are errors that name the key (and the nearest valid one)."""

from pathlib import Path

import pytest
import yaml

from jvila.train.recipe import LoraSpec, RecipeError, load_recipe, model_config_from_dict
from jvila.vision_config import NVILAConfig

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))

TINY_LLM = dict(vocab_size=97, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=3, num_kv_heads=1,
                head_dim=8)


def write_recipe(tmp_path, **sections) -> Path:
    recipe = {"model": {"init": "random", "config": dict(TINY_LLM), "tokenizer": "demo"},
              "data": {"paths": ["train.jsonl"], "packing_length": 32, "global_batch_size": 4},
              "optimizer": {"learning_rate": 1e-3}, "train": {"steps": 5}}
    recipe.update(sections)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"nvila_align", "nvila_vision_pretrain", "nvila_llm_pretrain", "nvila_image_sft", "nvila_video_sft",
            "longvila_context_extension", "longvila_long_sft", "lora_sft"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.train.steps >= 1
    assert recipe.data.global_batch_size % recipe.train.grad_accum == 0


def test_shipped_stage_settings():
    # The stage table of NVILA's scripts (learning rate, trainable part, clipping) and LongVILA's theta.
    expect = {"nvila_align": ("align", 1e-3, 512), "nvila_vision_pretrain": ("vision_pretrain", 2e-5, 1024),
              "nvila_llm_pretrain": ("llm_pretrain", 2e-5, 1024), "nvila_image_sft": ("sft", 1.5e-5, 1024),
              "nvila_video_sft": ("sft", 2e-5, 2048)}
    for name, (stage, lr, batch) in expect.items():
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert (recipe.stage, recipe.optimizer.learning_rate, recipe.data.global_batch_size) == (stage, lr, batch)
    assert load_recipe(ROOT / "recipes/nvila_vision_pretrain.yaml").optimizer.clip_norm == 5.0
    long = load_recipe(ROOT / "recipes/longvila_context_extension.yaml")
    assert long.model.context_length == 262144 and long.lora is not None and long.lora.rank == 8


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write_recipe(tmp_path)
    recipe = load_recipe(path, ["train.steps=7", "optimizer.learning_rate=3e-4", "lora.rank=4", "mesh.tensor=2", "train.compute_dtype=bfloat16",
                                "model.config.num_layers=3", "checkpoint.async_save=false"])
    assert recipe.train.steps == 7 and recipe.optimizer.learning_rate == pytest.approx(3e-4)
    assert recipe.lora == LoraSpec(rank=4)  # a section created by its first override gets its defaults
    assert recipe.mesh.tensor == 2 and recipe.train.compute_dtype == "bfloat16"
    assert recipe.model_config().num_layers == 3 and recipe.checkpoint.async_save is False
    assert load_recipe(path).train.steps == 5  # the file itself is untouched
    assert load_recipe(path, ["lora=null"]).lora is None
    assert load_recipe(path, ["stage=[layers.*, final_norm.*]"]).stage == ("layers.*", "final_norm.*")


@pytest.mark.parametrize("override, words", [
    ("train.setps=3", ["'train.setps'", "'train.steps'"]),
    ("optimiser.learning_rate=1", ["'optimiser'", "'optimizer'"]),
    ("optimizer.learning_rat=1", ["'optimizer.learning_rat'", "'optimizer.learning_rate'"]),
    ("data.packing_lenght=64", ["'data.packing_lenght'", "'data.packing_length'"]),
    ("model.config.hiden_size=8", ["'model.config.hiden_size'", "'model.config.hidden_size'"]),
    ("checkpoint.evry=2", ["'checkpoint.evry'", "'checkpoint.every'"]),
])
def test_unknown_key_names_it_and_the_nearest(tmp_path, override, words):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path), [override])
    for word in words:
        assert word in str(err.value)


def test_unknown_key_in_the_file(tmp_path):
    path = write_recipe(tmp_path, trian={"steps": 3})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'trian'; did you mean 'train'"):
        load_recipe(path)


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps must be an integer"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.remat=everything", "train.remat 'everything' is not one of"),
    ("stage=alignn", "did you mean 'align'"),
    ("lora.rank=0", "LoRA rank must be a positive integer"),
    ("mesh.fsdp=-2", "mesh"),
    ("model.context_length=-5", "model.context_length must be positive"),
    ("model.init_std=0", "model.init_std must be positive"),
    ("model.tokenizer=null", "give model.tokenizer"),
    ("train.steps", "key=value"),
    ("train.grad_accum=3", "does not divide data.global_batch_size 4"),
    ("lora.rank=4 stage=align", "leave stage at 'all'"),
])
def test_bad_values_are_named(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path), override.split(" "))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="is not a file"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_nvila_config_from_dict():
    cfg = model_config_from_dict({"llm": dict(TINY_LLM), "vision": {"hidden_size": 16, "intermediate_size": 24,
                                                                    "num_layers": 2, "num_heads": 2,
                                                                    "image_size": 28, "patch_size": 7},
                                  "dynamic_s2": False, "image_aspect_ratio": "resize"})
    assert isinstance(cfg, NVILAConfig) and cfg.vision.grid_size == 4 and cfg.llm.hidden_size == 24
    with pytest.raises(RecipeError, match="'model.config.vision.patch_sise'.*'model.config.vision.patch_size'"):
        model_config_from_dict({"llm": dict(TINY_LLM), "vision": {"patch_sise": 7}})
