"""The Grain pipeline: order by seed, per-process shards, state round trips, workers, bad records."""

import json
import re
import warnings

import numpy as np
import PIL.Image
import pytest

from jvila.config import LLMConfig
from jvila.data.demo_shapes import demo_tokenizer_files, make_sample
from jvila.data.pipeline import DataConfig, SkippedRecordWarning, build_train_iterator
from jvila.models.nvila import image_token_count
from jvila.processing.image import SiglipPreprocessor, load_rgb
from jvila.processing.media_prompt import MediaSettings, single_tile
from jvila.processing.tokenizer import Tokenizer
from jvila.vision_config import NVILAConfig, SiglipConfig

TILE = 24  # tiles of 24 px from 32 px images: the preprocessor's resize is exercised


def _tokenizer():
    return Tokenizer.from_files(demo_tokenizer_files())


def _vision(tokenizer):
    vision = SiglipConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=TILE,
                          patch_size=4)
    llm = LLMConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, family="qwen2")
    cfg = NVILAConfig(llm=llm, vision=vision, image_aspect_ratio="resize", dynamic_s2=False,
                      image_token_id=tokenizer.token_to_id("<image>"), video_token_id=tokenizer.token_to_id("<vila/video>"),
                      media_end_token_ids=tuple(tokenizer.encode("\n")))
    return MediaSettings(SiglipPreprocessor(size=(TILE, TILE)), image_aspect_ratio="resize"), cfg


def _text_records(path, count, rng):
    with open(path, "w") as out:
        for i in range(count):
            question = " ".join(rng.choice(["how", "many", "red", "shapes", "?"], size=int(rng.integers(1, 12))))
            out.write(json.dumps({"id": f"rec{i}", "conversations": [
                {"from": "human", "value": question}, {"from": "gpt", "value": f"rec{i}"}]}) + "\n")
    return path


def _image_records(directory, count, rng):
    """Records whose reply names them (rec<i>), each with 1-2 images of its own."""
    images = {}
    with open(directory / "train.jsonl", "w") as out:
        for i in range(count):
            names = []
            for j in range(int(rng.integers(1, 3))):
                name = f"img{i}_{j}.png"
                make_sample(rng, "count", 32).image.save(directory / name)
                names.append(name)
            images[f"rec{i}"] = names
            out.write(json.dumps({"id": f"rec{i}", "image": names, "conversations": [
                {"from": "human", "value": "<image>\n" * len(names) + "How many shapes are there?"},
                {"from": "gpt", "value": f"rec{i}"}]}) + "\n")
    return directory / "train.jsonl", images


def _ids(batch, tokenizer):
    """The record names (rec<i>) of a batch's packed sequences, row by row, segment by segment."""
    names = []
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            learned = batch["targets"][row][(seg == s) & (batch["weights"][row] > 0)]
            names.append(re.fullmatch(r"(rec\d+)<\|im_end\|>", tokenizer.decode(learned, False)).group(1))
    return names


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_order_by_seed_and_shards_disjoint_and_covering(tmp_path):
    tokenizer = _tokenizer()
    path = _text_records(tmp_path / "r.jsonl", 23, np.random.default_rng())
    base = dict(paths=[str(path)], packing_length=64, global_batch_size=4, num_epochs=1)

    def run(process_index, process_count=2, **kw):
        it = build_train_iterator(DataConfig(**(base | kw)), tokenizer, process_index=process_index,
                                  process_count=process_count)
        return list(it)

    shards = [[n for b in run(p) for n in _ids(b, tokenizer)] for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"rec{i}" for i in range(23))
    assert all(b["tokens"].shape == (2, 64) for b in run(0))  # 4 global rows over 2 processes
    _assert_same_batches(run(0, seed=5), run(0, seed=5))
    assert [n for b in run(0, seed=5) for n in _ids(b, tokenizer)] != \
        [n for b in run(0, seed=6) for n in _ids(b, tokenizer)]
    unshuffled = [n for b in run(1, shuffle=False) for n in _ids(b, tokenizer)]
    assert sorted(unshuffled) == sorted(f"rec{i}" for i in range(1, 23, 2))  # process 1 gets records 1, 3, ...
    # Two epochs: each record twice, in a fresh order the second time.
    twice = [n for b in run(0, process_count=1, num_epochs=2, global_batch_size=1) for n in _ids(b, tokenizer)]
    assert sorted(twice) == sorted(2 * [f"rec{i}" for i in range(23)]) and twice[:23] != twice[23:]


def test_images_land_in_order_of_appearance(tmp_path):
    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    path, images = _image_records(tmp_path, 6, np.random.default_rng())
    k = image_token_count(cfg)
    it = build_train_iterator(DataConfig(paths=[str(path)], packing_length=3 * (k + 40), max_images_per_row=3,
                                         global_batch_size=2, num_epochs=1), tokenizer, media, cfg,
                              process_index=0, process_count=1)
    seen = 0
    for batch in it:
        assert batch["images"].shape == (2, 3, TILE, TILE, 3)
        for row in range(2):
            names = _ids({key: v[row:row + 1] for key, v in batch.items()}, tokenizer)
            files = [f for name in names for f in images[name]]
            want = [single_tile(media, load_rgb(tmp_path / f))[0] for f in files]
            np.testing.assert_array_equal(batch["images"][row, :len(files)], np.array(want).reshape(-1, TILE, TILE, 3))
            assert not batch["images"][row, len(files):].any()
            tokens = batch["tokens"][row]
            assert int((tokens == cfg.image_token_id).sum()) == len(files) * k
            assert not batch["weights"][row][tokens == cfg.image_token_id].any()
            seen += len(names)
    assert seen == 6


def test_state_round_trip_resumes_the_same_batches(tmp_path):
    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    path, _ = _image_records(tmp_path, 9, np.random.default_rng())
    data = DataConfig(paths=[str(path)], packing_length=2 * image_token_count(cfg) + 70, max_images_per_row=2,
                      global_batch_size=2, seed=3)  # forever: the resumed run crosses epoch boundaries

    def fresh():
        return build_train_iterator(data, tokenizer, media, cfg, process_index=0, process_count=1)

    it = fresh()
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # as Grain's checkpoint handler stores it
    reference = _take(it, 7)
    resumed = fresh()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 7), reference)
    assert resumed.batches_served == it.batches_served == 11


def test_worker_processes_equal_in_process_and_resume(tmp_path):
    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    path, _ = _image_records(tmp_path, 8, np.random.default_rng())
    data = DataConfig(paths=[str(path)], packing_length=2 * image_token_count(cfg) + 70, max_images_per_row=2,
                      global_batch_size=2, seed=11)
    in_process = build_train_iterator(data, tokenizer, media, cfg, process_index=0, process_count=1)
    want = _take(in_process, 8)
    with_workers = DataConfig(**(vars(data) | {"num_workers": 2}))
    workers = build_train_iterator(with_workers, tokenizer, media, cfg, process_index=0, process_count=1)
    try:
        got = _take(workers, 3)
        state = json.loads(json.dumps(workers.get_state()))
        got += _take(workers, 5)
        _assert_same_batches(got, want)
    finally:
        workers.close()
    # A restarted run: fresh worker processes resume from the saved state.
    resumed = build_train_iterator(with_workers, tokenizer, media, cfg, process_index=0, process_count=1)
    try:
        resumed.set_state(state)
        _assert_same_batches(_take(resumed, 5), want[3:])
    finally:
        resumed.close()


def test_bad_records_are_skipped_with_a_warning_and_counted(tmp_path):
    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    path, _ = _image_records(tmp_path, 5, np.random.default_rng())
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    PIL.Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "ok.png")
    chat = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    bad = [
        {"id": "missing", "image": "nowhere.png", "conversations": chat},
        {"id": "corrupt", "image": "corrupt.png", "conversations": chat},
        {"id": "no-reply", "image": "ok.png", "conversations": chat[:1]},
        {"id": "long", "image": "ok.png", "conversations": [chat[0], {"from": "gpt", "value": "red " * 400}]},
        {"id": "many", "image": ["ok.png"] * 3, "conversations": [{"from": "human", "value": "q"}, chat[1]]},
        {"id": "video", "video": "v.mp4", "conversations": [{"from": "human", "value": "q"}, chat[1]]},
    ]
    with open(path, "a") as out:
        for record in bad:
            out.write(json.dumps(record) + "\n")
        out.write("{this line is not JSON\n")
    # No video slots: the video record is skipped as unsupported (tests/data/test_video_data.py trains videos).
    it = build_train_iterator(DataConfig(paths=[str(path)], packing_length=2 * image_token_count(cfg) + 70,
                                         max_images_per_row=2, max_videos_per_row=0, global_batch_size=2,
                                         num_epochs=1),
                              tokenizer, media, cfg, process_index=0, process_count=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = sorted(n for b in it for n in _ids(b, tokenizer))
    assert names == [f"rec{i}" for i in range(5)]  # every good record trained, the run went on
    assert it.skipped == {"bad_media": 2, "bad_record": 2, "too_long": 1, "too_many_images": 1, "unsupported": 1}
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedRecordWarning)]
    assert len(messages) == 7
    for name in ("missing", "corrupt", "no-reply", "long", "many", "video"):
        assert any(f"'{name}'" in m for m in messages), name
    assert it.get_state()["skipped"] == it.skipped


def test_configuration_errors(tmp_path):
    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    path = _text_records(tmp_path / "r.jsonl", 3, np.random.default_rng())
    with pytest.raises(ValueError, match="does not divide over 2 processes"):
        build_train_iterator(DataConfig(paths=[str(path)], global_batch_size=3), tokenizer,
                             process_index=0, process_count=2)
    with pytest.raises(ValueError, match="tensorflow-datasets is not installed"):
        build_train_iterator(DataConfig(paths=["tfds:llava_instruct"]), tokenizer, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="image_token_id"):
        other = NVILAConfig(**(vars(cfg) | {"image_token_id": cfg.image_token_id - 1}))
        build_train_iterator(DataConfig(paths=[str(path)]), tokenizer, media, other, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no record file"):
        DataConfig(paths=[])
    with pytest.raises(FileNotFoundError):
        build_train_iterator(DataConfig(paths=[str(tmp_path / "none.jsonl")]), tokenizer, process_index=0,
                             process_count=1)


@pytest.mark.parametrize("aspect", ["resize", "dynamic"])
def test_training_prompt_equals_the_inference_prompt(tmp_path, aspect):
    """Tokens and tiles of a record equal what the serving path's build_media_prompt makes of the same
    conversation (each placeholder widened to K positions); "dynamic" tiles are one image each. The
    record's "<image>\n" prefix is LLaVA's; the "\n" reaches the model as the block's end embeddings."""
    from jvila.processing.media_prompt import build_media_prompt

    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    media = MediaSettings(media.preprocessor, image_aspect_ratio=aspect, min_tiles=1, max_tiles=4)
    rng = np.random.default_rng()
    picture = PIL.Image.fromarray(rng.integers(0, 256, (TILE, 2 * TILE + 5, 3), dtype=np.uint8))
    picture.save(tmp_path / "wide.png")
    question, answer = "How many shapes are there?", "three"
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}) + "\n")
    k = image_token_count(cfg)
    it = build_train_iterator(DataConfig(paths=[str(tmp_path / "r.jsonl")], packing_length=200, max_images_per_row=4,
                                         global_batch_size=1, num_epochs=1), tokenizer, media, cfg,
                              process_index=0, process_count=1)
    batch = next(it)
    want = build_media_prompt(tokenizer, media, [
        {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "wide.png")},
                                     {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer}], add_generation_prompt=False)
    ids = np.array(want.token_ids)
    want_tokens = np.repeat(ids, np.where(ids == cfg.image_token_id, k, 1))
    n = len(want_tokens)
    np.testing.assert_array_equal(batch["tokens"][0, :n], want_tokens)
    assert not batch["segment_ids"][0, n:].any()
    tiles = np.concatenate([m.tiles for m in want.media])
    assert len(tiles) == (3 if aspect == "dynamic" else 1)  # a 2x1 grid and its thumbnail
    np.testing.assert_array_equal(batch["images"][0, :len(tiles)], tiles)


def test_tfds_source_in_llava_layout(monkeypatch):
    """A `tfds:NAME:SPLIT` source read through tensorflow-datasets' data_source (a stand-in module
    here: tfds is not a dependency), images as arrays or encoded bytes, a malformed example skipped."""
    import io
    import sys
    import types

    tokenizer = _tokenizer()
    media, cfg = _vision(tokenizer)
    rng = np.random.default_rng()
    pixels = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2)]
    encoded = io.BytesIO()
    PIL.Image.fromarray(pixels[1]).save(encoded, format="PNG")
    chat = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "rec{}"}]
    examples = [
        {"id": b"a", "image": pixels[0],
         "conversations": json.dumps([chat[0], chat[1] | {"value": "rec0"}]).encode()},
        {"id": b"b", "image": encoded.getvalue(),
         "conversations": {"from": [b"human", b"gpt"], "value": [b"<image>\nq", b"rec1"]}},
        {"id": b"c", "conversations": b"{broken"},
    ]
    opened = {}

    def data_source(name, split, download):
        opened.update(name=name, split=split, download=download)
        return examples

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    it = build_train_iterator(DataConfig(paths=["tfds:llava_mix:validation"], packing_length=100,
                                         max_images_per_row=2, global_batch_size=1, shuffle=False, num_epochs=1),
                              tokenizer, media, cfg, process_index=0, process_count=1)
    with pytest.warns(SkippedRecordWarning, match="'c'"):
        batches = list(it)
    assert opened == {"name": "llava_mix", "split": "validation", "download": False}
    assert [n for b in batches for n in _ids(b, tokenizer)] == ["rec0", "rec1"]
    want = [single_tile(media, PIL.Image.fromarray(p))[0] for p in pixels]
    assert len(batches) == 1  # both fit one row: their tiles fill slots 0 and 1
    np.testing.assert_array_equal(batches[0]["images"][0], np.array(want))
    assert it.skipped == {"bad_record": 1}
