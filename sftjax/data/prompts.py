"""Prompts for RL rollouts: a prompt-only dataset, or the prompt side of any dataset format.

Records (JSONL / JSON, `records.read_records`):

    prompt-only   {"prompt": str | [messages], "answer": str (optional), ...any other keys}
    any other     prompt_completion, alpaca, chat, preference (`formats.py`): the prompt is what precedes the
                  completion (chat: the messages before the final assistant message), the answer is the completion
                  (chat: the final assistant message's content; preference: the chosen completion)

The answer is what the built-in `exact_match` reward compares a completion with; a reward function gets the
record's other keys as keyword arguments (TRL's convention: `solution=`, `ground_truth=`, ...).

A text prompt is encoded with the tokenizer's special tokens (its BOS), as plain SFT examples are; a message list is
rendered by the chat template with the generation prompt, so the completion starts the assistant's reply. A prompt
that leaves fewer than max_new_tokens of the sequence budget (data.seq_len) follows data.over_long: truncate (keep
its last tokens and BOS; counted), drop (counted) or error (one line naming file:line).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sftjax.data.errors import DataError
from sftjax.data.chat_spans import render
from sftjax.data.formats import Pair, content_text, detect_format, parse_record
from sftjax.data.records import read_records
from sftjax.data.tokenizer import Tokenizer

MESSAGE_KEYS = ("role", "content")


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: np.ndarray  # [P] int32: the prompt's tokens (chat: rendered with the generation prompt)
    prompt: str | tuple[dict[str, Any], ...]  # as the record gave it (reward models and functions get this)
    answer: str | None  # the reference answer (exact_match), None when the record has none
    fields: dict[str, Any]  # the record's other keys, for reward functions
    task: int  # index of its dataset in data.train
    where: str  # file:line


@dataclasses.dataclass
class PromptStats:
    name: str
    path: str
    read: int = 0
    kept: int = 0
    truncated: int = 0  # over-long prompts cut from the left
    dropped: int = 0  # over-long prompts left out (over_long=drop)


def _messages(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
            for m in value):
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages")
    return tuple(value)


def _record_prompt(record: Any, where: str, fmt: str, as_chat: bool) -> tuple[Any, str | None, dict]:
    """(prompt, answer, other fields) of one record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "prompt" in record and not {"completion", "chosen", "rejected"} & set(record):
        prompt = record["prompt"]
        prompt = prompt if isinstance(prompt, str) else _messages(prompt, where)
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            answer = str(answer)
        if as_chat and isinstance(prompt, str):
            prompt = ({"role": "user", "content": prompt},)
        return prompt, answer, {k: v for k, v in record.items() if k not in ("prompt", "answer")}
    example = parse_record(record, detect_format(record, where) if fmt == "auto" else fmt, where, as_chat)
    fields = {k: v for k, v in record.items()
              if k not in ("prompt", "completion", "messages", "chosen", "rejected", "instruction", "input", "output")}
    if isinstance(example, Pair):
        chosen = example.chosen if isinstance(example.chosen, str) else content_text(example.chosen[-1]["content"])
        return example.prompt, chosen, fields
    if example.messages is not None:
        messages = example.messages
        if messages[-1]["role"] == "assistant":
            return messages[:-1], content_text(messages[-1]["content"]), fields
        return messages, None, fields
    if not example.prompt:
        raise DataError(f"{where}: a text record has no prompt to sample from (give 'prompt' records)")
    return example.prompt, example.completion, fields


def encode_prompt(tok: Tokenizer, prompt, where: str, template_kwargs: dict | None = None) -> np.ndarray:
    """Token ids [P] of a prompt: text with the tokenizer's special tokens (a post-processor's trailing EOS
    removed), messages rendered with the generation prompt (template_kwargs: extra template variables)."""
    if isinstance(prompt, str):
        ids = tok.encode(prompt, add_special_tokens=True)
        if ids and tok.eos_id is not None and ids[-1] == tok.eos_id and len(ids) > 1:
            ids = ids[:-1]
    else:
        if prompt and prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant message: nothing left to generate")
        text, _ = render(tok, prompt, where, template_kwargs or {}, add_generation_prompt=True)
        ids = tok.encode(text)
    if not ids:
        raise DataError(f"{where}: the prompt is empty")
    return np.asarray(ids, np.int32)


def fit_prompt(ids: np.ndarray, budget: int, policy: str, where: str, keep_first: bool) -> np.ndarray | None:
    """ids cut to `budget` tokens by the over-long policy (None: dropped). truncate keeps the end (and the first
    token when it is BOS)."""
    if len(ids) <= budget:
        return ids
    if policy == "error":
        raise DataError(f"{where}: the prompt has {len(ids)} tokens; with objective.max_new_tokens it does not fit "
                        f"data.seq_len ({budget} tokens left for it; data.over_long=truncate or drop, or a larger "
                        "data.seq_len)")
    if policy == "drop" or budget < 2:
        return None
    return np.concatenate([ids[:1], ids[len(ids) - budget + 1:]]) if keep_first else ids[len(ids) - budget:]


def read_prompts(path: str, task: int, name: str, tok: Tokenizer, budget: int, over_long: str = "truncate",
                 fmt: str = "auto", as_chat: bool = False, template_kwargs: dict | None = None
                 ) -> tuple[list[Prompt], PromptStats]:
    """Every prompt of one dataset, in file order, fitted to `budget` tokens (data.seq_len - max_new_tokens)."""
    stats = PromptStats(name, str(path))
    out = []
    for line, record in read_records(path):
        where = f"{path}:{line}"
        prompt, answer, fields = _record_prompt(record, where, fmt, as_chat)
        stats.read += 1
        ids = encode_prompt(tok, prompt, where, template_kwargs)
        fitted = fit_prompt(ids, budget, over_long, where, keep_first=tok.bos_id is not None and ids[0] == tok.bos_id)
        if fitted is None:
            stats.dropped += 1
            continue
        stats.truncated += int(len(fitted) < len(ids))
        out.append(Prompt(fitted, prompt, answer, fields, task, where))
    if not stats.read:
        raise DataError(f"{path}: empty dataset (no records)")
    if not out:
        raise DataError(f"{path}: every prompt is longer than data.seq_len leaves room for (over_long={over_long})")
    stats.kept = len(out)
    return out, stats
