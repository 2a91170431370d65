"""One recipe, four layouts, one loss curve: one device; 8 simulated devices with FSDP x tensor, and with
FSDP x 2D sequence parallelism; and two `jvila train` processes x 4 CPU devices each (jax.distributed
with gloo on loopback, a free port).

Two processes each read their own shard of the records (records p, p + 2, ...) and pack their own
rows; the global batch is process 0's rows then process 1's. The one-device and 8-device runs
here are fed exactly that (`TwoShards` packs both shards in this process), so all three see the
same batches and differ only in how the sums are split and ordered.
"""

import sys
from pathlib import Path

import jax
import numpy as np

from jvila.data.demo_shapes import demo_tokenizer_files
from jvila.data.pipeline import build_train_iterator
from jvila.processing.tokenizer import Tokenizer
from jvila.train.loop import train
from jvila.train.recipe import load_recipe
from tiny_recipe import read_losses, write_tiny_run
from two_processes import finish_two_processes, start_two_processes

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
# float32: FSDP and tensor parallelism sum matmul partials in other orders (~1e-7 relative per op);
# four Adam steps carry those differences into the weights, a few 1e-6 of the loss at most.
TOL = dict(rtol=2e-5, atol=2e-5)


class TwoShards:
    """The rows two processes would contribute, packed here: process 0's then process 1's."""

    def __init__(self, recipe):
        tokenizer = Tokenizer.from_files(demo_tokenizer_files())
        self.parts = [build_train_iterator(recipe.data, tokenizer, None, None, process_index=p, process_count=2)
                      for p in range(2)]

    def __next__(self):
        rows = [next(part) for part in self.parts]
        return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}

    def get_state(self):
        return [part.get_state() for part in self.parts]

    def set_state(self, state):
        for part, s in zip(self.parts, state):
            part.set_state(s)


def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
    fsdp_tensor = {"fsdp": 4, "tensor": 2}
    # The two processes start first and train while this one runs the other two layouts.
    recipe = write_tiny_run(tmp_path / "two", steps=STEPS, every=2, mesh=fsdp_tensor)
    procs = start_two_processes([sys.executable, "-m", "jvila.cli", "train", str(recipe)], pythonpath=[ROOT],
                                cwd=recipe.parent)
    try:
        one = load_recipe(write_tiny_run(tmp_path / "one", steps=STEPS, every=2, mesh={"fsdp": 1}))
        want = train(one, devices=jax.devices()[:1], iterator=TwoShards(one)).losses
        assert sorted(want) == list(range(1, STEPS + 1))

        eight = load_recipe(write_tiny_run(tmp_path / "eight", steps=STEPS, every=2, mesh=fsdp_tensor))
        got = train(eight, devices=jax.devices(), iterator=TwoShards(eight)).losses
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], **TOL)

        # Sequences split too: 2D attention (Ulysses inside, ring across) chosen from the mesh.
        two_d = load_recipe(write_tiny_run(tmp_path / "2d", steps=STEPS, every=STEPS,
                                           mesh={"fsdp": 2, "sequence": 2, "sequence_a2a": 2}))
        got = train(two_d, devices=jax.devices(), iterator=TwoShards(two_d)).losses
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], **TOL)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    finish_two_processes(procs)
    got = read_losses(tmp_path / "two/out")
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], **TOL)
    # Every process wrote its part of each checkpoint: the train state and its own data position.
    last = tmp_path / "two/out/checkpoints" / str(STEPS)
    assert sorted(p.name for p in (last / "data").glob("process_*.json")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    assert (tmp_path / "two/out/export/jvila_config.json").is_file()
