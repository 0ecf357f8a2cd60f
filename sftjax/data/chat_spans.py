"""Which characters of a rendered chat are trained: the assistant turns, found by one of three rules.

A chat is rendered once, exactly as transformers' `apply_chat_template` renders it (what the model sees at
inference), and the loss mask is the set of character spans of its assistant turns (`masking.py` maps them to tokens
through offsets). The rules that find those spans:

  tags      the template marks assistant text with `{% generation %}` (transformers' `return_assistant_tokens_mask`):
            the spans it marks.
  per_turn  for each assistant message i, before_i = render(messages[:i], add_generation_prompt=True) and
            through_i = render(messages[:i+1]); the span is [len(before_i), len(through_i)): everything the template
            writes for turn i after the generation prompt. Exact when the template is prefix-stable on the chat
            (before_i is a prefix of through_i, which is a prefix of the whole render).
  search    for templates that rewrite earlier turns once later ones follow (Qwen3 / QwQ and the DeepSeek-R1
            distills drop earlier reasoning, Phi-3 / Phi-4-mini end only the whole chat with EOS, Mistral v0.3 /
            Nemo move the system text to the last user turn): each assistant message's content is found in the one
            render, in message order, and the span is that content plus the template's end-of-turn marker. See
            `search_spans`.

`auto` (the default) takes tags when the template has them, else per_turn when the template is prefix-stable on the
conversation, else search. Every rule is exact on what it finds; search refuses (one line) a content it cannot find.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jinja2

from sftjax.data.errors import DataError
from sftjax.data.formats import content_text
from sftjax.data.templates import has_generation_tags
from sftjax.data.tokenizer import Tokenizer

RULES = ("auto", "tags", "per_turn", "search")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # message fields templates render as reasoning
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

Span = tuple[int, int]


def render(tok: Tokenizer, messages, where: str, kwargs: dict, add_generation_prompt: bool = False,
           with_spans: bool = False) -> tuple[str, list[Span]]:
    """The chat template applied to messages; a template error (raise_exception included) becomes one DataError
    line naming where."""
    try:
        return tok.render_chat(list(messages), add_generation_prompt, with_spans, **kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  a template is a program: any error it raises is the record's
        message = str(e).splitlines()[0] if str(e) else ""
        if not isinstance(e, jinja2.TemplateError):  # raise_exception's message stands alone; others get their type
            message = f"{type(e).__name__}: {message}" if message else type(e).__name__
        raise DataError(f"{where}: chat template failed to render: {message or type(e).__name__}") from None


def per_turn_spans(tok: Tokenizer, messages: Sequence[dict], text: str, where: str, kw: dict) -> list[Span] | None:
    """The per_turn rule's spans, or None when the template is not prefix-stable on this conversation."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = render(tok, messages[:i], where, kw, add_generation_prompt=True)
        through = text if i == len(messages) - 1 else render(tok, messages[:i + 1], where, kw)[0]
        if not (through.startswith(before) and text.startswith(through)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _candidates(content: str) -> list[str]:
    """The ways templates render an assistant content: as given; with the reasoning up to the last </think> dropped
    (Qwen3 / QwQ also strip the newlines after it, the DeepSeek-R1 distills do not); stripped of surrounding
    whitespace (Llama 2 / 3, Gemma). Empty renderings are not searchable."""
    answer = content.split(THINK_CLOSE)[-1] if THINK_CLOSE in content else None
    found = [content]
    if answer is not None:
        found += [answer, answer.lstrip("\n"), answer.strip()]
    found.append(content.strip())
    return [c for i, c in enumerate(found) if c and c not in found[:i]]


def _find(text: str, cursor: int, candidates: list[str], special: bytearray) -> tuple[int, int] | None:
    """(start, end) of the earliest occurrence at or after cursor of any candidate (the longest at a tie) that does
    not overlap a special token (an answer "I" is not the I of Mistral's [/INST])."""
    best = None
    for c in candidates:
        at = text.find(c, cursor)
        while at >= 0 and 1 in special[at:at + len(c)]:
            at = text.find(c, at + 1)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and at + len(c) > best[1])):
            best = (at, at + len(c))
    return best


def _special_matches(text: str, specials: Sequence[str]) -> list[Span]:
    """(start, end) of every special token in text, left to right (the longest token at each place)."""
    if not specials:
        return []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    return [m.span() for m in pattern.finditer(text)]


def _special_chars(text: str, specials: Sequence[str]) -> bytearray:
    """[len(text)] 1 where a character belongs to a special token of the text, else 0."""
    marks = bytearray(len(text))
    for start, end in _special_matches(text, specials):
        marks[start:end] = b"\x01" * (end - start)
    return marks


def _reasoning(message: dict) -> str:
    """The reasoning a message carries (a reasoning field, or <think>...</think> in its content), stripped."""
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str):
            return message[key].strip()
    content = content_text(message.get("content"))
    if THINK_CLOSE not in content:
        return ""
    return content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1].strip()


def _special_at(text: str, at: int, specials: Sequence[str]) -> int:
    """Length of the special token starting at text[at] (the longest), 0 if none."""
    return max((len(s) for s in specials if text.startswith(s, at)), default=0)


def _end_of_turn(text: str, end: int, specials: Sequence[str], tool_calls: bool) -> int:
    """Where an assistant turn ends: after its end-of-turn marker, the first special token after the content when
    only whitespace separates them (with tool calls: whatever the template writes for them, too); else at end."""
    at = end
    while at < len(text):
        n = _special_at(text, at, specials)
        if n:
            return at + n
        if not (text[at].isspace() or tool_calls):
            return end
        at += 1
    return end


def _closing(text: str, end: int, specials: Sequence[str]) -> int:
    """len(text) when only whitespace and special tokens follow end (the template's close of the chat, e.g.
    Phi-3's EOS), else end."""
    at = end
    while at < len(text):
        n = _special_at(text, at, specials)
        if not n and not text[at].isspace():
            return end
        at += n or 1
    return at


def _generation_prompt(tok: Tokenizer, messages: Sequence[dict], where: str, kw: dict) -> str:
    """The text add_generation_prompt appends after messages ('' when the template appends none or rewrites)."""
    plain, _ = render(tok, messages, where, kw)
    prompted, _ = render(tok, messages, where, kw, add_generation_prompt=True)
    return prompted[len(plain):] if prompted.startswith(plain) else ""


def _skip_prompt(text: str, cursor: int, prompt: str, specials: Sequence[str]) -> int:
    """The cursor moved past the turn's generation prompt as rendered: the prompt, or a leading part of it that ends
    with a special token (DeepSeek-R1 prompts with <｜Assistant｜><think>, renders <｜Assistant｜>), whichever is
    found first (the longest at a tie); unchanged if none is found."""
    cuts = [len(prompt)] + [e for _, e in _special_matches(prompt, specials) if e < len(prompt)]
    best = None
    for cut in cuts:
        at = text.find(prompt[:cut], cursor)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and at + cut > best[1])):
            best = (at, at + cut)
    return best[1] if best else cursor


def search_spans(tok: Tokenizer, messages: Sequence[dict], text: str, where: str, kw: dict) -> list[Span]:
    """The search rule: each assistant turn located in the one render `text`, in message order.

    A cursor walks the text and never lands inside a special token. A user or tool message's content (as given, or
    stripped) moves it past that content when found, so an answer is never matched inside the question before it
    (system messages do not move it: some templates move them); then the turn's generation prompt moves it past the
    assistant header (`_skip_prompt`). An assistant span starts at its content (`_candidates`) and ends after the
    template's end-of-turn marker (`_end_of_turn`); when the template shows reasoning for the turn (Qwen3's last
    turn, a reasoning_content field), the span starts at the reasoning's <think>, so the reasoning is trained too;
    the final turn's span also covers what closes the chat (`_closing`). A turn without content (tool calls only)
    starts after its generation prompt. Raises DataError naming where and messages[i] when an assistant content is
    not in the render: the template rewrites it beyond these rules, and no mask is guessed.
    """
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special]
    special = _special_chars(text, specials)
    spans, cursor = [], 0
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        content = content_text(message.get("content"))
        if message["role"] in ("user", "tool"):
            hit = _find(text, cursor, [c for c in (content, content.strip()) if c], special)
            cursor = hit[1] if hit else cursor
            continue
        if message["role"] != "assistant":
            continue
        prompt = _generation_prompt(tok, messages[:i], where, kw)
        after_prompt = _skip_prompt(text, cursor, prompt, specials) if prompt else cursor
        if content.strip():
            hit = _find(text, after_prompt, _candidates(content), special)
            if hit is None:
                raise DataError(f"{where}: messages[{i}] (assistant): its content does not appear in the rendered "
                                "chat (the template rewrites it), so its loss mask cannot be found; use a template "
                                "with {% generation %} tags (data.chat_template) or data.mask=all")
            start, end = hit
            reasoning = _reasoning(message)
            if reasoning and reasoning not in text[start:end]:
                at = text.rfind(reasoning, after_prompt, start)
                if at >= 0:
                    opener = text.rfind(THINK_OPEN, after_prompt, at)
                    start = opener if opener >= 0 and not text[opener + len(THINK_OPEN):at].strip() else at
        elif after_prompt > cursor:
            start = end = after_prompt
        else:
            raise DataError(f"{where}: messages[{i}] (assistant) has no content to find in the rendered chat and no "
                            "generation prompt to start it; use a template with {% generation %} tags "
                            "(data.chat_template) or data.mask=all")
        end = _end_of_turn(text, end, specials, bool(message.get("tool_calls")))
        if i == last:
            end = _closing(text, end, specials)
        spans.append((start, end))
        cursor = end
    return spans


def chat_spans(tok: Tokenizer, messages: Sequence[dict[str, Any]], mode: str, where: str,
               template_kwargs: dict | None = None, rule: str = "auto") -> tuple[str, list[Span], str]:
    """(rendered chat, trained character spans, the rule that found them). mode: completion | last_turn | all.

    template_kwargs: extra template variables (tools, documents, enable_thinking, date_string, ...).
    """
    kw = template_kwargs or {}
    if rule not in RULES:
        raise DataError(f"mask_rule={rule!r}: unknown rule (expected one of {', '.join(RULES)})")
    if mode == "all":
        text, _ = render(tok, messages, where, kw)
        return text, [(0, len(text))], "all"
    tags = has_generation_tags(tok.chat_template) if tok.chat_template is not None else False
    if rule == "tags" and not tags:
        raise DataError(f"{tok.source}: mask_rule=tags but the chat template has no {{% generation %}} tags")
    if tags and rule in ("auto", "tags"):
        text, spans = render(tok, messages, where, kw, with_spans=True)
        used = "tags"
    else:
        text, _ = render(tok, messages, where, kw)
        spans = None
        has_assistant = any(m["role"] == "assistant" for m in messages)
        if rule in ("auto", "per_turn"):
            spans = per_turn_spans(tok, messages, text, where, kw)
            if spans is None and rule == "per_turn":
                raise DataError(f"{where}: the chat template renders an earlier message differently once later "
                                "messages follow, so per-turn rendering cannot derive its loss mask "
                                "(data.mask_rule=auto or search finds each assistant turn in the whole render)")
        used = "per_turn" if spans is not None else "search"
        if spans is None:
            spans = search_spans(tok, messages, text, where, kw) if has_assistant else []
    if mode == "last_turn":
        spans = spans[-1:]
    return text, spans, used
