"""The training input pipeline (Grain): records -> examples -> packed batches of this process's rows.

    source (raw records of every file)
      -> this process's shard  (records p, p + P, p + 2P, ...: disjoint across processes, covering)
      -> shuffle by seed       (Grain's index shuffle; a fresh order each epoch)
      -> repeat num_epochs     (None: forever)
      -> prepare               (parse, tokenize with the chat template and VILA's label mask,
                                decode + tile images; in `num_workers` processes when > 0)
      -> pack                  (first-fit into global_batch_size / process_count rows of L tokens)

Everything up to packing is a Grain dataset; packing is `TrainIterator`, a Grain `DatasetIterator`
whose `get_state()` / `set_state()` cover the whole chain (JSON-serializable, as Grain's checkpoint
handler writes it): a resumed iterator yields exactly the batches an uninterrupted one would.

Bad records — malformed JSON, no assistant turn, a missing or corrupt image, more tokens than L,
more images than max_images_per_row — are skipped with a `SkippedRecordWarning` and counted in
`iterator.skipped` (by reason; the counts are part of the saved state). The run goes on.

Worker processes are spawned (Grain's choice): a script that builds the iterator with
`num_workers > 0` needs the `if __name__ == "__main__":` guard. Each process packs its own shard,
so with a finite `num_epochs` processes may run out of batches at different steps; on many hosts
train for a number of steps over `num_epochs=None`.

Sources: `.jsonl` / `.json` record files (records.py), or `tfds:NAME[:SPLIT]` for a
tensorflow-datasets dataset prepared locally (not downloaded; tensorflow-datasets is not a
dependency): its examples must carry "conversations" (a list or JSON text) and optionally "image"
(encoded bytes or a uint8 array) — LLaVA's layout.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Sequence

import grain
import numpy as np

from jvila.data.conversation import ensure_sentinel_token, tokenize_record
from jvila.data.packing import Example, RowPacker, unfit_reason
from jvila.data.records import RecordError, parse_record, read_record_file
from jvila.processing.errors import MediaError

log = logging.getLogger(__name__)

# Why a record was skipped; the keys of `TrainIterator.skipped`.
SKIP_REASONS = ("bad_record", "bad_media", "too_long", "too_many_images", "unsupported")


class SkippedRecordWarning(UserWarning):
    """A training record was skipped (counted in the iterator's `skipped`)."""


@dataclasses.dataclass
class DataConfig:
    """What to read and how to batch it. `paths`: .jsonl/.json files or "tfds:NAME[:SPLIT]" sources;
    image paths in records are relative to `image_root` (default: each record file's directory)."""

    paths: Sequence[str] = ()
    image_root: str | None = None
    packing_length: int = 2048
    max_images_per_row: int = 4
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0  # 0 = prepare in this process (with `read_threads` threads)
    num_epochs: int | None = None  # None = repeat forever
    read_threads: int = 2
    worker_buffer_size: int = 4

    def __post_init__(self):
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        self.paths = [os.fspath(p) for p in self.paths]
        if not self.paths:
            raise ValueError("DataConfig.paths names no record file")
        for name in ("packing_length", "global_batch_size", "read_threads", "worker_buffer_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DataConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.packing_length < 2:
            raise ValueError(f"DataConfig.packing_length must be at least 2, got {self.packing_length}")
        if self.max_images_per_row < 0 or self.num_workers < 0:
            raise ValueError("DataConfig.max_images_per_row and num_workers must not be negative")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs must be at least 1 or None (forever), got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"DataConfig.seed must lie in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What `prepare` yields for a bad record: counted and reported by the iterator."""

    record_id: Any
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class _Media:
    """How a prepared example's images become tiles (None fields: a text-only model)."""

    settings: Any  # jvila.processing.media_prompt.MediaSettings
    image_token_id: int
    image_tokens: int  # K: rows of one image block, end tokens included


class PrepareExample:
    """One raw record -> `Example` (or `Skipped`). Picklable: Grain's worker processes run it."""

    def __init__(self, tokenizer, media: _Media | None, image_roots: list[str | None]):
        self.tokenizer, self.media, self.image_roots = tokenizer, media, image_roots

    def __call__(self, item) -> Example | Skipped:
        raw, source, index = item
        record_id = f"#{index}"  # until the record names itself
        try:
            raw, in_memory = (raw, None) if isinstance(raw, str) else _tfds_record(raw, record_id)
            record = parse_record(raw, self.image_roots[source], fallback_id=record_id)
            record_id = record.id
            if record.videos:
                return Skipped(record.id, "unsupported", "video records are not trained yet")
            images = list(in_memory) if in_memory is not None else list(record.images)
            if images and self.media is None:
                return Skipped(record.id, "unsupported", "the record has images but the model takes text only")
            tiles, per_image = self._tiles(images)
            tokens, mask = tokenize_record(
                self.tokenizer, record, image_token_id=None if self.media is None else self.media.image_token_id,
                image_tokens=1 if self.media is None else self.media.image_tokens,
                images_per_placeholder=per_image if any(n > 1 for n in per_image) else None)
        except RecordError as e:
            return Skipped(e.record_id, "bad_record", e.problem)
        except MediaError as e:
            return Skipped(record_id, "bad_media", str(e))
        return Example(tokens, mask, tiles, record.id)

    def _tiles(self, images) -> tuple[np.ndarray | None, list[int]]:
        if not images:
            return None, []
        from jvila.processing.image import load_rgb
        from jvila.processing.media_prompt import single_tile
        from jvila.processing.tiling import dynamic_tiles

        settings = self.media.settings
        tiles, per_image = [], []
        for source in images:
            image = load_rgb(source)
            if settings.image_aspect_ratio == "dynamic" and len(images) == 1:
                parts = settings.preprocessor(
                    dynamic_tiles(image, settings.min_tiles, settings.max_tiles, settings.tile_size))
            else:
                parts = single_tile(settings, image)
            tiles.append(parts)
            per_image.append(len(parts))
        return np.concatenate(tiles).astype(np.float32), per_image


def _tfds_record(element, fallback_id) -> tuple[dict, list | None]:
    """A tensorflow-datasets example in LLaVA's layout -> (record dict, its in-memory images).

    The record names its images by stand-in paths (so placeholder checks count them); the pixels
    come from the returned list."""
    import PIL.Image

    def text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value

    if not isinstance(element, dict):
        raise RecordError(fallback_id, f"a tfds example must be a dict of features, got {type(element).__name__}")
    record_id = text(element.get("id", fallback_id))
    record_id = fallback_id if record_id is None else str(record_id)
    conversations = text(element.get("conversations"))
    try:
        if isinstance(conversations, str):
            conversations = json.loads(conversations)
        if isinstance(conversations, dict) and "from" in conversations:  # a tfds Sequence of dicts: dict of lists
            conversations = [{"from": text(f), "value": text(v)}
                             for f, v in zip(conversations["from"], conversations["value"])]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(record_id, f"unreadable tfds 'conversations' feature ({e})") from None
    record = {"id": record_id, "conversations": conversations}
    image = element.get("image")
    if image is None:
        return record, None
    record["image"] = ["<tfds image>"]
    if isinstance(image, (bytes, bytearray)):
        return record, [bytes(image)]
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.size == 0:
        raise MediaError(f"a tfds image must be encoded bytes or a non-empty uint8 [H, W, C], got "
                         f"{array.dtype} {array.shape}")
    return record, [PIL.Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)]


def _read_sources(paths: Sequence[str], image_root: str | None) -> tuple[list, list[str | None]]:
    """All raw items (raw, source index, index within the source) and each source's image root."""
    items, roots = [], []
    for source, path in enumerate(paths):
        if path.startswith("tfds:"):
            data = _tfds_source(path)
            items += [(data[i], source, i) for i in range(len(data))]
            roots.append(image_root)
            continue
        lines = read_record_file(path)
        items += [(line, source, i) for i, line in enumerate(lines)]
        roots.append(image_root if image_root is not None else str(pathlib.Path(path).parent))
    if not items:
        raise ValueError(f"the record files {list(paths)} hold no records")
    return items, roots


def _tfds_source(spec: str):
    name, _, split = spec[len("tfds:"):].partition(":")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(f"{spec}: tensorflow-datasets is not installed; install it and prepare {name!r} "
                         "locally (tfds build), or convert the data to JSON lines") from None
    try:
        return tfds.data_source(name, split=split or "train", download=False)
    except Exception as e:  # tfds raises its own errors for unprepared data
        raise ValueError(f"{spec}: cannot open the locally prepared tensorflow-datasets data ({e}); "
                         "nothing is downloaded at training time") from None


class TrainIterator(grain.DatasetIterator):
    """Packed batches over a Grain iterator of prepared examples; checkpointable.

    The state is the example iterator's state before the example waiting for the next batch (so
    restoring re-reads it), plus the skip counts and the number of batches served.
    """

    def __init__(self, examples: grain.DatasetIterator, packer: RowPacker):
        super().__init__(examples)
        self._packer = packer
        self._pending: Example | None = None
        self._state_before_pending: dict | None = None
        self._skipped = collections.Counter()
        self.batches_served = 0

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped records so far, by reason (see SKIP_REASONS)."""
        return dict(self._skipped)

    @property
    def skipped_total(self) -> int:
        return sum(self._skipped.values())

    def __next__(self) -> dict[str, np.ndarray]:
        packer = self._packer
        while True:
            if self._pending is None:
                state = self._parent.get_state()
                try:
                    item = next(self._parent)
                except StopIteration:
                    if packer.empty:
                        raise
                    break  # the last, partly filled batch of a finite run
                if isinstance(item, Skipped):
                    self._skip(item.record_id, item.reason, item.detail)
                    continue
                unfit = unfit_reason(item, packer.length, packer.max_images)
                if unfit is not None:
                    self._skip(item.record_id, *unfit)
                    continue
                self._pending, self._state_before_pending = item, state
            row = packer.first_fit(self._pending)
            if row is None:
                break
            packer.add(self._pending, row)
            self._pending = None
        self.batches_served += 1
        return packer.batch()

    def _skip(self, record_id, reason: str, detail: str) -> None:
        self._skipped[reason] += 1
        message = f"skipped training record {record_id!r} ({reason}): {detail}"
        log.warning(message)
        warnings.warn(message, SkippedRecordWarning, stacklevel=3)

    def get_state(self) -> dict[str, Any]:
        examples = self._state_before_pending if self._pending is not None else self._parent.get_state()
        return {"examples": examples, "skipped": dict(self._skipped), "batches_served": self.batches_served}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["examples"])
        self._pending = self._state_before_pending = None
        self._skipped = collections.Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
        self.batches_served = int(state.get("batches_served", 0))
        # A batch in progress never outlives __next__, so the packer is empty here.

    def close(self) -> None:
        self._parent.close()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app nothing has parsed them, so take
    their defaults (absl's own way to say so) instead of failing on the first read."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_train_iterator(cfg: DataConfig, tokenizer, media_settings=None, nvila_config=None, *,
                         process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
    """An iterator of this process's batches: global_batch_size / process_count rows each.

    tokenizer: a `jvila.processing.tokenizer.Tokenizer` with a chat template (the sentinel token
    VILA's masking needs is added to it if missing). media_settings and nvila_config: None for a
    text-only model; else the image tiles' preprocessing and the model config (image_token_id and
    K = image_token_count(nvila_config) image positions per tile).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if cfg.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} does not divide over {process_count} processes")
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; training conversations need one")
    if (media_settings is None) != (nvila_config is None):
        raise ValueError("give both media_settings and nvila_config (a vision model) or neither (text only)")
    ensure_sentinel_token(tokenizer)
    media, image_shape = None, None
    if nvila_config is not None:
        from jvila.models.nvila import image_token_count
        from jvila.processing.media_prompt import ensure_media_tokens

        image_id = ensure_media_tokens(tokenizer)["image"]
        if image_id != nvila_config.image_token_id:
            raise ValueError(f"the tokenizer's <image> id {image_id} differs from the model's image_token_id "
                             f"{nvila_config.image_token_id}")
        if media_settings.image_aspect_ratio == "dynamic_s2":
            warnings.warn("training feeds each image as one tile; Dynamic-S2 tiling is not trained yet", stacklevel=2)
        media = _Media(media_settings, image_id, image_token_count(nvila_config))
        image_shape = (*media_settings.preprocessor.size, 3)
        if cfg.max_images_per_row < 1:
            raise ValueError("a vision model's DataConfig needs max_images_per_row >= 1")

    items, roots = _read_sources(cfg.paths, cfg.image_root)
    dataset = grain.MapDataset.source(items)[process_index::process_count]
    if len(dataset) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: only {len(items)} in all")
    if cfg.shuffle:
        dataset = dataset.shuffle(seed=cfg.seed)
    dataset = dataset.repeat(cfg.num_epochs).map(PrepareExample(tokenizer, media, roots))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)
    examples = dataset.to_iter_dataset(read)
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    packer = RowPacker(cfg.global_batch_size // process_count, cfg.packing_length,
                       max_images=cfg.max_images_per_row if media else 0, image_shape=image_shape, pad_id=pad_id)
    return TrainIterator(iter(examples), packer)
