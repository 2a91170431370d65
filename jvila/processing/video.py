"""Sample N frames spread uniformly over a video file (decoded with PyAV) or a folder of frames.

Matched against NVlabs/VILA's `_load_video` (llava/remote_code/media.py, the loader the released
NVILA checkpoints ship; llava/utils/media.py before its fps option):

- Frame indices are `round(linspace(0, frame_count - 1, N))` with NumPy's round-half-to-even.
  A video with fewer frames than asked therefore repeats frames and still yields N of them.
- A folder is read as its sorted, non-hidden entries (glob "*"), sampled the same way.
- A container's frame count may be wrong: VILA seeks back from the reported count to the last frame
  that can be read. Here the reported count is used when it holds; when decoding ends before it
  (a truncated file), the count becomes the number of frames that decoded, and the indices are
  drawn again over those. When the container reports no count (e.g. Matroska), frames are counted
  by decoding. A video with no decodable frame is a MediaError, as in VILA.

Differences that cannot be removed: VILA decodes with OpenCV (BGR, then converted to RGB); here
PyAV converts to RGB with FFmpeg's swscale defaults, so pixels can differ by a few levels from
OpenCV's conversion. VILA's fps-based sampling (`config.fps > 0`, main branch only; the released
remote code ignores fps) is not implemented.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Callable
from typing import Union

import av
import numpy as np
import PIL.Image

from jvila.processing.errors import MediaError
from jvila.processing.image import load_image, local_path, read_data_url

VideoSource = Union[str, os.PathLike, bytes, bytearray]


def sample_frame_indices(frame_count: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread uniformly over `frame_count`, ends included."""
    if frame_count < 1:
        raise MediaError("cannot sample frames from a video with no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    return [int(i) for i in np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int)]


def load_video_frames(source: VideoSource, num_frames: int) -> list[PIL.Image.Image]:
    """`num_frames` frames (PIL images, in time order, repeats allowed) from a video or a folder of frames."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        return _frames_from_video(lambda: io.BytesIO(data), "video bytes", num_frames)
    if isinstance(source, str) and source.startswith("data:"):
        data = read_data_url(source)
        return _frames_from_video(lambda: io.BytesIO(data), "video data URL", num_frames)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(f"cannot read a video from a {type(source).__name__}; pass a path, bytes or a data: URL")
    path = local_path(os.fspath(source))
    if path.is_dir():
        return _frames_from_folder(path, num_frames)
    if not path.is_file():
        raise MediaError(f"video file not found: {path}")
    return _frames_from_video(lambda: str(path), str(path), num_frames)


def _frames_from_folder(path, num_frames: int) -> list[PIL.Image.Image]:
    entries = sorted(glob.glob(os.path.join(glob.escape(str(path)), "*")))
    if not entries:
        raise MediaError(f"video folder {path} has no frames")
    indices = sample_frame_indices(len(entries), num_frames)
    loaded = {}
    for index in dict.fromkeys(indices):
        if not os.path.isfile(entries[index]):
            raise MediaError(f"video folder entry {entries[index]} is not an image file")
        loaded[index] = load_image(entries[index])
    return [loaded[index] for index in indices]


def _frames_from_video(open_input: Callable[[], object], name: str, num_frames: int) -> list[PIL.Image.Image]:
    with _open_container(open_input, name) as container:
        reported = container.streams.video[0].frames
    if reported > 0:
        indices = sample_frame_indices(reported, num_frames)
        frames, decoded = _decode(open_input, name, set(indices))
        if decoded == reported:
            return [frames[index] for index in indices]
        frame_count = decoded  # decoding stopped early: the file holds fewer frames than it claims
    else:
        _, frame_count = _decode(open_input, name, set())
    if frame_count == 0:
        raise MediaError(f"video {name} has no decodable frames")
    indices = sample_frame_indices(frame_count, num_frames)
    frames, _ = _decode(open_input, name, set(indices))
    return [frames[index] for index in indices]


def _decode(open_input, name: str, wanted: set[int]) -> tuple[dict[int, PIL.Image.Image], int]:
    """Decode in order up to the last wanted index (or to the end when none is wanted).

    Returns the wanted frames as RGB images and how many frames decoded; a decoding error ends the
    video there, as an unreadable frame ends VILA's search for the last frame.
    """
    last = max(wanted) if wanted else None
    frames, count = {}, 0
    with _open_container(open_input, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    frames[count] = frame.to_image()
                count += 1
                if last is not None and count > last:
                    break
        except (av.FFmpegError, OSError, ValueError):
            pass
    return frames, count


def _open_container(open_input, name: str):
    try:
        container = av.open(open_input(), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"cannot read video {name}: {e}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"video {name} has no video stream (truncated or not a video)")
    return container
