"""Tokenizer and chat templates against transformers, on SmolLM2's tokenizer (from its GGUF)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jinja2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402

from jvila.checkpoints.gguf_tokenizer import tokenizer_files_from_gguf  # noqa: E402
from jvila.checkpoints.known_models import resolve_gguf  # noqa: E402
from jvila.processing.chat_template import render_chat_template  # noqa: E402
from jvila.processing.tokenizer import Tokenizer  # noqa: E402

# A Qwen2-style template: default system prompt, tool schemas through `tojson`, loop controls, and
# both dash-trimmed and plain tags, so that trim_blocks/lstrip_blocks matter.
QWEN2_STYLE_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}
{%- else %}{{- 'You are Qwen, a helpful assistant.\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{% for message in messages %}
    {% if message['role'] == 'system' and tools %}{% continue %}{% endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' -}}
{% endfor %}
{% if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Température <à> l'instant & \"now\"",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "What is 17 × 23?"}],
    "with_system": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "  Hello there!\n"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7919", "tool_calls": None},
        {"role": "user", "content": "Another, with <b>tags</b> and émojis 🙂"},
    ],
}


@pytest.fixture(scope="module")
def smollm2_files():
    return tokenizer_files_from_gguf(resolve_gguf("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    path = resolve_gguf("smollm2-135m-instruct")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _write(directory, files):
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    return directory


def _hf_ids(hf_tokenizer, messages, **kwargs):
    encoded = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _random_text(rng) -> str:
    pieces = ["hello", " world", "  ", "\n\n", "12345", "é", "你好", "🙂", "def f(x):\n    return x", "<|im_end|>"]
    return "".join(rng.choice(pieces, size=12))


def test_tokenizer_json_alone_matches_transformers(smollm2_files, hf_gguf_tokenizer):
    plain = tokenizers.Tokenizer.from_str(smollm2_files["tokenizer.json"])
    rng = np.random.default_rng()
    prompt = hf_gguf_tokenizer.apply_chat_template(CONVERSATIONS["multi_turn"], tokenize=False,
                                                   add_generation_prompt=True)
    texts = [prompt, "The year 2024 had 366 days.", "  leading spaces\tand tabs"]
    texts += [_random_text(rng) for _ in range(5)]
    for text in texts:
        expected = hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert plain.encode(text, add_special_tokens=False).ids == expected, text
        assert plain.encode(text).ids == hf_gguf_tokenizer(text)["input_ids"], text
    assert plain.encode(prompt).ids.count(plain.token_to_id("<|im_start|>")) == 5  # system, 3 turns, prompt


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(tmp_path, smollm2_files, hf_gguf_tokenizer, name,
                                                    add_generation_prompt):
    tokenizer = Tokenizer.from_dir(_write(tmp_path / "tok", smollm2_files))
    messages = CONVERSATIONS[name]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert tokenizer.encode(text, add_special_tokens=False) == _hf_ids(
        hf_gguf_tokenizer, messages, add_generation_prompt=add_generation_prompt
    )


def test_smollm2_special_ids_and_decode(smollm2_files):
    tokenizer = Tokenizer.from_files(smollm2_files)
    assert tokenizer.bos_id == tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.eos_ids == [2]  # <|im_end|> is both the EOS and the turn end
    assert tokenizer.pad_id == 2
    assert tokenizer.vocab_size == 49152
    text = _random_text(np.random.default_rng()).replace("<|im_end|>", "")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_special = [1, *ids, 2]
    assert tokenizer.decode(with_special) == text
    assert tokenizer.decode(with_special, skip_special_tokens=False) == f"<|im_start|>{text}<|im_end|>"
    assert tokenizer.encode_batch([text, "x"], add_special_tokens=False) == [ids, tokenizer.encode("x")]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_qwen2_style_template_matches_transformers(tmp_path, smollm2_files, name, tools):
    config = json.loads(smollm2_files["tokenizer_config.json"])
    # Qwen2's layout: the template inside tokenizer_config.json, EOS <|endoftext|>, turns end with <|im_end|>.
    config |= {"chat_template": QWEN2_STYLE_TEMPLATE, "eos_token": "<|endoftext|>", "bos_token": None}
    files = {"tokenizer.json": smollm2_files["tokenizer.json"], "tokenizer_config.json": json.dumps(config)}
    directory = _write(tmp_path / "qwen_style", files)
    tokenizer = Tokenizer.from_dir(directory)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)

    messages = CONVERSATIONS[name]
    text = tokenizer.apply_chat_template(messages, tools=tools)
    assert text == hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(text, add_special_tokens=False) == _hf_ids(
        hf_tokenizer, messages, tools=tools, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    if tools:
        assert "Température <à>" in text  # tojson neither escapes HTML nor forces ASCII
    assert tokenizer.bos_id is None
    assert tokenizer.eos_ids == [tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")] == [0, 2]


def test_generation_config_adds_eos_ids(smollm2_files):
    files = dict(smollm2_files) | {"generation_config.json": json.dumps({"eos_token_id": [2, 7, 0]})}
    assert Tokenizer.from_files(files).eos_ids == [2, 7, 0]


def test_template_environment_follows_hf_conventions():
    template = (
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
        "{{ bos_token }}{% if add_generation_prompt %}!{% endif %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_chat_template(template, messages, bos_token="<s>") == "ab<s>!"
    assert render_chat_template(template, messages, add_generation_prompt=False, bos_token="") == "ab"

    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", messages)
    # Templates are untrusted: the sandbox refuses to reach into Python internals.
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__subclasses__() }}", messages)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.append(1) }}", messages)


def test_missing_template_or_tokenizer_is_an_error(tmp_path, smollm2_files):
    tokenizer = Tokenizer.from_files({"tokenizer.json": smollm2_files["tokenizer.json"]})
    assert tokenizer.eos_ids == [] and tokenizer.bos_id is None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
