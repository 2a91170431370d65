"""SIGKILL a `jvila train` child after a checkpoint, start it again: it resumes from the newest checkpoint
and every later step's loss equals an uninterrupted run's, bit for bit (CPU, one device, float32).

The same tiny random-LLM recipe runs three times as child processes: uninterrupted (the reference),
killed right after its first checkpoint lands, and restarted. Both runs of the interrupted one
write their per-step metrics to the same metrics.jsonl (the restart re-logs the steps after the
checkpoint; the last line of a step wins). The restarted run finishes, exports a checkpoint that
`jvila.load` opens, and leaves TensorBoard events. Child processes share a JAX compilation cache
so only the first one compiles.
"""

import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tiny_recipe import TINY_LLM, read_losses, write_tiny_run

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 30, 5


def child_env(cache: Path) -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))


def jvila_train(recipe: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jvila.cli", "train", str(recipe)], env=env, cwd=recipe.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return out + err


def committed_steps(checkpoints: Path) -> list[int]:
    """Steps whose checkpoint is complete (Orbax renames a step's temporary directory when it is)."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def event_tags(logdir: Path) -> set[str]:
    """Scalar tags in the TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path):
    env = child_env(tmp_path / "jax_cache")
    reference = write_tiny_run(tmp_path / "reference", steps=STEPS, every=EVERY)
    finish(jvila_train(reference, env))
    want = read_losses(tmp_path / "reference/out")
    assert sorted(want) == list(range(1, STEPS + 1))
    assert np.mean([want[s] for s in range(STEPS - 4, STEPS + 1)]) < want[1] - 0.5  # it does learn

    recipe = write_tiny_run(tmp_path / "killed", steps=STEPS, every=EVERY)
    checkpoints = tmp_path / "killed/out/checkpoints"
    proc = jvila_train(recipe, env)
    deadline = time.monotonic() + 240
    while not committed_steps(checkpoints) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = committed_steps(checkpoints)
    assert killed_at and max(killed_at) < STEPS, killed_at

    log = finish(jvila_train(recipe, env))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert resumed == max(killed_at)
    got = read_losses(tmp_path / "killed/out")
    assert sorted(got) == list(range(1, STEPS + 1))
    # Bit-exact: the same executable on the same data, state and keys (floats round-trip through JSON).
    assert [got[s] for s in range(resumed + 1, STEPS + 1)] == [want[s] for s in range(resumed + 1, STEPS + 1)]
    assert [got[s] for s in range(1, resumed + 1)] == [want[s] for s in range(1, resumed + 1)]
    assert committed_steps(checkpoints) == [STEPS - EVERY, STEPS]  # checkpoint.keep = 2: older ones removed

    from jvila.checkpoints.orbax_io import load_checkpoint
    from jvila.config import LLMConfig

    cfg, params, tok_dir = load_checkpoint(tmp_path / "killed/out/export")
    assert cfg == LLMConfig(**TINY_LLM) and (tok_dir / "tokenizer.json").is_file()
    assert params["layers.0.attn.q_proj"].shape == (32, 4, 8)
    assert {"train/loss", "train/tokens_per_s", "train/grad_norm", "train/learning_rate"} <= \
        event_tags(tmp_path / "killed/out/tensorboard")
