"""Tokenize examples and derive their loss masks from character spans, never from searching the text.

An example becomes text plus the character spans to train on:

  * plain (prompt + completion): text = prompt + completion, span = the completion's characters.
  * chat: the conversation rendered once by its chat template, and the spans of its assistant turns, found by
    `chat_spans.py` ({% generation %} tags, per-turn rendering, or, for templates that rewrite earlier turns, a
    search for each assistant content in the render). `Tokenized.rule` records which.

The text is encoded once, in a batch, exactly as `apply_chat_template` would (chat: no added special tokens;
plain: the tokenizer's post-processor adds BOS if it has one). A token is trained when its character offsets
overlap a span (the rule of transformers' `return_assistant_tokens_mask`), so masks are exact whatever the
template; a token that straddles a prompt/reply boundary (" I" after "Assistant:") is trained, since the model
must produce it. Modes: "completion" (default: completions / all assistant turns; plain text: everything), "last_turn"
(only the final assistant turn), "all" (every token).

EOS: with `append_eos`, plain examples get EOS appended and trained (unless the post-processor already put it
there); chat examples get it only when the final trained turn contains no control token (a template without an
end-of-turn marker), since the template's own end of turn (<|im_end|>, <|eot_id|>) is already trained.
BOS: a chat carries the BOS its template writes; plain text gets the post-processor's. Text that already starts with
the BOS string gets one BOS, not two.

Head examples (`Example.label` set, for a classification head that reads the hidden state of the LAST token, as
transformers' `*ForSequenceClassification` pools): the prompt only, nothing trained as text (mask all False, no EOS
appended). Plain: the prompt encoded with the tokenizer's special tokens (its post-processor's BOS). Chat: the
messages rendered with the generation prompt, so the last token is the one that would start the reply (with no
generation prompt when the conversation already ends with an assistant turn: a `label` field classifying it whole).

Shapes: `Tokenized.tokens` [L] int32, `Tokenized.mask` [L] bool where mask[t] says token t is a trained target
(predicted from tokens < t).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sftjax.data.chat_spans import RULES, chat_spans, render
from sftjax.data.errors import DataError
from sftjax.data.formats import Example
from sftjax.data.tokenizer import Tokenizer

MASK_MODES = ("completion", "last_turn", "all")

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenized:
    """A tokenized example: tokens [L] int32, mask [L] bool (trained targets), source location, class index.

    label: the class index of a head example, read from its last token. Tokenizing leaves it -1; `pipeline.prepare`
    sets it once the dataset's classes are known (they may be collected from the whole dataset). -1: an LM example.
    split: a preference pair (`data/preference.py`) holds its chosen sequence in tokens[:split] and its rejected one
    in tokens[split:]; 0: not a pair. margin: the pair's margin (0 when it has none). ref: the reference policy's
    summed log-probabilities of (chosen, rejected) completions when precomputed (`train/references.py`), else None.
    """

    tokens: np.ndarray
    mask: np.ndarray
    where: str
    label: int = -1
    split: int = 0
    margin: float = 0.0
    ref: tuple[float, float] | None = None
    rule: str = ""  # how a chat's mask was found (chat_spans.py: tags | per_turn | search; all); "" for plain text

    @property
    def num_trained(self) -> int:
        """Trained targets; the first token of a sequence has nothing before it, so it is never a target (a pair:
        of each of its two sequences)."""
        if self.split:
            return int(self.mask[1:self.split].sum() + self.mask[self.split + 1:].sum())
        return int(self.mask[1:].sum())


def _offset_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> np.ndarray:
    """[L] bool: tokens whose character range [start, end) overlaps any span."""
    offs = np.asarray(offsets, np.int64).reshape(-1, 2)
    mask = np.zeros(len(offs), bool)
    for start, end in spans:
        mask |= (offs[:, 0] < end) & (offs[:, 1] > start)
    return mask


def _needs_eos(special_ids: np.ndarray, ids: np.ndarray, offsets, spans: Sequence[Span], is_chat: bool) -> bool:
    if not is_chat:
        return True
    if not spans:
        return False  # nothing trained: the example is dropped anyway
    last = _offset_mask(offsets, spans[-1:])
    return not np.isin(ids[last], special_ids).any()


def _dedupe_bos(ids: np.ndarray, mask: np.ndarray, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Drop the first of two leading BOS tokens: text that already starts with the BOS string (a chat rendered
    elsewhere, then given as text) gets one BOS, not two."""
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:], mask[1:]
    return ids, mask


def tokenize_examples(examples: Sequence[Example], tok: Tokenizer, mode: str = "completion",
                      append_eos: bool = True, template_kwargs: dict | None = None,
                      mask_rule: str = "auto") -> list[Tokenized]:
    """Render, encode (batched) and mask every example, in order. Raises DataError on a render failure.

    template_kwargs: template variables for every chat (an example's own, from its record, take precedence).
    mask_rule: how chat masks are found (chat_spans.RULES; auto picks per chat).
    """
    if mode not in MASK_MODES:
        raise DataError(f"mask={mode!r}: unknown mode (expected one of {', '.join(MASK_MODES)})")
    if mask_rule not in RULES:
        raise DataError(f"mask_rule={mask_rule!r}: unknown rule (expected one of {', '.join(RULES)})")
    eos = tok.eos_id
    if append_eos and eos is None:
        raise DataError(f"{tok.source}: append_eos needs an eos_token in tokenizer_config.json (or append_eos=false)")
    texts, spans, is_chat, rules = [], [], [], []
    for ex in examples:
        kw = {**(template_kwargs or {}), **(ex.template_kwargs or {})}
        rule = ""
        if ex.label is not None:  # a head example: its prompt, nothing trained as text
            sp = []
            if ex.messages is None:
                text = ex.prompt
            else:
                generation_prompt = ex.messages[-1]["role"] != "assistant"
                text, _ = render(tok, ex.messages, ex.where, kw, generation_prompt)
        elif ex.messages is not None:
            text, sp, rule = chat_spans(tok, ex.messages, mode, ex.where, kw, mask_rule)
        else:
            text = ex.prompt + ex.completion
            sp = [(0, len(text))] if mode == "all" else [(len(ex.prompt), len(text))]
        texts.append(text)
        spans.append(sp)
        rules.append(rule)
        is_chat.append(ex.messages is not None)
    encodings: list = [None] * len(examples)
    for chat in (True, False):  # chat text carries its own special tokens; plain text gets the post-processor's
        index = [i for i, c in enumerate(is_chat) if c == chat]
        for i, enc in zip(index, tok.encode_batch([texts[i] for i in index], add_special_tokens=not chat)):
            encodings[i] = enc
    special_ids = np.fromiter(tok.special_ids, np.int64)
    out = []
    for ex, enc, sp, chat, rule in zip(examples, encodings, spans, is_chat, rules):
        ids = np.asarray(enc.ids, np.int32)
        mask = _offset_mask(enc.offsets, sp)
        needs_eos = append_eos and _needs_eos(special_ids, ids, enc.offsets, sp, chat)
        ids, mask = _dedupe_bos(ids, mask, tok.bos_id)
        if ex.label is not None:
            if not len(ids):
                raise DataError(f"{ex.where}: the prompt is empty (a head example needs at least one token)")
            out.append(Tokenized(ids, mask, ex.where))
            continue
        if needs_eos:
            if len(ids) and ids[-1] == eos and not chat:
                mask[-1] = True  # the post-processor appended EOS already
            else:
                ids, mask = np.append(ids, np.int32(eos)), np.append(mask, True)
        out.append(Tokenized(ids, mask, ex.where, rule=rule))
    return out
