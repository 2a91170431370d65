"""Training checkpoints with Orbax's CheckpointManager, and the export of a trained model.

One checkpoint per saved step, `DIR/<step>/`, holds three items:
    state/   the train state (params, optimizer state, step) as Orbax arrays, each array written
             by the processes that hold its shards (any mesh, one host or many)
    data/    the data iterator's position, one file per process (`process_<i>-of-<n>.json`): every
             process reads its own shard of the data and resumes its own iterator
    meta/    JSON: the step, the train state's leaf names (checked on restore) and the run's notes

Saves are asynchronous when asked (the arrays are copied off the devices before `save` returns, so
the next step may reuse their buffers; the files are written in the background), every
`every` steps and at the end; the newest `keep` are kept. Restoring places every array exactly as
the freshly built train state it is restored into, so a resumed run continues bit for bit.

`export` writes the directory `jvila.load` and `jvila serve` open (`jvila.checkpoints.orbax_io`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jvila.checkpoints.orbax_io import save_checkpoint
from jvila.config import LLMConfig
from jvila.vision_config import NVILAConfig

PREPROCESSOR_FILE = "preprocessor_config.json"


# ----------------------------------------------------------------------------------------------
# The data iterator's state: one file per process
# ----------------------------------------------------------------------------------------------

class IteratorStateHandler(ocp.CheckpointHandler):
    """Writes `iterator.get_state()` of this process (JSON-able, or bytes) and restores it with `set_state`."""

    def save(self, directory: epath.Path, args: IteratorStateSave):
        state = args.iterator.get_state()
        record = {"bytes": base64.b64encode(state).decode()} if isinstance(state, bytes) else {"json": state}
        (Path(directory) / _process_file()).write_text(json.dumps(record))

    def restore(self, directory: epath.Path, args: IteratorStateRestore):
        path = Path(directory) / _process_file()
        if not path.is_file():
            raise ValueError(f"{path} does not exist: the checkpoint was written by a different number of processes")
        record = json.loads(path.read_text())
        state = base64.b64decode(record["bytes"]) if "bytes" in record else record["json"]
        args.iterator.set_state(state)
        return args.iterator

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    iterator: Any


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


# ----------------------------------------------------------------------------------------------
# The train state as a flat dict of arrays (any pytree: TrainState, optax states, nnx states)
# ----------------------------------------------------------------------------------------------

def _flat(tree) -> tuple[dict[str, Any], list[str], Any]:
    """({name: leaf}, the leaves' key paths, treedef). Names are indexed so they stay unique and
    plain (Orbax keys), the key paths are kept to check a restore against."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names, paths, flat = [], [], {}
    for i, (path, leaf) in enumerate(with_path):
        keystr = jax.tree_util.keystr(path)
        name = f"{i:05d}_" + re.sub(r"[^A-Za-z0-9]+", "_", keystr).strip("_")
        names.append(name)
        paths.append(keystr)
        flat[name] = leaf
    return flat, paths, treedef


class TrainCheckpointer:
    """Periodic (async) saves of the train state and data position; restore of the newest."""

    def __init__(self, directory, *, every: int, keep: int, async_save: bool = True):
        self.every = every
        # A run killed mid-save leaves a temporary directory: removed when the run restarts.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": IteratorStateHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, *, last: bool) -> bool:
        return last or step % self.every == 0

    def save(self, step: int, train_state, data_iterator, *, notes: dict | None = None) -> None:
        """Save `train_state` after `step` steps and the iterator positioned at the next batch."""
        flat, paths, _ = _flat(train_state)
        meta = {"step": int(step), "leaves": paths, **(notes or {})}
        items = {"state": ocp.args.StandardSave(flat), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = IteratorStateSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, template, data_iterator) -> tuple[Any, dict]:
        """(train state shaped and placed like `template`, the meta dict); the iterator is repositioned."""
        flat, paths, treedef = _flat(template)
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("leaves") != paths:
            saved = meta.get("leaves") or []
            diff = next((f"{a} != {b}" for a, b in zip(saved, paths) if a != b),
                        f"{len(saved)} leaves saved, {len(paths)} now")
            raise ValueError(f"checkpoint step {step} in {self.manager.directory} holds a different train state "
                             f"(another model, stage or optimizer): {diff}")
        abstract = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
                    for name, leaf in flat.items()}
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = IteratorStateRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        leaves = [restored["state"][name] for name in flat]
        return jax.tree_util.tree_unflatten(treedef, leaves), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Export: the directory jvila.load / jvila serve open
# ----------------------------------------------------------------------------------------------

def host_array(value) -> np.ndarray:
    """A global array's full value on this host (gathered across processes when it is sharded over them)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def export(flat_params: dict[str, Any], cfg: LLMConfig | NVILAConfig, tokenizer_files: dict[str, str | bytes],
           dst, *, preprocessor: dict | None = None) -> Path | None:
    """Write a jvila checkpoint of `flat_params` (dotted names, float32 kept) to `dst`.

    Every process takes part in gathering sharded params; process 0 writes. An NVILA model's image
    preprocessing goes beside the tokenizer files as preprocessor_config.json.
    """
    host = {name: host_array(value) for name, value in flat_params.items()}
    files = dict(tokenizer_files)
    if isinstance(cfg, NVILAConfig):
        if preprocessor is not None:
            files[PREPROCESSOR_FILE] = json.dumps(preprocessor, indent=2)
        if PREPROCESSOR_FILE not in files:
            raise ValueError("an NVILA export needs the image preprocessor's settings (preprocessor_config.json)")
    if jax.process_count() == 1:
        return save_checkpoint(dst, cfg, host, files, overwrite=True)
    from jax.experimental import multihost_utils

    written = _save_alone(dst, cfg, host, files) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jvila export")
    return written


def _save_alone(dst, cfg, params: dict[str, np.ndarray], files) -> Path:
    """`save_checkpoint`'s layout written by this process alone: Orbax's default checkpointer waits
    for every process at each save, and the others have nothing to write (host arrays, all here)."""
    from jvila.checkpoints import orbax_io
    from jvila.checkpoints.atomic import atomic_directory

    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix="jvila_export")
    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / orbax_io.CONFIG_FILE).write_text(json.dumps(orbax_io._config_to_json(cfg), indent=2))
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                              multiprocessing_options=alone) as checkpointer:
            checkpointer.save(tmp / "params", args=ocp.args.PyTreeSave(orbax_io._nest(params)))
        (tmp / "tokenizer").mkdir()
        for name, content in files.items():
            (tmp / "tokenizer" / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return Path(dst)
