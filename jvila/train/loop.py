"""The training loop behind `jvila train RECIPE`: one process of a run, on one host or many.

`train(recipe)`:
1. `jax.distributed` from the environment (`sharding.multihost`; nothing on one plain machine),
   then the mesh of the recipe over every process's devices.
2. The model: loaded from a checkpoint, or built at random from the recipe's config (the same seed
   in every process gives the same weights); RoPE theta raised for context extension.
3. The train state (trainable / frozen split by the stage, or a LoRA adapter over a frozen base),
   placed on the mesh, the optimizer and the jitted step (`jvila.train.step`).
4. The data iterator (`jvila.data.pipeline`) over this process's share of the global batch.
5. Resume: the newest checkpoint in the run's checkpoint directory, if any, restores the train
   state and the iterator's position, so the run continues exactly where the saved one was.
6. Steps: each process's rows become one global batch (`jax.make_array_from_process_local_data`),
   one key per step folded from the seed (so a resumed run draws the same keys), metrics every
   `log_every` steps (loss, tokens/s, step time, MFU; stderr and TensorBoard; every step's metrics
   also as JSON lines in <output_dir>/metrics.jsonl), checkpoints every `checkpoint.every` steps
   and after the last.
7. Export of the trained model to <output_dir>/export (a jvila checkpoint; a PEFT adapter for LoRA).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jvila.train.recipe import Recipe, RecipeError
from jvila.train.recipe import lora_config as make_lora_config
from sharding.mesh import A2A_AXIS, RING_AXIS, build_mesh
from sharding.rules import logical_to_spec

log = logging.getLogger("jvila")

METRICS_FILE = "metrics.jsonl"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class TrainSummary:
    start_step: int  # 0, or the step a resumed run continued from
    final_step: int
    losses: dict[int, float]  # step (1-based: after that many updates) -> loss of the batch of that step
    export_dir: Path | None
    skipped_records: int | None = None


@dataclasses.dataclass
class BuiltModel:
    """The model the run trains and what an export needs beside its params."""

    model: nnx.Module
    config: object  # LLMConfig or NVILAConfig
    tokenizer_files: dict[str, str | bytes]
    preprocessor: dict | None  # NVILA: preprocessor_config.json
    base_name: str | None  # the checkpoint it started from (LoRA exports name it)


# ----------------------------------------------------------------------------------------------
# Model, tokenizer and media settings
# ----------------------------------------------------------------------------------------------

def build_model(recipe: Recipe) -> BuiltModel:
    from jvila.checkpoints.orbax_io import load_checkpoint, read_tokenizer_files
    from jvila.checkpoints.pretrained import resolve_checkpoint
    from jvila.models.llm import LLM
    from jvila.models.nvila import NVILA, nvila_from_params
    from jvila.models.params import model_from_params
    from jvila.vision_config import NVILAConfig

    spec = recipe.model
    if spec.init == "random":
        files = _tokenizer_files(spec.tokenizer)
        cfg = _with_media_ids(recipe.model_config(), files)
        cfg = _extended(cfg, spec)
        _check_vocab(cfg, files)
        module = NVILA if isinstance(cfg, NVILAConfig) else LLM
        return BuiltModel(_random_model(module, cfg, spec.seed, spec.init_std), cfg, files, spec.preprocessor, None)
    cfg, params, tok_dir = load_checkpoint(resolve_checkpoint(spec.init))
    files = read_tokenizer_files(tok_dir)
    preprocessor = None
    if "preprocessor_config.json" in files:
        preprocessor = json.loads(files.pop("preprocessor_config.json"))
    cfg = _extended(cfg, spec)
    build = nvila_from_params if isinstance(cfg, NVILAConfig) else model_from_params
    return BuiltModel(build(cfg, params), cfg, files, preprocessor, spec.init)


def _random_model(module, cfg, seed: int, init_std: float | None = None):
    """`module(cfg)` with weights drawn from `seed`, initialised in one compiled program: op by op,
    every parameter shape would compile its own draw, and threefry's unrolled rounds compile slowly
    (seconds even for a tiny model); XLA's RNG bit generator ("rbg") compiles fast. The same seed
    gives the same weights in every process of a run (the same backend draws them).

    `init_std` rescales the drawn weights: every parameter of two or more axes is drawn at
    `jvila.models.llm.INIT_STD` (norm scales are ones, 1-D biases zeros and stay so)."""
    from jvila.models.llm import INIT_STD

    factor = 1.0 if init_std is None else init_std / INIT_STD

    def make():
        return module(cfg, rngs=nnx.Rngs(params=jax.random.key(seed, impl="rbg")))

    def draw():
        state = nnx.split(make())[1]
        return jax.tree.map(lambda x: x * factor if x.ndim >= 2 else x, state)

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(draw)())


def _tokenizer_files(source: str) -> dict[str, str | bytes]:
    if source == "demo":
        from jvila.data.demo_shapes import demo_tokenizer_files

        return demo_tokenizer_files()
    path = Path(source)
    if not (path / "tokenizer.json").is_file():
        raise RecipeError(f"model.tokenizer {source!r} is not a directory with tokenizer.json (or 'demo')")
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _with_media_ids(cfg, files):
    """A random NVILA config takes its media token ids from the tokenizer unless the recipe gives them."""
    from jvila.processing.media_prompt import ensure_media_tokens, media_end_token_ids
    from jvila.processing.tokenizer import Tokenizer
    from jvila.vision_config import NVILAConfig

    if not isinstance(cfg, NVILAConfig) or (cfg.image_token_id and cfg.video_token_id and cfg.media_end_token_ids):
        return cfg
    tokenizer = Tokenizer.from_files(files)
    ids = ensure_media_tokens(tokenizer)
    if files["tokenizer.json"] != tokenizer.backend.to_str():
        files["tokenizer.json"] = tokenizer.backend.to_str()  # the media tokens were added: export them
    return dataclasses.replace(cfg, image_token_id=cfg.image_token_id or ids["image"],
                               video_token_id=cfg.video_token_id or ids["video"],
                               media_end_token_ids=cfg.media_end_token_ids or tuple(media_end_token_ids(tokenizer)))


def _extended(cfg, spec):
    if spec.context_length is None:
        return cfg
    from jvila.models.long_context import extend_context
    from jvila.vision_config import NVILAConfig

    try:
        if isinstance(cfg, NVILAConfig):
            return dataclasses.replace(cfg, llm=extend_context(cfg.llm, spec.context_length, theta=spec.rope_theta))
        return extend_context(cfg, spec.context_length, theta=spec.rope_theta)
    except ValueError as err:
        raise RecipeError(f"model.context_length: {err}") from None


def _check_vocab(cfg, files):
    from jvila.processing.tokenizer import Tokenizer
    from jvila.vision_config import NVILAConfig

    llm = cfg.llm if isinstance(cfg, NVILAConfig) else cfg
    size = Tokenizer.from_files(files).vocab_size
    if size > llm.vocab_size:
        raise RecipeError(f"the tokenizer has {size} tokens but model.config's vocab_size is {llm.vocab_size}")


def media_settings(built: BuiltModel):
    from jvila.processing.media_prompt import MediaSettings
    from jvila.vision_config import NVILAConfig

    if not isinstance(built.config, NVILAConfig):
        return None
    if built.preprocessor is None:
        raise RecipeError("an NVILA model needs its image preprocessor settings (preprocessor_config.json)")
    return MediaSettings.from_config(built.config, built.preprocessor)


# ----------------------------------------------------------------------------------------------
# Batches across processes
# ----------------------------------------------------------------------------------------------

# The [B, L] entries of a batch (split over sequence shards too); every other entry is media, split by rows only.
TOKEN_ENTRIES = ("tokens", "targets", "weights", "positions", "segment_ids")


def batch_sharding(name: str, shape: tuple[int, ...], mesh) -> NamedSharding:
    """Rows over the batch axes, tokens over the sequence axes; media entries' (images, videos, ...)
    other axes whole."""
    if name not in TOKEN_ENTRIES:
        names = ("batch",) + (None,) * (len(shape) - 1)
    else:
        names = ("batch", "sequence")[: len(shape)] + (None,) * max(len(shape) - 2, 0)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def global_batch(local: dict, mesh) -> dict:
    """This process's rows of every entry → global arrays (rows of all processes, in process order)."""
    ways = mesh.shape.get(RING_AXIS, 1) * mesh.shape.get(A2A_AXIS, 1)
    placed = {}
    for name, value in local.items():
        value = np.asarray(value)
        if name in TOKEN_ENTRIES and value.ndim >= 2 and value.shape[1] % ways:
            raise ValueError(f"batch entry {name!r} has length {value.shape[1]}, not divisible by the {ways} "
                             "sequence shards of the mesh: choose a packing length they divide")
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        placed[name] = jax.make_array_from_process_local_data(batch_sharding(name, global_shape, mesh), value,
                                                              global_shape)
    return placed


def make_attention(kind: str, mesh):
    from jvila.models.attention import dense_attention
    from jvila.models.kernel_attention import KernelAttention

    if kind == "dense":
        if mesh.shape.get(RING_AXIS, 1) * mesh.shape.get(A2A_AXIS, 1) > 1:
            raise RecipeError("train.attention 'dense' cannot split sequences; use auto or reference")
        return dense_attention
    return KernelAttention("reference" if kind == "reference" else None, mesh=mesh if mesh.size > 1 else None)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    """Everything one run holds between set-up, steps and export."""

    recipe: Recipe
    mesh: object
    built: BuiltModel
    state: object  # jvila.train.step.TrainState, placed on the mesh
    step_fn: object
    iterator: object
    flops_model: object
    lora_config: object  # LoraConfig or None


def train(recipe: Recipe, *, max_steps: int | None = None, devices=None, iterator=None) -> TrainSummary:
    """Run (or resume) `recipe`.

    `max_steps` stops early after that global step (the schedule stays the recipe's: a later call
    resumes and finishes it). `devices`: the mesh's devices (default: all of every process; given,
    the caller has set JAX up and jax.distributed is not started here). `iterator`: batches from
    elsewhere instead of the recipe's data pipeline: an iterator of this process's rows in the batch
    format, with `get_state()` / `set_state()` for checkpoints.
    """
    from jvila.train.checkpointing import TrainCheckpointer
    from sharding.multihost import initialize_from_environment

    if devices is None and not _distributed_started():
        initialize_from_environment()
    run = _prepare(recipe, devices, iterator)
    checkpointer = TrainCheckpointer(recipe.checkpoint_dir, every=recipe.checkpoint.every,
                                     keep=recipe.checkpoint.keep, async_save=recipe.checkpoint.async_save)
    try:
        start = checkpointer.latest_step() or 0
        if start:
            run.state, _ = checkpointer.restore(start, run.state, run.iterator)
            log.info("resumed from %s at step %d", recipe.checkpoint_dir, start)
        stop = min(recipe.train.steps, max_steps) if max_steps is not None else recipe.train.steps
        losses, ran_out_at = _steps(run, checkpointer, start, stop)
        checkpointer.wait()
    finally:
        checkpointer.close()
        close = getattr(run.iterator, "close", None)
        if close is not None:
            close()  # worker processes of the data pipeline
    skipped = getattr(run.iterator, "skipped_total", None)
    if skipped:
        log.info("skipped %s records (see the warnings above)", skipped)
    stop = ran_out_at if ran_out_at is not None else stop
    export_dir = None
    finished = stop == recipe.train.steps or ran_out_at is not None
    if recipe.export and finished and (start < stop or not _exported(recipe.export_dir)):
        export_dir = export_trained(recipe, run.built, run.state, run.lora_config)
    return TrainSummary(start_step=start, final_step=stop, losses=losses, export_dir=export_dir,
                        skipped_records=skipped if isinstance(skipped, int) else None)


def _prepare(recipe: Recipe, devices, iterator) -> _Run:
    """Mesh, model, train state on the mesh, the jitted step and the data iterator."""
    from jvila.data.pipeline import build_train_iterator
    from jvila.models.lora import init_adapter
    from jvila.processing.tokenizer import Tokenizer
    from jvila.train.metrics import flop_model
    from jvila.train.optimizer import (
        build_optimizer,
        frozen_mask,
        leaf_names,
        trainable_mask,
    )
    from jvila.train.step import init_train_state, make_train_step, place_train_state

    try:
        mesh = build_mesh(recipe.mesh, devices)
    except ValueError as err:
        raise RecipeError(f"mesh: {err}") from None
    if recipe.data.global_batch_size % jax.process_count():
        raise RecipeError(f"data.global_batch_size {recipe.data.global_batch_size} does not divide among "
                          f"{jax.process_count()} processes")
    built = build_model(recipe)
    graphdef, params = nnx.split(built.model)
    lora_cfg = make_lora_config(recipe.lora) if recipe.lora is not None else None
    try:
        mask = frozen_mask(params) if lora_cfg else trainable_mask(params, recipe.stage)
        optimizer = build_optimizer(recipe.optimizer, params, mask, recipe.train.steps)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    adapter = None
    if lora_cfg is not None:
        adapter = init_adapter(getattr(built.config, "llm", built.config), lora_cfg,
                               jax.random.key(recipe.model.seed + 1))
    state = _canonical_placement(place_train_state(
        init_train_state(graphdef, params, optimizer, mask, lora=adapter), mesh))
    names = leaf_names(params)
    flops_model = flop_model(built.config, dict(zip(names, (tuple(x.shape) for x in jax.tree.leaves(params)))),
                             dict(zip(names, jax.tree.leaves(mask))), lora=lora_cfg is not None)
    step_fn = make_train_step(graphdef, optimizer, attention=make_attention(recipe.train.attention, mesh),
                              remat=recipe.train.remat, compute_dtype=COMPUTE_DTYPES[recipe.train.compute_dtype],
                              grad_accum=recipe.train.grad_accum, lora_config=lora_cfg)
    if iterator is None:
        iterator = build_train_iterator(recipe.data, Tokenizer.from_files(built.tokenizer_files),
                                        media_settings(built), _nvila_config(built.config),
                                        process_index=jax.process_index(), process_count=jax.process_count())
    return _Run(recipe, mesh, built, state, step_fn, iterator, flops_model, lora_cfg)


def _steps(run: _Run, checkpointer, start: int, stop: int) -> tuple[dict[int, float], int | None]:
    """Steps start+1 .. stop: (loss per step, the step the data ran out at or None)."""
    from jvila.train.metrics import MetricsWriter, peak_tflops

    recipe = run.recipe
    primary = jax.process_index() == 0
    peak = recipe.train.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
    writer = MetricsWriter(recipe.tensorboard_dir, enabled=primary)
    metrics_file = _open_metrics(Path(recipe.output_dir) / METRICS_FILE) if primary else None
    progress = _progress_bar(recipe, start, stop, enabled=primary and recipe.train.progress)
    base_key = jax.random.key(recipe.train.seed)
    losses: dict[int, float] = {}
    window: list[tuple[int, dict, float, int]] = []  # (step, device metrics, flops, tokens) since the last log
    window_start = time.perf_counter()
    ran_out_at = None

    def log_window():
        nonlocal window, window_start
        window_start = _log_window(window, window_start, writer, metrics_file, progress, losses, peak=peak,
                                   total_steps=recipe.train.steps)
        window = []

    try:
        for step in range(start, stop):
            try:
                local = next(run.iterator)
            except StopIteration:  # a finite dataset (data.num_epochs) ran out: end here, saved and exported
                log.warning("the data ran out after %d steps (of %d): stopping there", step, recipe.train.steps)
                ran_out_at = step
                if window:
                    log_window()
                if step > start and not checkpointer.should_save(step, last=False):  # else saved already
                    checkpointer.save(step, run.state, run.iterator, notes={"recipe": recipe.name})
                break
            flops, tokens = _local_work(run.flops_model, local)
            run.state, metrics = run.step_fn(run.state, global_batch(local, run.mesh),
                                             jax.random.fold_in(base_key, step))
            window.append((step + 1, metrics, flops, tokens))
            last = step + 1 == stop
            # The first step is logged alone: its time is mostly compilation.
            if (step + 1) % recipe.train.log_every == 0 or last or step == start:
                log_window()
            progress.update(1)
            if checkpointer.should_save(step + 1, last=last):
                checkpointer.save(step + 1, run.state, run.iterator, notes={"recipe": recipe.name})
    finally:
        progress.close()
        writer.close()
        if metrics_file is not None:
            metrics_file.close()
    return losses, ran_out_at


def _distributed_started() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except Exception:  # noqa: BLE001 - a private API: assume not started
        return False


def _nvila_config(cfg):
    from jvila.vision_config import NVILAConfig

    return cfg if isinstance(cfg, NVILAConfig) else None


def _local_work(flops_model, local: dict) -> tuple[float, int]:
    from jvila.train.metrics import batch_tokens, step_flops

    return step_flops(flops_model, local), batch_tokens(local)


def _log_window(window, window_start, writer, metrics_file, progress, losses, *, peak, total_steps):
    """Fetch the window's metrics (one device sync), print the last step's line, write every step's."""
    fetched = jax.device_get([m for _, m, _, _ in window])
    now = time.perf_counter()
    flops = sum(f for _, _, f, _ in window)
    tokens = sum(t for _, _, _, t in window)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flops, tokens = (float(v) for v in np.sum(multihost_utils.process_allgather(np.array([flops, tokens])),
                                                  axis=0))
    elapsed = max(now - window_start, 1e-9)
    step_time = elapsed / len(window)
    mfu = None if not peak else flops / elapsed / (peak * 1e12 * jax.device_count())
    for (step, _, _, _), values in zip(window, fetched):
        values = {k: float(v) for k, v in values.items()}
        losses[step] = values["loss"]
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": step, **values}) + "\n")
    if metrics_file is not None:
        metrics_file.flush()
    scalars = {**{k: float(v) for k, v in fetched[-1].items()}, "tokens_per_s": tokens / elapsed,
               "step_time_s": step_time, "mfu": mfu}
    line = writer.write(window[-1][0], scalars, total_steps=total_steps)
    if writer.enabled:
        progress.write(line, file=sys.stderr)
    return now


def _progress_bar(recipe, start, stop, *, enabled):
    from tqdm import tqdm

    return tqdm(total=stop, initial=start, desc=recipe.name or "train", unit="step", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


def _canonical_placement(tree):
    """Every leaf's NamedSharding in the form a jitted step returns it (trailing unsharded dims
    dropped from the spec: P(None, None) is P()). Equivalent placements, no data moves; the step is
    compiled once per distinct set of input shardings, so the first step's inputs must already
    look like every later step's (the previous step's outputs), or the second step compiles again."""
    from jax.sharding import PartitionSpec

    def canonical(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return x
        spec = list(sharding.spec)
        while spec and spec[-1] is None:
            spec.pop()
        if tuple(spec) == tuple(sharding.spec):
            return x
        return jax.device_put(x, NamedSharding(sharding.mesh, PartitionSpec(*spec)))

    return jax.tree.map(canonical, tree)


def _exported(path: Path) -> bool:
    return (path / "jvila_config.json").is_file() or (path / "adapter_config.json").is_file()


def _open_metrics(path: Path):
    """metrics.jsonl for appending (a resumed run adds its steps; readers keep a step's last line).
    A run killed mid-write leaves a partial line: it is ended so the next record starts afresh."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    f.seek(0, 2)
    if f.tell():
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def export_trained(recipe: Recipe, built: BuiltModel, state, lora_cfg) -> Path:
    """The trained model as a jvila checkpoint (jvila.load / jvila serve), or a PEFT adapter for LoRA."""
    from jvila.models.params import flat_params
    from jvila.train.checkpointing import export, host_array
    from jvila.train.step import full_params, lora_adapter

    dst = recipe.export_dir
    if lora_cfg is not None:
        from jvila.checkpoints.peft_adapter import save_peft

        adapter = lora_adapter(jax.tree.map(host_array, state), lora_cfg)
        if jax.process_index() == 0:
            save_peft(adapter, dst, base_model_name=built.base_name, overwrite=True)
        log.info("exported the LoRA adapter to %s (jvila serve --model %s --lora NAME=%s)", dst,
                 built.base_name or "BASE", dst)
        return dst
    export(flat_params(full_params(state)), built.config, built.tokenizer_files, dst, preprocessor=built.preprocessor)
    log.info("exported the trained model to %s (jvila.load / jvila serve --model)", dst)
    return dst
