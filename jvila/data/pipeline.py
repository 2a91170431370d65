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

Bad records — malformed JSON, no assistant turn, a missing or corrupt image or video (or one with
fewer decodable frames than min_video_frames), more tokens than L, more images or videos than a
row takes — are skipped with a `SkippedRecordWarning` and counted in
`iterator.skipped` (by reason; the counts are part of the saved state). The run goes on.

Dynamic-S2 (an NVILA with dynamic_s2 features and "dynamic_s2" media settings): a record's lone
image becomes its Dynamic-S2 tiles and one `<image>` of `image_token_count(cfg, grid)` positions,
several images one tile each — what inference does; `images` then holds each row's tiles up to
`max_tiles_per_row`, and the packer adds the tables `jvila.train.dynamic_s2` describes.

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
SKIP_REASONS = ("bad_record", "bad_media", "too_long", "too_many_images", "too_many_videos", "unsupported")


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
    # Videos (a vision model): every batch carries `videos` [B, max_videos_per_row, T, H, W, 3];
    # 0 leaves the entry out (video records are skipped as unsupported). Each video row costs T frames
    # through the tower in every step, used or not: image-only data trains faster with 0.
    max_videos_per_row: int = 1
    min_video_frames: int = 1  # a video with fewer decodable frames is bad media
    # Dynamic-S2 (a dynamic_s2 model with "dynamic_s2" media settings): the row's tile budget, N of
    # `images` [B, N, ...], in place of max_images_per_row. None: enough for max_images_per_row - 1
    # single tiles plus the largest Dynamic-S2 image (1 + 4 + max_tiles tiles for NVILA's scales).
    # Every slot goes through the tower in every step, used or not: size it to the data.
    max_tiles_per_row: int | None = None
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
        if self.max_videos_per_row < 0 or self.min_video_frames < 1:
            raise ValueError(f"DataConfig.max_videos_per_row must not be negative (got {self.max_videos_per_row}) "
                             f"and min_video_frames must be at least 1 (got {self.min_video_frames})")
        if self.max_tiles_per_row is not None and self.max_tiles_per_row < 1:
            raise ValueError(f"DataConfig.max_tiles_per_row must be at least 1 or None, got {self.max_tiles_per_row}")
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
    s2: Any = None  # jvila.train.dynamic_s2.S2Layout when training Dynamic-S2 tiles


class PrepareExample:
    """One raw record -> `Example` (or `Skipped`). Picklable: Grain's worker processes run it."""

    def __init__(self, tokenizer, media: _Media | None, image_roots: list[str | None], videos=None):
        self.tokenizer, self.media, self.image_roots = tokenizer, media, image_roots
        self.videos = videos  # jvila.data.video_examples.VideoInputs, None: video records are skipped

    def __call__(self, item) -> Example | Skipped:
        raw, source, index = item
        record_id = f"#{index}"  # until the record names itself
        try:
            raw, in_memory = (raw, None) if isinstance(raw, str) else _tfds_record(raw, record_id)
            record = parse_record(raw, self.image_roots[source], fallback_id=record_id)
            record_id = record.id
            if record.videos and self.videos is None:
                why = "the model takes text only" if self.media is None else "max_videos_per_row is 0"
                return Skipped(record.id, "unsupported", f"the record has videos but {why}")
            images = list(in_memory) if in_memory is not None else list(record.images)
            if images and self.media is None:
                return Skipped(record.id, "unsupported", "the record has images but the model takes text only")
            s2 = self.media is not None and self.media.s2 is not None
            tiles, per_image, grids = self._s2_tiles(images) if s2 else (*self._tiles(images), None)
            clips = self.videos.frames(record.videos) if record.videos else None
            tokens, mask = tokenize_record(
                self.tokenizer, record, image_token_id=None if self.media is None else self.media.image_token_id,
                image_tokens=1 if self.media is None else self.media.s2.image_rows(grids[0]) if grids
                else self.media.image_tokens,
                images_per_placeholder=per_image if any(n > 1 for n in per_image) else None,
                video_token_id=None if self.videos is None else self.videos.token_id,
                video_tokens=1 if self.videos is None else self.videos.tokens)
        except RecordError as e:
            return Skipped(e.record_id, "bad_record", e.problem)
        except MediaError as e:
            return Skipped(record_id, "bad_media", str(e))
        return Example(tokens, mask, tiles, record.id, videos=clips, image_grids=grids)

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


    def _s2_tiles(self, images) -> tuple[np.ndarray | None, list[int], tuple | None]:
        """(tiles, [1] per image, per-image grids) as inference makes them (`media_prompt.image_media`): a
        record's lone image → its Dynamic-S2 tiles and (rows, cols) grid, one `<image>` for all of them;
        several images → one tile each (grid None).

        VILA's training dataset differs here: LazySupervisedDataset (llava/data/dataset.py) passes every
        image of a record through `dynamic_s2_process_images_and_prompt`, so multi-image records train on
        Dynamic-S2 tiles of each image, while its inference (`generate_content`) tiles only a lone image.
        We follow inference, so training sees exactly the tokens serving will feed.
        """
        if not images:
            return None, [], None
        from jvila.processing.media_prompt import image_media

        media = image_media(self.media.settings, images)
        return (np.concatenate([m.tiles for m in media]).astype(np.float32), [1] * len(media),
                tuple(m.grid for m in media))


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


def _s2_layout(cfg: DataConfig, settings, nvila_config):
    """The Dynamic-S2 batch layout when the model and the media settings both use Dynamic-S2, else None."""
    if settings.image_aspect_ratio != "dynamic_s2":
        return None
    from jvila.train.dynamic_s2 import S2Layout

    if not nvila_config.dynamic_s2:
        raise ValueError("the media settings tile images with Dynamic-S2 but the model has no dynamic_s2 features")
    if tuple(settings.s2_scales) != tuple(nvila_config.s2_scales) or settings.tile_size != nvila_config.vision.image_size:
        raise ValueError(f"the media settings' S2 scales {tuple(settings.s2_scales)} and {settings.tile_size} px tiles "
                         f"differ from the model's {tuple(nvila_config.s2_scales)} and "
                         f"{nvila_config.vision.image_size} px tower")
    budget = cfg.max_tiles_per_row
    if budget is None:
        largest = S2Layout.create(nvila_config, 1 << 30, settings.max_tiles).image_tiles((1, settings.max_tiles))
        budget = max(cfg.max_images_per_row, 1) - 1 + largest
    return S2Layout.create(nvila_config, budget, settings.max_tiles)


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
                unfit = unfit_reason(item, packer.length, packer.max_images, packer.max_videos,
                                     image_budget=packer.image_budget)
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
    K = image_token_count(nvila_config) image positions per tile; with max_videos_per_row > 0, videos
    of the settings' num_video_frames frames, Kv = video_token_count(nvila_config, T) positions each).
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
    media, image_shape, videos = None, None, None
    if nvila_config is not None:
        from jvila.models.nvila import image_token_count
        from jvila.processing.media_prompt import ensure_media_tokens

        image_id = ensure_media_tokens(tokenizer)["image"]
        if image_id != nvila_config.image_token_id:
            raise ValueError(f"the tokenizer's <image> id {image_id} differs from the model's image_token_id "
                             f"{nvila_config.image_token_id}")
        s2 = _s2_layout(cfg, media_settings, nvila_config)
        media = _Media(media_settings, image_id, image_token_count(nvila_config), s2)
        image_shape = (*media_settings.preprocessor.size, 3)
        if cfg.max_images_per_row < 1:
            raise ValueError("a vision model's DataConfig needs max_images_per_row >= 1")
        if cfg.max_videos_per_row > 0:
            from jvila.data.video_examples import video_inputs

            videos = video_inputs(tokenizer, media_settings, nvila_config, cfg.min_video_frames)

    items, roots = _read_sources(cfg.paths, cfg.image_root)
    s2 = media.s2 if media else None
    dataset = grain.MapDataset.source(items)[process_index::process_count]
    if len(dataset) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records: only {len(items)} in all")
    if cfg.shuffle:
        dataset = dataset.shuffle(seed=cfg.seed)
    dataset = dataset.repeat(cfg.num_epochs).map(PrepareExample(tokenizer, media, roots, videos))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * cfg.read_threads)
    examples = dataset.to_iter_dataset(read)
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        examples = examples.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    packer = RowPacker(cfg.global_batch_size // process_count, cfg.packing_length,
                       max_images=(s2.max_tiles if s2 else cfg.max_images_per_row) if media else 0,
                       image_shape=image_shape, pad_id=pad_id, s2=s2 if media else None,
                       max_videos=cfg.max_videos_per_row if videos else 0,
                       video_shape=videos.frame_shape if videos else None)
    return TrainIterator(iter(examples), packer)
