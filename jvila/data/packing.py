"""Pack tokenized examples into fixed rows of length L: the batch format the train step takes.

Rows of one batch fill first-fit: each example goes to the first row with room for its tokens and
its images; when an example fits no row, the batch is complete and the example opens the next
one. Deterministic: the same examples in the same order give the same batches.

A batch (numpy, B rows):
  tokens      int32   [B, L]  input ids; padding = the pad id
  targets     int32   [B, L]  the next token of the same sequence (0 where weights are 0)
  weights     float32 [B, L]  1 where the target is a learned (assistant) token, else 0
  positions   int32   [B, L]  0, 1, ... restarting at each packed sequence; 0 on padding
  segment_ids int32   [B, L]  1, 2, ... per packed sequence of the row; 0 on padding
  images      float32 [B, M, H, W, 3]  the row's image tiles in order of appearance; zeros unused
                               (only when the packer was given an image shape)
  videos      float32 [B, V, T, H, W, 3]  the row's videos (T frames each) in order of appearance;
                               zeros unused (only when the packer was given a video shape)
  s2_index, s2_weight, s2_rows   Dynamic-S2 tables (jvila.train.dynamic_s2), only when the packer
                               was given an S2 layout; `images` then holds N = max_tiles_per_row
                               tiles: every tile of the row's images
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(eq=False)  # arrays inside: compared by identity
class Example:
    """One tokenized conversation: ids, loss mask (1 = learned token) and its image tiles in order."""

    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 [n]
    images: np.ndarray | None = None  # float32 [m, H, W, 3]
    record_id: str | None = None
    videos: np.ndarray | None = None  # float32 [v, T, H, W, 3]
    # Dynamic-S2 batches: per image, its last-scale (rows, cols) grid or None (one tile); the image's
    # tiles are consecutive in `images`. None: every image one tile.
    image_grids: tuple | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else len(self.images)

    @property
    def num_videos(self) -> int:
        return 0 if self.videos is None else len(self.videos)


def unfit_reason(example: Example, length: int, max_images: int, max_videos: int = 0, *,
                 image_budget: str = "max_images_per_row") -> tuple[str, str] | None:
    """(reason, detail) when `example` can never be packed into a row ("too_long", "too_many_images"
    or "too_many_videos"), None when it can."""
    if len(example.tokens) > length:
        return "too_long", f"{len(example.tokens)} tokens exceed the packing length {length}"
    if example.num_images > max_images:
        return "too_many_images", f"{example.num_images} image tiles exceed {image_budget} {max_images}"
    if example.num_videos > max_videos:
        return "too_many_videos", f"{example.num_videos} videos exceed max_videos_per_row {max_videos}"
    return None


class RowPacker:
    """Collects examples into `rows` rows of `length` tokens (and at most `max_images` images each)."""

    def __init__(self, rows: int, length: int, *, max_images: int = 0,
                 image_shape: tuple[int, int, int] | None = None, pad_id: int = 0, max_videos: int = 0,
                 video_shape: tuple[int, int, int, int] | None = None, s2=None):
        if rows < 1 or length < 2:
            raise ValueError(f"need at least one row of at least 2 tokens, got {rows} rows of {length}")
        self.rows, self.length, self.max_images = rows, length, max_images
        self.image_shape, self.pad_id = image_shape, pad_id
        self.max_videos, self.video_shape = max_videos, video_shape  # video_shape: (T, H, W, 3)
        self._segments: list[list[Example]] = [[] for _ in range(rows)]
        self._used = [0] * rows
        self._images = [0] * rows
        self._videos = [0] * rows
        # A jvila.train.dynamic_s2.S2Layout: `max_images` counts tiles and batches carry its tables.
        self.s2 = s2
        self.image_budget = "max_tiles_per_row" if s2 is not None else "max_images_per_row"

    @property
    def empty(self) -> bool:
        return not any(self._used)

    def first_fit(self, example: Example) -> int | None:
        """The first row with room for `example`, or None."""
        n, m, v = len(example.tokens), example.num_images, example.num_videos
        for row in range(self.rows):
            if (self._used[row] + n <= self.length and self._images[row] + m <= self.max_images
                    and self._videos[row] + v <= self.max_videos):
                return row
        return None

    def add(self, example: Example, row: int) -> None:
        if example.num_images and self.image_shape is None:
            raise ValueError(f"example {example.record_id!r} has images but the packer takes text only")
        if example.num_videos and self.video_shape is None:
            raise ValueError(f"example {example.record_id!r} has videos but the packer takes none")
        self._segments[row].append(example)
        self._used[row] += len(example.tokens)
        self._images[row] += example.num_images
        self._videos[row] += example.num_videos

    def batch(self) -> dict[str, np.ndarray]:
        """The packed batch; the packer is left empty."""
        b, length = self.rows, self.length
        out = {
            "tokens": np.full((b, length), self.pad_id, np.int32),
            "targets": np.zeros((b, length), np.int32),
            "weights": np.zeros((b, length), np.float32),
            "positions": np.zeros((b, length), np.int32),
            "segment_ids": np.zeros((b, length), np.int32),
        }
        if self.image_shape is not None:
            out["images"] = np.zeros((b, self.max_images, *self.image_shape), np.float32)
        if self.video_shape is not None:
            out["videos"] = np.zeros((b, self.max_videos, *self.video_shape), np.float32)
        for row, segments in enumerate(self._segments):
            start, image_slot, video_slot = 0, 0, 0
            for segment_id, example in enumerate(segments, 1):
                n = len(example.tokens)
                end = start + n
                out["tokens"][row, start:end] = example.tokens
                # The target of position t is token t+1 of the same sequence; a sequence's last token
                # has no target (weight 0), so nothing is learned across a segment boundary.
                out["targets"][row, start:end - 1] = example.tokens[1:]
                out["weights"][row, start:end - 1] = example.loss_mask[1:]
                out["positions"][row, start:end] = np.arange(n)
                out["segment_ids"][row, start:end] = segment_id
                image_slot = _place(out, "images", row, image_slot, example.images, self.image_shape,
                                    example.record_id)
                video_slot = _place(out, "videos", row, video_slot, example.videos, self.video_shape,
                                    example.record_id)
                start = end
        if self.s2 is not None:
            out.update(self.s2.batch_tables([
                [grid for example in segments for grid in (example.image_grids or (None,) * example.num_images)]
                for segments in self._segments]))
        self._segments = [[] for _ in range(self.rows)]
        self._used = [0] * self.rows
        self._images = [0] * self.rows
        self._videos = [0] * self.rows
        return out


def pack_examples(examples, rows: int, length: int, *, max_images: int = 0,
                  image_shape: tuple[int, int, int] | None = None, pad_id: int = 0, max_videos: int = 0,
                  video_shape: tuple[int, int, int, int] | None = None
                  ) -> tuple[list[dict[str, np.ndarray]], list[tuple[Example, str]]]:
    """Pack a finite sequence of examples: (batches, [(unpackable example, reason), ...]).

    The last batch may be partly empty. The streaming pipeline packs the same way, one batch at a time.
    """
    packer = RowPacker(rows, length, max_images=max_images, image_shape=image_shape, pad_id=pad_id,
                       max_videos=max_videos, video_shape=video_shape)
    batches, skipped = [], []
    for example in examples:
        unfit = unfit_reason(example, length, max_images, max_videos)
        if unfit is not None:
            skipped.append((example, unfit[0]))
            continue
        row = packer.first_fit(example)
        if row is None:
            batches.append(packer.batch())
            row = 0
        packer.add(example, row)
    if not packer.empty:
        batches.append(packer.batch())
    return batches, skipped


def _place(out: dict, key: str, row: int, slot: int, media, shape, record_id) -> int:
    """Write an example's `media` (tiles or videos, or None) into out[key][row] from `slot`; the next slot."""
    if media is None or len(media) == 0:
        return slot
    if tuple(media.shape[1:]) != tuple(shape):
        what = "image tiles" if key == "images" else key
        raise ValueError(f"example {record_id!r} has {what} of shape {tuple(media.shape[1:])}, the batch takes "
                         f"{tuple(shape)}")
    out[key][row, slot:slot + len(media)] = media
    return slot + len(media)
