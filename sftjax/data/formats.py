"""Dataset readers: local JSONL / JSON files in the four SFT formats and TRL's preference format, validated record
by record.

Formats (the first record's keys pick one unless `format=` overrides; extra keys are ignored):

    chat               {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
                        "tools": [...] (optional), "chat_template_kwargs": {...} (optional)}
    prompt_completion  {"prompt": str, "completion": str}
    alpaca             {"instruction": str, "input": str (optional), "output": str}
    text               {"text": str}                      (continued pre-training: every token is trained)
    preference         {"prompt": ..., "chosen": ..., "rejected": ..., "margin": float (optional)}: a `Pair`

Preference records come in TRL's three shapes (`Pair` below): text (`prompt`, `chosen`, `rejected` strings; without
`prompt`, the longest common prefix of chosen and rejected, backed off to a space, as TRL's `extract_prompt`);
conversational with an explicit prompt (`prompt` a message list, `chosen` / `rejected` the assistant's message
lists, or strings taken as one assistant message); conversational with an implicit prompt (`chosen` / `rejected`
whole conversations that agree up to their final assistant message, which is where they may differ).

A chat message's content is a string or a list of text parts `[{"type": "text", "text": "..."}]`, passed to the
template as given (`content_text` joins the parts); an assistant message may carry `tool_calls` instead of content,
and a message any other key the template reads (`reasoning_content`, `name`, ...). A chat record's `tools` and
`chat_template_kwargs` become template variables for that record (TRL's dataset columns of the same names).

A file is JSON Lines (one object per line, blank lines skipped) or one JSON array of objects. Every record becomes
an `Example`: either chat `messages` (rendered later by the model's chat template) or plain `prompt` + `completion`
text (text records have an empty prompt). `as_chat=True` turns prompt/completion and Alpaca records into a
user/assistant exchange so that they, too, go through the chat template.

Classification heads (`head=True`): every record is its prompt plus a class label. The label is the record's
`label` field when present (a string; a JSON integer or boolean becomes its text: 1 -> "1", true -> "true"),
else its completion: `completion`, `output`, or the content of a chat's final assistant message (which is then
left out of the example's messages). It is stripped of surrounding whitespace and must not be empty. With a
`label` field the completion is optional (`{"prompt": ..., "label": ...}`), and chat messages are kept whole.
`text` records cannot have a head.

Every bad input raises `DataError` with one line naming `file:line` (the line where the record starts, also inside
a JSON array) and what is wrong: missing file, bytes that are not UTF-8, invalid JSON, a record that is not an
object, a missing or mistyped field, an unknown role, an empty dataset.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from sftjax.data.errors import DataError
from sftjax.data.records import read_records

FORMATS = ("chat", "prompt_completion", "alpaca", "text", "preference")
ROLES = ("system", "user", "assistant", "tool")

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")

_SHOW_CHARS = 60  # longest value quoted in an error message, so it stays one line


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example. Chat: `messages` is set. Plain: prompt (not trained by default) + completion.

    A head example (label set) is its prompt only: plain `prompt` (completion empty) or chat `messages`.
    """

    where: str  # "file:line", for error messages and the data report
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str = ""
    completion: str = ""
    label: str | None = None  # the class of a head example (see the module docstring); None: trained as text
    template_kwargs: dict[str, Any] | None = None  # a chat record's own template variables (tools, ...)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference example: a prompt and two completions of it, `chosen` (preferred) and `rejected`.

    Text: prompt, chosen and rejected are strings. Conversational: prompt is the message list before the answer and
    chosen / rejected are the assistant's message lists (rendered after the prompt by the chat template).
    margin: how much better chosen is (reward models: Bradley-Terry with a margin); None when the record has none.
    """

    where: str
    prompt: str | tuple[dict[str, Any], ...]
    chosen: str | tuple[dict[str, Any], ...]
    rejected: str | tuple[dict[str, Any], ...]
    margin: float | None = None

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "..."


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def detect_format(record: dict[str, Any], where: str, head: bool = False) -> str:
    """The format a record's keys indicate (head: a `label` field may stand for the completion). Raises DataError
    if none fits."""
    labelled = head and "label" in record
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "prompt" in record and ("completion" in record or labelled):
        return "prompt_completion"
    if "instruction" in record and ("output" in record or labelled):
        return "alpaca"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: cannot detect the format from keys {sorted(record)[:8]} (expected 'messages', "
                    "'prompt'+'completion', 'instruction'+'output', 'text' or 'chosen'+'rejected'; or set format=)")


def _string(record: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {_type_name(value)} {_show(value)}")
    return value


def content_text(content: Any) -> str:
    """A message's content as text: the string, or its text parts joined (None: '')."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _check_content(content: Any, key: str) -> None:
    """A content is a string or a list of text parts [{"type": "text", "text": str}, ...] (OpenAI / transformers)."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise DataError(f"{key} must be a string or a list of text parts, got {_type_name(content)} {_show(content)}")
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise DataError(f"{key}[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}, got "
                            f"{_show(part)} (only text is supported)")


def _template_fields(record: dict[str, Any], where: str) -> dict[str, Any] | None:
    """A chat record's own template variables: `tools` (a list of JSON schemas) and `chat_template_kwargs` (an
    object), as in TRL's datasets; None when it has neither."""
    out = {}
    if record.get("tools") is not None:
        if not isinstance(record["tools"], list):
            raise DataError(f"{where}: field 'tools' must be an array of tool schemas, got "
                            f"{_type_name(record['tools'])}")
        out["tools"] = record["tools"]
    if record.get("chat_template_kwargs") is not None:
        if not isinstance(record["chat_template_kwargs"], dict):
            raise DataError(f"{where}: field 'chat_template_kwargs' must be an object, got "
                            f"{_type_name(record['chat_template_kwargs'])}")
        out.update(record["chat_template_kwargs"])
    return out or None


def _messages(record: dict[str, Any], where: str, field: str = "messages") -> tuple[dict[str, Any], ...]:
    if field not in record:
        raise DataError(f"{where}: missing field '{field}'")
    messages = record[field]
    if not isinstance(messages, list):
        raise DataError(f"{where}: field '{field}' must be an array, got {_type_name(messages)}")
    if not messages:
        raise DataError(f"{where}: field '{field}' is empty")
    out = []
    for i, message in enumerate(messages):
        key = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key} must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            if "role" not in message:
                raise DataError(f"{where}: {key} has no 'role'")
            raise DataError(f"{where}: {key} has unknown role {_show(role)} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        tool_call_only = role == "assistant" and "tool_calls" in message and content is None
        if not tool_call_only:
            if "content" not in message:
                raise DataError(f"{where}: {key} ({role}) has no 'content'")
            _check_content(content, f"{where}: {key}.content")
        out.append(dict(message))
    return tuple(out)


def _label(record: dict[str, Any], where: str, completion: str | None) -> str:
    """A head example's class: the `label` field (string, integer or boolean, as text) else `completion`."""
    if "label" in record:
        value = record["label"]
        if isinstance(value, bool):  # before int: a JSON boolean is a Python int too
            completion = "true" if value else "false"
        elif isinstance(value, (int, str)):
            completion = str(value)
        else:
            raise DataError(f"{where}: field 'label' must be a string, integer or boolean, got {_type_name(value)} "
                            f"{_show(value)}")
    label = (completion or "").strip()
    if not label:
        raise DataError(f"{where}: no label (a head dataset needs a 'label' field or a non-empty completion)")
    return label


def _head_chat(record: dict[str, Any], where: str) -> Example:
    """A chat head example: the label field with the messages whole, or the final assistant turn's content."""
    messages = _messages(record, where)
    if "label" in record:
        return Example(where, messages=messages, label=_label(record, where, None),
                       template_kwargs=_template_fields(record, where))
    final = content_text(messages[-1]["content"]) if messages[-1]["role"] == "assistant" else None
    label = _label(record, where, final)
    if len(messages) == 1:
        raise DataError(f"{where}: no message before the final assistant turn (a head example's input is the "
                        "conversation before its label)")
    return Example(where, messages=messages[:-1], label=label, template_kwargs=_template_fields(record, where))


def parse_record(record: Any, fmt: str, where: str, as_chat: bool = False, head: bool = False) -> Example:
    """Validate one decoded JSON record of format `fmt` -> Example. Raises DataError naming `where`.

    head: the record is a classification example (its prompt and `label`; see the module docstring).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    if fmt == "preference":
        if head:
            raise DataError(f"{where}: a preference record cannot have a classification head (head=true)")
        pair = parse_pair(record, where)
        if as_chat and not pair.is_chat:  # a text pair rendered as a user / assistant exchange
            turn = lambda text: ({"role": "assistant", "content": text},)  # noqa: E731
            pair = dataclasses.replace(pair, prompt=({"role": "user", "content": pair.prompt},),
                                       chosen=turn(pair.chosen), rejected=turn(pair.rejected))
        return pair
    if head and fmt == "text":
        raise DataError(f"{where}: format text cannot have a classification head (head=true needs chat, "
                        "prompt_completion or alpaca records)")
    if fmt == "chat":
        if head:
            return _head_chat(record, where)
        return Example(where, messages=_messages(record, where), template_kwargs=_template_fields(record, where))
    if fmt == "text":
        return Example(where, completion=_string(record, "text", where))
    optional = head and "label" in record  # the label field stands for the completion
    if fmt == "prompt_completion":
        prompt, completion = _string(record, "prompt", where), _string(record, "completion", where, optional)
    elif fmt == "alpaca":
        instruction = _string(record, "instruction", where)
        extra = _string(record, "input", where, optional=True)
        completion = _string(record, "output", where, optional)
        if as_chat:
            prompt = instruction if not extra else f"{instruction}\n\n{extra}"
        else:
            template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=instruction, input=extra)
    else:
        raise DataError(f"format={fmt!r}: unknown format (expected auto or one of {', '.join(FORMATS)})")
    if head:
        label = _label(record, where, completion)
        if as_chat:
            return Example(where, messages=({"role": "user", "content": prompt},), label=label)
        return Example(where, prompt=prompt, label=label)
    if as_chat:
        return Example(where, messages=({"role": "user", "content": prompt},
                                        {"role": "assistant", "content": completion}))
    return Example(where, prompt=prompt, completion=completion)


def common_text_prefix(chosen: str, rejected: str) -> str:
    """The implicit prompt of a text pair without `prompt`: their longest common prefix, ending before the space
    that starts the first differing word (TRL's `extract_prompt` rule)."""
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    if 0 < i < min(len(chosen), len(rejected)) and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i]


def _answer(record: dict[str, Any], key: str, where: str) -> tuple[dict[str, Any], ...]:
    """chosen / rejected next to a message-list prompt: assistant messages (a string is one assistant message)."""
    value = record[key]
    if isinstance(value, str):
        return ({"role": "assistant", "content": value},)
    messages = _messages(record, where, key)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key}[{len(messages) - 1}] has role {messages[-1]['role']!r}; the last message "
                        "of a completion must be the assistant's")
    return messages


def parse_pair(record: dict[str, Any], where: str) -> Pair:
    """A preference record (any of TRL's shapes, see the module docstring) -> Pair. Raises DataError naming where."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: missing field '{key}' (a preference record needs 'chosen' and 'rejected')")
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: field 'margin' must be a number, got {_type_name(margin)} {_show(margin)}")
    margin = None if margin is None else float(margin)
    if margin is not None and not math.isfinite(margin):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {margin}")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and (prompt is None or isinstance(prompt, str)):
        if prompt is None:
            prompt = common_text_prefix(chosen, rejected)
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        return Pair(where, prompt, chosen, rejected, margin)
    if isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' is a string but 'chosen' / 'rejected' are not (give strings for "
                        "all three, or a message list as prompt)")
    if prompt is not None:
        messages = _messages(record, where, "prompt")
        return Pair(where, messages, _answer(record, "chosen", where), _answer(record, "rejected", where), margin)
    full_chosen, full_rejected = _messages(record, where, "chosen"), _messages(record, where, "rejected")
    for key, full in (("chosen", full_chosen), ("rejected", full_rejected)):
        if full[-1]["role"] != "assistant" or len(full) < 2:
            raise DataError(f"{where}: field '{key}' must be a conversation ending with an assistant message after "
                            "at least one other message (or give 'prompt' separately)")
    if full_chosen[:-1] != full_rejected[:-1]:
        i = next((i for i, (a, b) in enumerate(zip(full_chosen, full_rejected)) if a != b),
                 min(len(full_chosen), len(full_rejected)) - 1)
        raise DataError(f"{where}: the prompts of chosen and rejected differ (messages[{i}]); a conversational pair "
                        "may differ only in its final assistant message")
    return Pair(where, full_chosen[:-1], full_chosen[-1:], full_rejected[-1:], margin)


def read_dataset(path: str | Path, format: str = "auto", as_chat: bool = False,  # noqa: A002
                 head: bool = False) -> list[Example] | list[Pair]:
    """Read and validate every record of a local JSONL / JSON file -> examples, in file order.

    format: "auto" (detected from the first record's keys) or one of FORMATS.
    head: a classification dataset: every example gets its `label` (see the module docstring).
    A preference file gives Pairs (every record must be one: the format is the first record's).
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"format={format!r}: unknown format (expected auto or one of {', '.join(FORMATS)})")
    examples = []
    for line, record in read_records(path):
        where = f"{path}:{line}"
        if format == "auto":
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
            format = detect_format(record, where, head)  # noqa: A001
        examples.append(parse_record(record, format, where, as_chat, head))
    if not examples:
        raise DataError(f"{path}: empty dataset (no records)")
    return examples
