"""`jvila train`: bad recipes and overrides end with `jvila: error: ...` and exit 2 (no traceback);
`--check` validates without training."""

import pytest

from jvila.cli import main
from tiny_recipe import write_tiny_run


@pytest.mark.parametrize("args, message", [
    (["train.stpes=3"], "unknown recipe key 'train.stpes'; did you mean 'train.steps'?"),
    (["optimizer.learning_rate=fast"], "optimizer.learning_rate must be a number, got 'fast'"),
    (["stage=projector_only"], "stage 'projector_only' is not one of"),
    (["model.config.num_heads=5"], "num_heads 5 is not a multiple of num_kv_heads 2"),
    (["steps"], "an override is key=value"),
])
def test_bad_overrides_exit_2_with_a_message(tmp_path, capsys, args, message):
    recipe = write_tiny_run(tmp_path)
    assert main(["train", str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jvila: error: ") and message in err, err
    assert "Traceback" not in err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_check_validates_without_training(tmp_path, capsys):
    recipe = write_tiny_run(tmp_path)
    assert main(["train", "--check", str(recipe), "train.steps=9"]) == 0
    assert "valid (9 steps" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_unusable_model_settings_are_recipe_errors(tmp_path, capsys):
    # Found when the run starts (the tokenizer is read then), still a clean error.
    recipe = write_tiny_run(tmp_path)
    assert main(["train", str(recipe), "mesh.fsdp=-1", "model.config.vocab_size=50"]) == 2
    assert "the tokenizer has" in capsys.readouterr().err
    assert main(["train", str(recipe), "mesh.fsdp=-1", f"model.tokenizer={tmp_path}"]) == 2
    assert "is not a directory with tokenizer.json" in capsys.readouterr().err


def test_a_mesh_that_does_not_fit_the_devices(tmp_path, capsys):
    recipe = write_tiny_run(tmp_path)
    assert main(["train", str(recipe), "mesh.fsdp=3"]) == 2
    assert "jvila: error: mesh:" in capsys.readouterr().err
