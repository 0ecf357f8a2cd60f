"""Fit examples to the sequence length, group them into rows, and lay rows out as model inputs.

Packing puts several examples in one row of T tokens. Each example gets its own segment id (1, 2, ... within the
row; 0 = padding) and positions restarting at 0, so with the model's segment mask no example attends to another
and each is computed exactly as if alone (tested through `forward`). Methods:

    bfd     best-fit decreasing: longest first, each into the fullest row that still has room (fewest rows)
    greedy  next-fit in stream order: start a new row when the next example does not fit (keeps order)
    none    padding mode: one example per row

Row layout (all [R, T]): tokens, targets (targets[t] = tokens[t + 1] inside the same segment), loss_mask (float32,
1 where targets[t] is a trained token of the same segment), segment_ids, positions, task_ids (-1 on padding),
class_ids (the class index of a head example at its segment's LAST token, the one a classification head reads;
-1 everywhere else, on padding and for LM examples). The last token of a segment predicts nothing, so a row never
learns across an example boundary.

Preference pairs (`data/preference.py`) are packed as units: a pair's chosen and rejected sequences go into the same
row as two consecutive segments (each with positions from 0, so one forward pass scores both exactly as if alone),
and rows of pairs carry three more keys (`PAIR_KEYS`):

    pair_ids   int32    +k on the chosen sequence of the row's k-th pair, -k on its rejected one, 0 elsewhere
    margins    float32  the pair's margin at the first token of its chosen sequence, 0 elsewhere
    ref_logps  float32  the reference's precomputed log-probability of each sequence's completion at the sequence's
                        first token, 0 elsewhere (0 everywhere when not precomputed)

With packing "none" each row holds one pair (the padded layout).

Over-long examples (L > T): "drop", "error", or "truncate", which keeps the completion: it cuts prompt tokens from
the left (keeping BOS and one token of context before the first trained token), then, only if still too long,
cuts the end. A head example has no trained token, so truncating it keeps BOS and its end (the last token is
what the head reads).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

import numpy as np

from sftjax.data.errors import DataError
from sftjax.data.masking import Tokenized
from sftjax.data.preference import truncate_pair

PACKING = ("bfd", "greedy", "none")
OVER_LONG = ("truncate", "drop", "error")
ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "task_ids", "class_ids")
PAIR_KEYS = ("pair_ids", "margins", "ref_logps")


def fit_length(ex: Tokenized, seq_len: int, policy: str, bos_id: int | None) -> Tokenized | None:
    """Apply the over-long policy: the example itself if it fits, else truncated, None (drop), or DataError. A
    preference pair (ex.split > 0) is truncated by `preference.truncate_pair` (both its sequences share a row)."""
    if policy not in OVER_LONG:
        raise DataError(f"over_long={policy!r}: expected one of {', '.join(OVER_LONG)}")
    length = len(ex.tokens)
    if length <= seq_len:
        return ex
    if policy == "drop":
        return None
    if policy == "error":
        if ex.split:
            raise DataError(f"{ex.where}: the pair has {length} tokens (prompt + chosen and prompt + rejected), more "
                            f"than seq_len={seq_len}: both sequences of a pair go into one row (set over_long=truncate "
                            "or drop)")
        raise DataError(f"{ex.where}: example has {length} tokens, more than seq_len={seq_len} "
                        "(set over_long=truncate or drop)")
    if ex.split:
        return truncate_pair(ex, seq_len, bos_id)
    trained = np.flatnonzero(ex.mask)
    first = int(trained[0]) if len(trained) else length
    keep_bos = int(bos_id is not None and ex.tokens[0] == bos_id)
    cut = min(length - seq_len, max(first - 1 - keep_bos, 0))  # prompt tokens removed after BOS
    keep = np.r_[0:keep_bos, keep_bos + cut:length][:seq_len]
    return dataclasses.replace(ex, tokens=ex.tokens[keep], mask=ex.mask[keep])


def pack_bins(lengths: Sequence[int], seq_len: int, method: str = "bfd") -> list[list[int]]:
    """Group example indices into rows whose total length is <= seq_len. Every index appears exactly once."""
    lengths = [int(n) for n in lengths]
    if any(n > seq_len or n < 1 for n in lengths):
        raise ValueError(f"lengths must be in [1, {seq_len}]")
    if method == "none":
        return [[i] for i in range(len(lengths))]
    if method == "greedy":
        bins, room = [], 0
        for i, n in enumerate(lengths):
            if not bins or n > room:
                bins.append([])
                room = seq_len
            bins[-1].append(i)
            room -= n
        return bins
    if method != "bfd":
        raise DataError(f"packing={method!r}: expected one of {', '.join(PACKING)}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the best fit is the first with room >= n
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            room, b = seq_len - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        bisect.insort(free, (room, b))
    return bins


def build_rows(examples: Sequence[Tokenized], task_ids: Sequence[int], bins: Sequence[Sequence[int]],
               seq_len: int, pad_id: int = 0, pairs: bool = False) -> dict[str, np.ndarray]:
    """Lay out packed rows -> dict of [R, T] arrays (see the module docstring); pairs: rows of preference pairs,
    with PAIR_KEYS."""
    R, T = len(bins), seq_len
    rows = {
        "tokens": np.full((R, T), pad_id, np.int32),
        "targets": np.full((R, T), pad_id, np.int32),
        "loss_mask": np.zeros((R, T), np.float32),
        "segment_ids": np.zeros((R, T), np.int32),
        "positions": np.zeros((R, T), np.int32),
        "task_ids": np.full((R, T), -1, np.int32),
        "class_ids": np.full((R, T), -1, np.int32),
    }
    if pairs:
        rows.update(pair_ids=np.zeros((R, T), np.int32), margins=np.zeros((R, T), np.float32),
                    ref_logps=np.zeros((R, T), np.float32))
    for r, members in enumerate(bins):
        offset, segment = 0, 0
        for k, i in enumerate(members, start=1):
            ex = examples[i]
            sequences = [(ex.tokens, ex.mask)] if not ex.split else [
                (ex.tokens[:ex.split], ex.mask[:ex.split]), (ex.tokens[ex.split:], ex.mask[ex.split:])]
            for role, (tokens, mask) in enumerate(sequences):
                segment += 1
                n = len(tokens)
                end = offset + n
                rows["tokens"][r, offset:end] = tokens
                rows["targets"][r, offset:end - 1] = tokens[1:]
                rows["loss_mask"][r, offset:end - 1] = mask[1:]
                rows["segment_ids"][r, offset:end] = segment
                rows["positions"][r, offset:end] = np.arange(n)
                rows["task_ids"][r, offset:end] = task_ids[i]
                rows["class_ids"][r, end - 1] = ex.label  # -1 for an LM example
                if pairs:
                    rows["pair_ids"][r, offset:end] = k if role == 0 else -k
                    rows["margins"][r, offset] = ex.margin if role == 0 else 0.0
                    rows["ref_logps"][r, offset] = 0.0 if ex.ref is None else ex.ref[role]
                offset = end
    return rows


def empty_rows(count: int, seq_len: int, pad_id: int = 0, pairs: bool = False) -> dict[str, np.ndarray]:
    """All-padding rows [count, T] (nothing trained), to complete a final partial batch."""
    return build_rows([], [], [[] for _ in range(count)], seq_len, pad_id, pairs)
