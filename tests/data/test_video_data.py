"""Video records in the training pipeline: the inference prompt builder's tokens and frames, videos
packed beside images in order, bad video files skipped and counted, state round trips (workers too)."""

import json
import re
import warnings

import numpy as np
import PIL.Image
import pytest
from nvila_fixture import write_random_video

from jvila.config import LLMConfig
from jvila.data.demo_shapes import demo_tokenizer_files
from jvila.data.pipeline import DataConfig, SkippedRecordWarning, build_train_iterator
from jvila.data.records import RecordError, parse_record
from jvila.models.nvila import image_token_count, video_token_count
from jvila.processing.image import SiglipPreprocessor, load_rgb
from jvila.processing.media_prompt import MediaSettings, build_media_prompt, single_tile, video_media
from jvila.processing.tokenizer import Tokenizer
from jvila.vision_config import NVILAConfig, SiglipConfig
from tests.data.test_pipeline import _assert_same_batches, _take

TILE, FRAMES = 24, 8
# 24 px tiles of 4 px patches: 6x6 maps, 3x3 tokens after the 2x2 projector. Two TSP pools: 8 frames
# in groups of 4 (2 groups of 9 tokens) and one group pooled 3x3 in space: Kv = 2·(9+1) + (1+1) = 22.
POOLS = ((4, 1, 1), (8, 3, 3))


def _setup(pools=POOLS):
    tokenizer = Tokenizer.from_files(demo_tokenizer_files())
    vision = SiglipConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=TILE,
                          patch_size=4)
    llm = LLMConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, family="qwen2")
    cfg = NVILAConfig(llm=llm, vision=vision, image_aspect_ratio="resize", dynamic_s2=False, video_pool_sizes=pools,
                      num_video_frames=FRAMES, image_token_id=tokenizer.token_to_id("<image>"),
                      video_token_id=tokenizer.token_to_id("<vila/video>"),
                      media_end_token_ids=tuple(tokenizer.encode("\n")))
    media = MediaSettings(SiglipPreprocessor(size=(TILE, TILE)), image_aspect_ratio="resize", num_video_frames=FRAMES)
    return tokenizer, media, cfg


def _iterator(path, tokenizer, media, cfg, **kw):
    data = dict(paths=[str(path)], packing_length=400, max_images_per_row=3, max_videos_per_row=2,
                global_batch_size=1, shuffle=False, num_epochs=1) | kw
    return build_train_iterator(DataConfig(**data), tokenizer, media, cfg, process_index=0, process_count=1)


def _widened(ids, cfg):
    ids = np.asarray(ids)
    k, kv = image_token_count(cfg), video_token_count(cfg, FRAMES)
    return np.repeat(ids, np.where(ids == cfg.image_token_id, k, np.where(ids == cfg.video_token_id, kv, 1)))


def _image(path, rng, size=(30, 21)):
    PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_video_token_count():
    _, _, cfg = _setup()
    assert video_token_count(cfg, FRAMES) == 22 and image_token_count(cfg) == 10
    _, _, plain = _setup(pools=())  # no pooling: every frame its own group of 9 tokens + end token
    assert video_token_count(plain, 5) == 50
    with pytest.raises(ValueError, match="multiple of 4"):
        video_token_count(cfg, 6)


def test_training_tokens_and_frames_equal_the_inference_prompt(tmp_path):
    """Each record's tokens equal build_media_prompt's on the same conversation (every placeholder
    widened to its block's rows), and its frames and tiles equal the prompt's media, in order."""
    tokenizer, media, cfg = _setup()
    rng = np.random.default_rng()
    clip = str(write_random_video(tmp_path / "a.mp4", 5, rng))  # fewer frames than 8: frames repeat
    long_clip = str(write_random_video(tmp_path / "b.mp4", 13, rng, width=38, height=50))
    photo = _image(tmp_path / "p.png", rng)
    cases = [
        # LLaVA-Video: the video's placeholder is "<image>"; the media go first in the first user turn.
        ({"id": "lv", "video": "a.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat happens in the video?"}, {"from": "gpt", "value": "a cat jumps"}]},
         [{"role": "user", "content": [{"type": "video", "video": clip},
                                       {"type": "text", "text": "What happens in the video?"}]},
          {"role": "assistant", "content": "a cat jumps"}]),
        # An image and two videos, "<video>" placeholders, two rounds: images first, then videos.
        ({"id": "mix", "image": "p.png", "video": ["b.mp4", "a.mp4"], "conversations": [
            {"from": "human", "value": "<image>\n<video>\n<video>\nCompare them."}, {"from": "gpt", "value": "same"},
            {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "red"}]},
         [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "video", "video": long_clip},
                                       {"type": "video", "video": clip}, {"type": "text", "text": "Compare them."}]},
          {"role": "assistant", "content": "same"}, {"role": "user", "content": "And the colour?"},
          {"role": "assistant", "content": "red"}]),
        # OpenAI-style: the video stays where the message puts it.
        ({"id": "oa", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "video", "video": long_clip},
                                         {"type": "text", "text": " what moves?"}]},
            {"role": "assistant", "content": "nothing"}]},
         [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "video", "video": long_clip},
                                       {"type": "text", "text": " what moves?"}]},
          {"role": "assistant", "content": "nothing"}]),
    ]
    for record, messages in cases:
        path = tmp_path / f"{record['id']}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        batch = next(_iterator(path, tokenizer, media, cfg))
        want = build_media_prompt(tokenizer, media, messages, add_generation_prompt=False)
        tokens = _widened(want.token_ids, cfg)
        n = len(tokens)
        np.testing.assert_array_equal(batch["tokens"][0, :n], tokens, err_msg=record["id"])
        assert not batch["segment_ids"][0, n:].any()
        # Only the replies (and their end-of-turn tokens) are learned.
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        learned = tokenizer.decode(batch["targets"][0][batch["weights"][0] > 0], False)
        assert learned == "".join(f"{r}<|im_end|>" for r in replies)
        videos = [m.frames for m in want.media if hasattr(m, "frames")]
        tiles = [m.tiles[0] for m in want.media if hasattr(m, "tiles")]
        assert batch["videos"].shape == (1, 2, FRAMES, TILE, TILE, 3)
        np.testing.assert_array_equal(batch["videos"][0, :len(videos)], np.array(videos).reshape(-1, FRAMES, TILE,
                                                                                                  TILE, 3))
        assert not batch["videos"][0, len(videos):].any()
        np.testing.assert_array_equal(batch["images"][0, :len(tiles)], np.array(tiles).reshape(-1, TILE, TILE, 3))
        assert int((batch["tokens"][0] == cfg.video_token_id).sum()) == 22 * len(videos)


def _mixed_records(directory, count, rng):
    """Records whose reply names them (rec<i>), each with 0-2 videos and 0-1 images of its own."""
    media = {}
    with open(directory / "train.jsonl", "w") as out:
        for i in range(count):
            videos = [str(write_random_video(directory / f"v{i}_{j}.mp4", int(rng.integers(2, 12)), rng))
                      for j in range(int(rng.integers(0 if i % 3 else 1, 3)))]
            images = [_image(directory / f"i{i}.png", rng)] if rng.random() < 0.5 else []
            media[f"rec{i}"] = (images, videos)
            out.write(json.dumps({"id": f"rec{i}", "image": images, "video": videos, "conversations": [
                {"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": f"rec{i}"}]}) + "\n")
    return directory / "train.jsonl", media


def _names(batch, row, tokenizer):
    seg = batch["segment_ids"][row]
    names = []
    for s in range(1, seg.max() + 1):
        learned = batch["targets"][row][(seg == s) & (batch["weights"][row] > 0)]
        names.append(re.fullmatch(r"(rec\d+)<\|im_end\|>", tokenizer.decode(learned, False)).group(1))
    return names


def test_videos_pack_beside_images_in_order_and_resume_exactly_in_workers(tmp_path):
    tokenizer, media, cfg = _setup()
    path, sources = _mixed_records(tmp_path, 7, np.random.default_rng())
    kv = video_token_count(cfg, FRAMES)
    data = dict(packing_length=3 * kv + 2 * image_token_count(cfg) + 90, global_batch_size=2, max_videos_per_row=3,
                shuffle=True, seed=4)
    epoch = list(_iterator(path, tokenizer, media, cfg, **data))
    seen = []
    for batch in epoch:
        assert batch["videos"].shape == (2, 3, FRAMES, TILE, TILE, 3)
        for row in range(2):
            names = _names(batch, row, tokenizer)
            seen += names
            videos = [video_media(media, v).frames for n in names for v in sources[n][1]]
            images = [single_tile(media, load_rgb(p))[0] for n in names for p in sources[n][0]]
            np.testing.assert_array_equal(batch["videos"][row, :len(videos)],
                                          np.array(videos).reshape(-1, FRAMES, TILE, TILE, 3))
            assert not batch["videos"][row, len(videos):].any()
            np.testing.assert_array_equal(batch["images"][row, :len(images)],
                                          np.array(images).reshape(-1, TILE, TILE, 3))
            tokens = batch["tokens"][row]
            assert int((tokens == cfg.video_token_id).sum()) == len(videos) * kv
            assert not batch["weights"][row][tokens == cfg.video_token_id].any()
    assert sorted(seen) == [f"rec{i}" for i in range(7)]

    # The state round trip: a resumed iterator yields the batches an uninterrupted one does (forever:
    # the resumed run crosses an epoch boundary); a worker process decodes the same videos.
    data["num_epochs"] = None
    want = _take(_iterator(path, tokenizer, media, cfg, **data), 6)
    first = _iterator(path, tokenizer, media, cfg, **data)
    _take(first, 2)
    state = json.loads(json.dumps(first.get_state()))
    resumed = _iterator(path, tokenizer, media, cfg, **data)
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 4), want[2:])
    workers = _iterator(path, tokenizer, media, cfg, **data, num_workers=1)
    try:
        _assert_same_batches(_take(workers, 6), want)
    finally:
        workers.close()


def _truncated_mkv(path, rng):
    """A Matroska file cut right at its first cluster: it opens, but no frame decodes."""
    full = write_random_video(path.with_suffix(".full.mkv"), 4, rng)
    data = full.read_bytes()
    path.write_bytes(data[:data.index(b"\x1f\x43\xb6\x75")])  # the Cluster element's id
    return path


def test_bad_video_files_are_skipped_counted_and_the_run_goes_on(tmp_path):
    tokenizer, media, cfg = _setup()
    rng = np.random.default_rng()
    write_random_video(tmp_path / "ok.mp4", 6, rng)
    write_random_video(tmp_path / "two.mp4", 2, rng)
    (tmp_path / "corrupt.mp4").write_bytes(rng.bytes(600))
    _truncated_mkv(tmp_path / "empty.mkv", rng)
    records = [
        {"id": "missing", "video": "nowhere.mp4"},
        {"id": "corrupt", "video": "corrupt.mp4"},
        {"id": "empty", "video": "empty.mkv"},
        {"id": "short", "video": "two.mp4"},  # 2 decodable frames, min_video_frames 3
        {"id": "many", "video": ["ok.mp4"] * 3},
        {"id": "rec0", "video": "ok.mp4"},
        {"id": "rec1", "video": ["ok.mp4", "ok.mp4"]},
        {"id": "rec2"},
    ]
    with open(tmp_path / "r.jsonl", "w") as out:
        for record in records:
            question = "<video>\nq" if isinstance(record.get("video"), str) else "q"  # placeholders optional
            reply = record["id"] if record["id"].startswith("rec") else "a"
            out.write(json.dumps(record | {"conversations": [{"from": "human", "value": question},
                                                             {"from": "gpt", "value": reply}]}) + "\n")
    it = _iterator(tmp_path / "r.jsonl", tokenizer, media, cfg, min_video_frames=3, global_batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = sorted(n for b in it for row in range(2) for n in _names(b, row, tokenizer))
    assert names == ["rec0", "rec1", "rec2"]
    assert it.skipped == {"bad_media": 4, "too_many_videos": 1}
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedRecordWarning)]
    for name, why in (("missing", "not found"), ("corrupt", "cannot read"), ("empty", "empty.mkv"),
                      ("short", "2 decodable frames"), ("many", "3 videos exceed")):
        assert any(f"'{name}'" in m and why in m for m in messages), (name, messages)
    # Without video slots the same records are skipped as unsupported, and batches carry no videos.
    plain = _iterator(tmp_path / "r.jsonl", tokenizer, media, cfg, max_videos_per_row=0, global_batch_size=2)
    with pytest.warns(SkippedRecordWarning, match="max_videos_per_row is 0"):
        batches = list(plain)
    assert all("videos" not in b for b in batches) and plain.skipped == {"unsupported": 7}


def test_video_record_placeholders():
    """Placeholders in a record with videos mark nothing (the media go first, images then videos), but
    their count must fit: none, one per image, one per video, or one per both."""
    def first_turn(value, images, videos):
        record = parse_record({"id": "p", "image": images, "video": videos,
                               "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "a"}]})
        return record.turns[0].text

    two = ["a.mp4", "b.mp4"]
    assert first_turn("<image>\nWhat?", ["p.png"], two) == "<image><vila/video><vila/video>What?"
    assert first_turn("<video>\n<video>\nWhat?", ["p.png"], two) == "<image><vila/video><vila/video>What?"
    assert first_turn("What?\n<vila/video>", [], ["a.mp4"]) == "<vila/video>What?"
    with pytest.raises(RecordError, match="4 media placeholders .* for 1 images and 2 videos"):
        first_turn("<image>" * 4 + "What?", ["p.png"], two)
    # OpenAI-style: a record naming a video beside its messages gets it after the leading images.
    record = parse_record({"id": "o", "videos": ["a.mp4"], "messages": [
        {"role": "user", "content": [{"type": "image", "image": "p.png"}, {"type": "text", "text": "Both?"}]},
        {"role": "assistant", "content": "yes"}]})
    assert record.turns[0].text == "<image><vila/video>Both?" and record.videos == ("a.mp4",)
