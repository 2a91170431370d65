"""Videos of training records → the frames a batch carries, exactly as the inference prompt builder makes them.

A video is `num_video_frames` frames (T, the media settings'; fixed per run so the step compiles
once) sampled uniformly by jvila.processing.video and each processed as one tile
(media_prompt.video_media: the same call serving makes), [T, H, W, 3] float32. In the token
stream it is one `<vila/video>` placeholder widened to Kv = `video_token_count(config, T)` copies
of the video token id: the rows of the block `video_block` splices in (TSP-pooled groups, each
followed by the "\\n" end embeddings).

VILA's training data path (llava/data/dataset_impl/llava.py LLaVADataset + llava/data/base.py)
puts a record's images, then its videos, first in the first user turn and processes each frame as
one image; its main branch then writes one `<image>` per frame (`extract_media`), while the
released NVILA checkpoints' remote code — which jvila's inference follows — writes one
`<vila/video>` per video and TSP-pools the frames. Training here follows jvila's inference, so a
trained model sees at serving time exactly the tokens and embeddings it was trained on.

A video that cannot be used is a MediaError, which the pipeline counts as bad_media and skips: a
missing or unreadable file, no decodable frame, or fewer decodable frames than `min_frames`. VILA's
dataset instead trains such a record on black frames with the answer "Empty video."; skipping
keeps a broken file from teaching that answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jvila.processing.errors import MediaError


@dataclasses.dataclass(frozen=True)
class VideoInputs:
    """How a prepared example's videos become frames and tokens. Picklable (Grain workers run it)."""

    settings: Any  # jvila.processing.media_prompt.MediaSettings
    token_id: int  # the model's video_token_id (`<vila/video>`)
    tokens: int  # Kv: rows of one video block, end tokens included
    num_frames: int  # T
    min_frames: int = 1  # fewer decodable frames than this: bad media

    @property
    def frame_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, *self.settings.preprocessor.size, 3)

    def frames(self, sources: Sequence[Any]) -> np.ndarray:
        """[videos, T, H, W, 3] float32 for the record's videos, in order."""
        from jvila.processing.media_prompt import single_tile
        from jvila.processing.video import load_video_frames

        clips = []
        for source in sources:
            frames = load_video_frames(source, self.num_frames)
            # load_video_frames hands back one image object per distinct sampled frame (a short video
            # repeats them), and a video of n < T frames has all n sampled: the distinct objects count
            # its decodable frames, up to T.
            distinct = len({id(frame) for frame in frames})
            if distinct < min(self.min_frames, self.num_frames):
                raise MediaError(f"video {source} has {distinct} decodable frames, fewer than the "
                                 f"{self.min_frames} min_video_frames asks")
            # Each frame one tile: media_prompt.video_media's own steps, on the frames decoded once.
            clips.append(np.concatenate([single_tile(self.settings, frame) for frame in frames]))
        return np.stack(clips).astype(np.float32)


def video_inputs(tokenizer, settings, nvila_config, min_frames: int = 1) -> VideoInputs:
    """The video side of a vision model's data: token ids checked against the model's, Kv for T frames."""
    from jvila.models.nvila import video_token_count
    from jvila.processing.media_prompt import ensure_media_tokens

    video_id = ensure_media_tokens(tokenizer)["video"]
    if video_id != nvila_config.video_token_id:
        raise ValueError(f"the tokenizer's <vila/video> id {video_id} differs from the model's video_token_id "
                         f"{nvila_config.video_token_id} (set data.max_videos_per_row: 0 to train without videos)")
    if min_frames < 1:
        raise ValueError(f"min_video_frames must be at least 1, got {min_frames}")
    num_frames = settings.num_video_frames
    return VideoInputs(settings, video_id, video_token_count(nvila_config, num_frames), num_frames, min_frames)
