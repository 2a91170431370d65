"""Records and the assistant-only loss mask, against an independent piecewise rendering of ChatML."""

import json

import numpy as np
import pytest

from jvila.data.conversation import ensure_sentinel_token, tokenize_record
from jvila.data.demo_shapes import SYSTEM_PROMPT, demo_tokenizer_files
from jvila.data.records import RecordError, parse_record, read_record_file
from jvila.processing.tokenizer import Tokenizer
from nvila_fixture import build_tokenizer_files

WORDS = ["red", "circle", "How", "many", "shapes", "three", "apples", "the", "cat", "window", "blue", "42", "é"]


def _tokenizer(files):
    tokenizer = Tokenizer.from_files(files)
    ensure_sentinel_token(tokenizer)
    return tokenizer


def _random_text(rng, lo=1, hi=8):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def _reference(tokenizer, turns, system_prompt, image_id, k):
    """ChatML rendered piece by piece, each piece encoded on its own: reply + <|im_end|> learned,
    everything else (system prompt, role headers, user text, the newline after <|im_end|>) not."""
    ids, mask = [], []

    def add(text, learned):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        mask.extend([int(learned)] * len(piece))

    if turns[0][0] != "system":
        add(f"<|im_start|>system\n{system_prompt}<|im_end|>\n", False)
    for role, text in turns:
        add(f"<|im_start|>{role}\n", False)
        if role == "assistant":
            add(text.strip() + "<|im_end|>", True)
            add("\n", False)
        else:
            add(text.strip() + "<|im_end|>\n", False)
    ids, mask = np.array(ids), np.array(mask)
    repeats = np.where(ids == image_id, k, 1)
    return np.repeat(ids, repeats), np.repeat(mask, repeats)


@pytest.mark.parametrize("files, system_prompt", [
    (demo_tokenizer_files(), SYSTEM_PROMPT),  # ChatML with {% generation %} blocks
    (build_tokenizer_files(), "You are a helpful assistant"),  # VILA's qwen2 template
])
def test_mask_is_exactly_the_assistant_replies(files, system_prompt):
    tokenizer = _tokenizer(files)
    image_id = tokenizer.token_to_id("<image>")
    rng = np.random.default_rng()
    for trial in range(6):
        k = int(rng.integers(2, 9))
        turns = [("system", _random_text(rng))] if trial % 3 == 0 else []
        num_images = 0
        for _ in range(int(rng.integers(1, 4))):
            images = int(rng.integers(0, 3))
            num_images += images
            turns.append(("user", "<image>\n" * images + _random_text(rng)))
            turns.append(("assistant", " " + _random_text(rng) + " "))  # VILA strips the messages
        record = {"id": f"r{trial}", "image": [f"i{i}.png" for i in range(num_images)],
                  "conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": t}
                                    for r, t in turns]}
        ids, mask = tokenize_record(tokenizer, parse_record(json.dumps(record)), image_token_id=image_id,
                                    image_tokens=k)
        # VILA's LLaVA records: the images move to the front of the first user turn, placeholders
        # (and the newline after each) leave the other turns.
        first_user = next(i for i, (r, _) in enumerate(turns) if r == "user")
        moved = [(r, ("<image>" * num_images if i == first_user else "") + t.replace("<image>\n", ""))
                 for i, (r, t) in enumerate(turns)]
        want_ids, want_mask = _reference(tokenizer, moved, system_prompt, image_id, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
        assert int((ids == image_id).sum()) == num_images * k
        learned = tokenizer.decode(ids[mask == 1], skip_special_tokens=False)
        assert learned == "".join(t.strip() + "<|im_end|>" for r, t in turns if r == "assistant")


def test_records_without_placeholders_get_them_in_the_first_user_turn(tmp_path):
    tokenizer = _tokenizer(demo_tokenizer_files())
    record = parse_record({"id": 7, "image": ["a.png", "/abs/b.png"],
                           "conversations": [{"from": "system", "value": "be brief"},
                                             {"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}]},
                          image_root=tmp_path)
    assert record.id == "7" and record.images == (str(tmp_path / "a.png"), "/abs/b.png")
    assert record.turns[1].text == "<image><image>what?"
    ids, _ = tokenize_record(tokenizer, record, image_token_id=tokenizer.token_to_id("<image>"), image_tokens=3)
    assert int((ids == tokenizer.token_to_id("<image>")).sum()) == 6


def test_openai_style_records():
    record = parse_record({"id": "o", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "blue"}]})
    assert record.images == ("x.png",) and record.turns[0].text == "<image>colour?"
    assert [t.role for t in record.turns] == ["user", "assistant"]


@pytest.mark.parametrize("raw, problem", [
    ({"id": "a", "conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                     {"from": "gpt", "value": "x"}]}, "2 <image> placeholders"),
    ({"id": "c", "conversations": [{"from": "robot", "value": "hi"}]}, "'from' 'robot'"),
    ({"id": "d"}, "non-empty 'conversations'"),
    ("{not json", "not valid JSON"),
])
def test_bad_records_name_the_record_and_the_problem(raw, problem):
    with pytest.raises(RecordError, match=problem) as info:
        parse_record(raw if isinstance(raw, str) else json.dumps(raw), fallback_id="line-3")
    assert info.value.record_id == (raw["id"] if isinstance(raw, dict) else "line-3")


def test_images_for_a_text_only_model_and_replies_with_images_are_errors():
    tokenizer = _tokenizer(demo_tokenizer_files())
    record = parse_record({"id": "t", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "ok"}]})
    with pytest.raises(RecordError, match="text only"):
        tokenize_record(tokenizer, record)
    # A LLaVA record's placeholders all move to the first user turn, as VILA reads them ...
    moved = parse_record({"id": "u", "image": "x.png", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "look <image>"}]})
    assert [t.text for t in moved.turns] == ["<image>hi", "look"]
    # ... an OpenAI-style record's stay where they are: an image in a reply cannot be learned.
    in_reply = parse_record({"id": "u", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "look"}, {"type": "image", "image": "x.png"}]}]})
    with pytest.raises(RecordError, match="inside an assistant reply"):
        tokenize_record(tokenizer, in_reply, image_token_id=tokenizer.token_to_id("<image>"), image_tokens=2)


def test_record_files_jsonl_and_json(tmp_path):
    records = [{"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
               for i in range(3)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "r.json").write_text(json.dumps(records))
    lines = read_record_file(tmp_path / "r.jsonl")
    assert [json.loads(x) for x in lines] == records == [json.loads(x) for x in read_record_file(tmp_path / "r.json")]
    (tmp_path / "bad.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        read_record_file(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        read_record_file(tmp_path / "missing.jsonl")


def test_plain_text_records_learn_every_token():
    tokenizer = _tokenizer(demo_tokenizer_files())
    image_id, eos = tokenizer.token_to_id("<image>"), tokenizer.token_to_id("<|im_end|>")
    rng = np.random.default_rng()
    text = _random_text(rng, 5, 30)
    ids, mask = tokenize_record(tokenizer, parse_record({"id": "t", "text": text}))
    np.testing.assert_array_equal(ids, tokenizer.encode(text) + [eos])
    assert mask.all()
    record = parse_record({"id": "i", "text": text, "image": "p.png"})
    assert record.text == "<image>" + text and record.turns == ()
    ids, mask = tokenize_record(tokenizer, record, image_token_id=image_id, image_tokens=4)
    np.testing.assert_array_equal(ids[:4], [image_id] * 4)
    np.testing.assert_array_equal(mask, (ids != image_id).astype(np.int32))
    with pytest.raises(RecordError, match="non-empty string"):
        parse_record({"id": "e", "text": "  "})


def test_a_template_that_rejects_the_conversation_is_a_record_error():
    files = demo_tokenizer_files()
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}"
                               "{% endif %}" + config["chat_template"])
    tokenizer = _tokenizer(files | {"tokenizer_config.json": json.dumps(config)})
    record = parse_record({"id": "z", "conversations": [{"from": "gpt", "value": "hello"}]})
    with pytest.raises(RecordError, match="rejects the conversation: user first"):
        tokenize_record(tokenizer, record)
