"""Rendering of Jinja chat templates, the way Hugging Face transformers renders them.

A chat template is untrusted code shipped with a checkpoint, so it runs in Jinja's immutable
sandbox. The environment matches what transformers sets up, so a template renders to the same
prompt here as with ``tokenizer.apply_chat_template(messages, tokenize=False)``:

* ``trim_blocks`` and ``lstrip_blocks`` on, and the ``loopcontrols`` extension (``break``,
  ``continue``);
* a ``{% generation %}...{% endgeneration %}`` block tag, rendered as its body (transformers uses
  it to mark assistant tokens; here it only has to parse);
* globals ``raise_exception(message)``, ``strftime_now(format)``, a ``dict`` constructor and a
  ``namespace`` that refuses underscore-prefixed names;
* a ``tojson`` filter that is plain ``json.dumps`` (no HTML escaping, non-ASCII kept) with the
  ``indent``, ``separators`` and ``sort_keys`` options;
* the variables ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special token
  strings (``bos_token``, ``eos_token``, ...) and any extra keyword arguments.

Message keys whose value is None are dropped first (many templates test for a key's presence), and
a message's reasoning given under ``reasoning_content``, ``thinking`` or ``reasoning`` is made
available under ``reasoning_content`` and ``thinking`` as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxinfer.errors import InputError

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """Parses ``{% generation %}...{% endgeneration %}`` and renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _DictMaker:
    """``dict(...)`` inside templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` that rejects underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # no named self, like jinja2.utils.Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore-prefixed attributes ({name!r})"
            )


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` in the sandboxed environment; a syntax error raises InputError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_DictMaker(),
        namespace=_Namespace,
    )
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"chat template failed to parse (line {e.lineno}): {e.message}") from e


def _prepare_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise InputError(f"each chat message must be a dict, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    source: str = "this checkpoint",
    **extra: Any,
) -> str:
    """Render ``template`` for ``messages``.

    ``special_tokens`` maps names such as ``bos_token`` to their strings; ``extra`` (for example
    ``tools`` or ``enable_thinking``) is passed to the template too and wins over special tokens.
    A missing template, a template that fails to parse, or one that raises while rendering (for
    example through ``raise_exception``) gives InputError with the reason.
    """
    if not template:
        raise InputError(f"{source} has no chat template; pass a raw prompt instead")
    compiled = compile_chat_template(template)
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **extra}
    try:
        return compiled.render(
            messages=_prepare_messages(messages),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise InputError(f"chat template error: {e.message or e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InputError(f"chat template error: {type(e).__name__}: {e}") from e
