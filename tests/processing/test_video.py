"""Frame sampling from videos written here with PyAV, and from folders of frames."""

from __future__ import annotations

import base64
from fractions import Fraction

import av
import numpy as np
import PIL.Image
import pytest

from jvila.processing.errors import MediaError
from jvila.processing.video import load_video_frames, sample_frame_indices

LEVEL_STEP = 9  # grey level per frame index; lossy coding moves levels by < LEVEL_STEP / 2 (seen: <= 2)


def _level(index: int, offset: int) -> int:
    return offset + LEVEL_STEP * index


def _write_video(path, num_frames, rng, codec="mpeg4", options=None):
    """Frame i is flat grey at level offset + 9*i (at most 24 frames stay below 255), with a little noise."""
    offset = int(rng.integers(12, 20))
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=12)
        stream.width, stream.height, stream.pix_fmt = 66, 50, "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for i in range(num_frames):
            pixels = np.full((50, 66, 3), _level(i, offset), np.int16) + rng.integers(-1, 2, (50, 66, 3))
            frame = av.VideoFrame.from_ndarray(np.clip(pixels, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return offset


def _frame_indices(frames, offset):
    """Which source frame each decoded frame is, from its grey level."""
    found = []
    for frame in frames:
        assert frame.mode == "RGB" and frame.size == (66, 50)
        mean = float(np.asarray(frame, np.float64).mean())
        index = round((mean - offset) / LEVEL_STEP)
        assert abs(mean - _level(index, offset)) < LEVEL_STEP / 2, mean
        found.append(index)
    return found


def _expected_indices(frame_count, num_frames):
    """Positions k * (frames - 1) / (samples - 1) in float64 (how linspace computes them; the last is
    the end exactly), rounded half to even. Float, not exact, positions are VILA's behaviour."""
    if num_frames == 1:
        return [0]
    step = (frame_count - 1) / (num_frames - 1)
    return [round(k * step) for k in range(num_frames - 1)] + [frame_count - 1]


def test_sample_indices_rule():
    rng = np.random.default_rng()
    cases = [(10, 3), (5, 8), (1, 4), (100, 1)] + [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(50)]
    for frame_count, num_frames in cases:
        assert sample_frame_indices(frame_count, num_frames) == _expected_indices(frame_count, num_frames)
    assert sample_frame_indices(10, 3) == [0, 4, 9]  # 4.5 rounds to even
    # 11 * 15/22 is exactly 7.5 but 7.499999999999999 in float64: the float value decides.
    assert Fraction(11 * 15, 22) == Fraction(15, 2) and sample_frame_indices(16, 23)[11] == 7
    assert sample_frame_indices(100, 1) == [0]


@pytest.mark.parametrize("codec,suffix", [("mpeg4", "mp4"), ("ffv1", "mkv")])
def test_uniform_frames_from_a_video(tmp_path, codec, suffix):
    # mp4 records its frame count; Matroska does not, so its frames are counted by decoding.
    rng = np.random.default_rng()
    path = tmp_path / f"clip.{suffix}"
    offset = _write_video(path, 19, rng, codec)
    frames = load_video_frames(path, 8)
    assert _frame_indices(frames, offset) == _expected_indices(19, 8)
    assert _frame_indices(load_video_frames(str(path), 1), offset) == [0]


def test_short_video_repeats_frames(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "short.mp4"
    offset = _write_video(path, 5, rng)
    frames = load_video_frames(path, 8)
    assert len(frames) == 8
    assert _frame_indices(frames, offset) == _expected_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]


def test_bytes_and_data_url(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "clip.mp4"
    offset = _write_video(path, 9, rng)
    data = path.read_bytes()
    for source in (data, "data:video/mp4;base64," + base64.b64encode(data).decode()):
        assert _frame_indices(load_video_frames(source, 3), offset) == [0, 4, 8]


def test_truncated_video_with_index_up_front(tmp_path):
    # faststart puts the frame index before the data: the file claims 24 frames but holds fewer.
    rng = np.random.default_rng()
    path = tmp_path / "cut.mp4"
    offset = _write_video(path, 24, rng, options={"movflags": "faststart"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    decoded = []
    with av.open(str(path)) as container:
        claimed = container.streams.video[0].frames
        # Where the cut falls (the frames are random), decoding may end with an error rather than
        # quietly: either way the frames before it are what the file holds.
        try:
            for frame in container.decode(video=0):
                decoded.append(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError:
            pass
    assert claimed == 24 and 0 < len(decoded) < 24
    # The last frames before the cut may be the decoder's concealment, so compare pixels, not levels.
    frames = load_video_frames(path, 6)
    expected = _expected_indices(len(decoded), 6)
    assert len(frames) == 6
    for frame, index in zip(frames, expected):
        np.testing.assert_array_equal(np.asarray(frame), decoded[index])
    assert _frame_indices(frames[:1], offset) == [0]


def test_bad_videos_are_media_errors(tmp_path):
    rng = np.random.default_rng()
    path = tmp_path / "cut.mp4"
    _write_video(path, 12, rng)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the index sits at the end and is gone
    with pytest.raises(MediaError, match="cut.mp4"):
        load_video_frames(path, 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="garbage.mp4"):
        load_video_frames(garbage, 4)
    empty = tmp_path / "empty.mp4"
    _write_video(empty, 0, rng)
    with pytest.raises(MediaError, match="empty.mp4"):
        load_video_frames(empty, 4)
    with pytest.raises(MediaError, match="not found"):
        load_video_frames(tmp_path / "missing.mp4", 4)
    with pytest.raises(MediaError, match="cannot read video video bytes"):
        load_video_frames(b"not a video", 2)
    with pytest.raises(ValueError, match="num_frames"):
        load_video_frames(path, 0)
    with pytest.raises(MediaError, match="remote URLs"):
        load_video_frames("http://example.com/clip.mp4", 2)


def test_folder_of_frames(tmp_path):
    rng = np.random.default_rng()
    folder = tmp_path / "frames"
    folder.mkdir()
    levels = rng.permutation(200)[:10] + 20
    for i, level in enumerate(levels):  # names sort in time order; zero-padded as extracted frames are
        PIL.Image.new("RGB", (9, 7), (int(level),) * 3).save(folder / f"frame_{i:03d}.png")
    (folder / ".hidden").write_bytes(b"ignored, as glob('*') ignores it")
    frames = load_video_frames(folder, 3)
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [levels[0], levels[4], levels[9]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="has no frames"):
        load_video_frames(empty, 3)
    (folder / "frame_004.png").write_bytes(b"broken")
    with pytest.raises(MediaError, match="frame_004.png"):
        load_video_frames(folder, 3)
