"""Chat templates: render a conversation to text exactly as transformers' `apply_chat_template` does.

Chat templates are Jinja programs shipped inside downloaded model directories, so they run in jinja2's
`ImmutableSandboxedEnvironment` with the settings, filters and globals of transformers 5.x
(`transformers/utils/chat_template_utils.py`): `trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, a
`tojson` filter that does not escape HTML, `raise_exception`, `strftime_now`, a restricted `dict` and a `namespace`
that refuses underscore names, and the `{% generation %}` tag. Rendering the same messages with the same special
tokens therefore gives the same string, hence (through the same tokenizer) the same ids.

`{% generation %} ... {% endgeneration %}` marks the assistant text in templates that have it; `render` returns
those character spans, which `masking.py` prefers over per-turn rendering.

Built-in templates serve tokenizers that ship none (`BUILTIN_TEMPLATES`, by name).
"""

from __future__ import annotations

import contextvars
import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML (OpenAI, Qwen, the tokenizer trained by `train_bpe_tokenizer`): every turn ends with <|im_end|>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3 instruct: header tokens around the role, content stripped, every turn ends with <|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3}

# (rendered blocks so far, generation spans) of the render in progress; None outside `render(with_spans=True)`.
_TRACKING: contextvars.ContextVar = contextvars.ContextVar("sftjax_generation_tracking", default=None)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}`: renders body and records its character span when tracking."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation", []), [], [], body).set_lineno(lineno)

    def _generation(self, caller):
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself to the template."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805  (same signature trick as jinja2.utils.Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile (cached) a chat template in the sandbox. Raises jinja2.TemplateSyntaxError."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


@functools.lru_cache(maxsize=32)
def has_generation_tags(source: str) -> bool:
    """Whether the template marks assistant text with {% generation %} (parsed, not searched in the text)."""
    ast = compile_template(source).environment.parse(source)
    return any(isinstance(block.call.node, jinja2.nodes.ExtensionAttribute) and block.call.node.name == "_generation"
               for block in ast.find_all(jinja2.nodes.CallBlock))


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           with_spans: bool = False, **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """Render messages -> (text, generation spans [(start, end) character offsets]; empty unless with_spans).

    Message keys whose value is None are dropped first, as transformers does. kwargs (special tokens such as
    bos_token, and user variables) become template variables. Raises jinja2.TemplateError on failure.
    """
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    template = compile_template(source)
    variables = {"tools": None, "documents": None, **kwargs, "messages": messages,
                 "add_generation_prompt": add_generation_prompt}
    if not with_spans:
        return template.render(**variables), []
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in template.generate(**variables):
            blocks.append(block)
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans
