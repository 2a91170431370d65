"""Render Hugging Face chat templates (Jinja) the way transformers does, without transformers.

Templates are untrusted code shipped with checkpoints, so they run in Jinja's immutable sandbox.
The environment follows HF's conventions, which templates are written against: `trim_blocks` and
`lstrip_blocks`, loop controls, a `tojson` that neither escapes HTML nor forces ASCII, the globals
`raise_exception` and `strftime_now`, and a `{% generation %}` block (rendered as its body).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    # HF templates mark assistant text with {% generation %}...{% endgeneration %} for loss masks;
    # rendering only needs the text inside.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """A sandboxed Jinja template for `source`, compiled once per distinct template."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """The prompt text for `messages`; `variables` (bos_token, eos_token, ...) are visible to the template."""
    # Keys set to None (OpenAI-style `tool_calls=None`) are dropped: templates test for absence.
    messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
    return compile_chat_template(source).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        documents=documents,
        **variables,
    )
