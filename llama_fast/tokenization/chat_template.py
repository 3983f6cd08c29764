"""Rendering a chat template: the Jinja2 program a model ships (tokenizer_config.json or GGUF
`tokenizer.chat_template`) that turns a list of messages into the exact prompt text it was trained on.

The environment matches the one transformers renders in, so a template written for transformers gives
the same text here: a sandbox that cannot mutate its inputs, trim_blocks / lstrip_blocks, loop controls,
`raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text readable.
"""
from __future__ import annotations

import datetime
import functools
import json


class TemplateError(ValueError):
    """The template raised (via raise_exception) or could not be compiled."""


def _raise_exception(message):
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None


def render_chat_template(template: str, messages, add_generation_prompt=False, **variables) -> str:
    """Render `template` for `messages` (a list of {"role", "content"} dicts, or a conversation object
    with a `.messages` list). Extra keyword arguments (tools, documents, bos_token...) become template
    variables."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("apply_chat_template expects a list of {'role': ..., 'content': ...} dicts")
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
