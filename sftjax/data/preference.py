"""Preference pairs as token sequences: tokenize, mask and fit a `Pair` (formats.py) so that one row holds both.

A pair becomes two sequences that share the prompt, chosen = prompt + chosen completion and rejected = prompt +
rejected completion, held as one `Tokenized` (masking.py) whose tokens are the two laid end to end:

    tokens [P + C + P + R] = prompt, chosen, prompt, rejected      split = P + C (where the rejected one starts)
    mask   [P + C + P + R]   True on the completion tokens only: the prompt is never trained

The prompt is encoded on its own and each completion on its own, then concatenated, so the sequence splits exactly
at the prompt's end and the prompt's tokens are exactly those the model is given at inference (the prompt alone).
Encoding prompt + completion as one text instead lets a BPE merge across the boundary ("...the an" + "swer"), so
the prompt's tokens would differ from the inference prompt's and the first completion token would straddle both
(TRL takes the common prefix of the two encodings and leaves the prompt's differing end out: trl #2054, #6105).

    text pair   prompt: encoded with the tokenizer's special tokens (its BOS); completions: without (no BOS inside
                the sequence), then EOS appended unless already there (append_eos, as TRL adds it)
    chat pair   prompt: the chat template's render of the prompt messages with the generation prompt; completion:
                the rest of the render of prompt + completion messages (the reply, its end-of-turn marker and
                whatever the template writes after it). Rendered text carries its own special tokens; EOS is appended
                only where the completion holds no control token (a template without an end-of-turn marker).

A pair whose chosen and rejected token sequences are identical teaches nothing: it is dropped and counted.

Fitting a pair into a row of T tokens (both sequences must fit: 2P + C + R <= T; `packing.fit_length` applies the
over-long policy to pairs as to other examples), policy `truncate` (`truncate_pair`): prompt tokens
are cut from the left of both copies (keeping BOS and at least one prompt token), then, only if still too long,
completion tokens from the end of the longer completion, one at a time. A pair left with an empty completion, or
with two completions cut to the same tokens, is dropped (counted). `drop` drops an over-long pair, `error` stops at it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sftjax.data.errors import DataError
from sftjax.data.formats import Pair
from sftjax.data.chat_spans import render
from sftjax.data.masking import Tokenized
from sftjax.data.tokenizer import Tokenizer


def completion_text(tok: Tokenizer, prompt, completion, where: str, template_kwargs: dict | None = None,
                    key: str = "completion") -> tuple[str, str]:
    """(prompt text, completion text) of one sequence: as given (text), or cut out of the chat template's renders
    of the prompt messages (with the generation prompt) and of prompt + completion messages."""
    if isinstance(prompt, str):
        return prompt, completion
    kw = template_kwargs or {}
    head, _ = render(tok, prompt, where, kw, add_generation_prompt=True)
    full, _ = render(tok, tuple(prompt) + tuple(completion), where, kw)
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template renders the prompt differently once the {key} answer follows, "
                        "so the answer cannot be cut out of the render")
    return head, full[len(head):]


def encode_sequences(tok: Tokenizer, texts: Sequence[tuple[str, str]], chat: Sequence[bool],
                     append_eos: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, completion ids) of (prompt text, completion text) pairs, encoded apart (batched): a text prompt
    with the tokenizer's special tokens (its BOS), a rendered one as it is; completions without, EOS appended
    unless already there (chat: only where the completion holds no control token)."""
    eos = tok.eos_id
    if append_eos and eos is None:
        raise DataError(f"{tok.source}: append_eos needs an eos_token in tokenizer_config.json (or append_eos=false)")
    prompts: list = [None] * len(texts)
    for is_chat in (True, False):  # a text prompt gets the post-processor's BOS; a render carries its own
        index = [i for i, c in enumerate(chat) if c == is_chat]
        for i, enc in zip(index, tok.encode_batch([texts[i][0] for i in index], add_special_tokens=not is_chat)):
            prompts[i] = np.asarray(enc.ids, np.int32)
    special = np.fromiter(tok.special_ids, np.int64)
    out = []
    for i, enc in enumerate(tok.encode_batch([c for _, c in texts], add_special_tokens=False)):
        ids = np.asarray(enc.ids, np.int32)
        needs_eos = append_eos and (not chat[i] or not np.isin(ids, special).any())
        if needs_eos and not (len(ids) and ids[-1] == eos):
            ids = np.append(ids, np.int32(eos))
        out.append((prompts[i], ids))
    return out


def tokenize_pairs(pairs: Sequence[Pair], tok: Tokenizer, append_eos: bool = True,
                   template_kwargs: dict | None = None) -> list[Tokenized | None]:
    """Every pair as one Tokenized (see the module docstring), in order; None for a pair whose two sequences are the
    same tokens (dropped by the caller, counted)."""
    texts, chat = [], []
    for p in pairs:
        for key in ("chosen", "rejected"):
            texts.append(completion_text(tok, p.prompt, getattr(p, key), p.where, template_kwargs, key))
            chat.append(p.is_chat)
    encoded = encode_sequences(tok, texts, chat, append_eos)
    out: list[Tokenized | None] = []
    for i, pair in enumerate(pairs):
        (prompt, chosen), (_, rejected) = encoded[2 * i], encoded[2 * i + 1]
        same = np.array_equal(chosen, rejected)
        out.append(None if same else pair_tokens(prompt, chosen, rejected, pair.where, pair.margin))
    return out


def pair_tokens(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, where: str,
                margin: float | None = None) -> Tokenized:
    """The Tokenized of a pair from its prompt [P] and completion [C], [R] token ids."""
    P = len(prompt)
    tokens = np.concatenate([prompt, chosen, prompt, rejected]).astype(np.int32)
    mask = np.concatenate([np.zeros(P, bool), np.ones(len(chosen), bool), np.zeros(P, bool),
                           np.ones(len(rejected), bool)])
    return Tokenized(tokens, mask, where, split=P + len(chosen), margin=0.0 if margin is None else margin)


def parts(ex: Tokenized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt [P], chosen completion [C], rejected completion [R]) of a pair's Tokenized."""
    chosen_seq, rejected_seq = ex.tokens[:ex.split], ex.tokens[ex.split:]
    P = int(np.argmax(ex.mask[:ex.split])) if ex.mask[:ex.split].any() else ex.split
    return chosen_seq[:P], chosen_seq[P:], rejected_seq[P:]


def truncate_pair(ex: Tokenized, seq_len: int, bos_id: int | None) -> Tokenized | None:
    """An over-long pair cut to fit seq_len (see the module docstring), or None when nothing would be left to
    prefer. The over-long policy itself is `packing.fit_length`'s."""
    length = len(ex.tokens)
    prompt, chosen, rejected = parts(ex)
    keep_bos = int(bos_id is not None and len(prompt) > 0 and prompt[0] == bos_id)
    excess = length - seq_len
    cut = min(max(len(prompt) - keep_bos - 1, 0), -(-excess // 2))  # from the left of the prompt, after BOS
    prompt = np.r_[prompt[:keep_bos], prompt[keep_bos + cut:]].astype(np.int32)
    excess -= 2 * cut
    C, R = len(chosen), len(rejected)
    if excess > 0:  # cut the longer completion's end first, until both shrink together
        cut_c = min(excess, max(C - R, 0))
        cut_r = min(excess - cut_c, max(R - C, 0))
        rest = excess - cut_c - cut_r
        C, R = C - cut_c - (rest + 1) // 2, R - cut_r - rest // 2
        if C < 1 or R < 1 or np.array_equal(chosen[:C], rejected[:R]):  # nothing left to prefer
            return None
    return pair_tokens(prompt, chosen[:C], rejected[:R], ex.where, ex.margin)
