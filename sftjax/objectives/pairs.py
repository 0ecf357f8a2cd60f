"""What the pair objectives (dpo.py, reward.py) share: finding each pair's two sequences in a packed micro-batch
and adding per-token values up per sequence.

Rows of pairs carry `pair_ids` [B, T] (+k on the chosen sequence of the row's k-th pair, -k on its rejected one,
0 elsewhere; `data/packing.py`). On the host, `prepare` turns them into dense per-micro-batch indices, so that the
compiled step works on a fixed number of sequence slots S = 2 * P:

    seq_index      [B, T]  the slot of each token's sequence: 2 * p for the chosen sequence of the micro-batch's
                           p-th pair, 2 * p + 1 for its rejected one; -1 on padding
    sequence_last  [S]     flat position (b * T + t) of each sequence's last token; -1 for an empty slot

P (pairs per micro-batch) is rounded up to a power of two (at least 4), so a run compiles its step for few shapes.
A slot holds a pair when its chosen sequence has a last token (`sequence_last[0::2] >= 0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.objectives.base import Batch, per_task, ratio

_MIN_PAIR_SLOTS = 4


def pair_slots(count: int) -> int:
    """P for a micro-batch holding at most `count` pairs: a power of two >= max(count, 4)."""
    return max(_MIN_PAIR_SLOTS, 1 << max(count - 1, 0).bit_length())


def sequence_index(pair_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seq_index [..., B, T], sequence_last [..., 2P]) from pair_ids [..., B, T] (see the module docstring)."""
    *lead, B, T = pair_ids.shape
    flat = pair_ids.reshape(-1, B, T)
    index = np.full(flat.shape, -1, np.int32)
    counts = []
    for m, micro in enumerate(flat):  # a pair is (row, k): rank them in row-major order
        rows, cols = np.nonzero(micro)
        keys = rows.astype(np.int64) * (T + 1) + np.abs(micro[rows, cols])
        unique, rank = np.unique(keys, return_inverse=True)
        index[m, rows, cols] = 2 * rank + (micro[rows, cols] < 0)
        counts.append(len(unique))
    P = pair_slots(max(counts, default=0))
    last = np.full((flat.shape[0], 2 * P), -1, np.int32)
    for m in range(flat.shape[0]):
        where = np.flatnonzero(index[m] >= 0)
        slots = index[m].reshape(-1)[where]
        np.maximum.at(last[m], slots, where.astype(np.int32))
    return index.reshape(*lead, B, T), last.reshape(*lead, 2 * P)


def with_sequences(batch: Batch) -> Batch:
    """batch plus seq_index and sequence_last (host side, per batch)."""
    index, last = sequence_index(batch["pair_ids"])
    return {**batch, "seq_index": index, "sequence_last": last}


def per_sequence(values: jax.Array, index: jax.Array, slots: int) -> jax.Array:
    """Sum of values [...] per sequence slot index [...] (-1: nowhere) -> [slots], float32."""
    index = jnp.where(index >= 0, index, slots)  # -1 -> an extra slot that is dropped
    return jax.ops.segment_sum(values.reshape(-1).astype(jnp.float32), index.reshape(-1), slots + 1)[:slots]


def chosen_rejected(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2P] per-sequence values -> ([P] chosen, [P] rejected)."""
    return x[0::2], x[1::2]


def has_target(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: token t has a target (the next token is in the same segment), i.e. every token of a sequence
    but its last."""
    same = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
    return jnp.pad(same, ((0, 0), (0, 1)))


def pair_totals(batch: Batch, whole_sequence: bool = False) -> dict[str, jax.Array]:
    """Batch-only counts of one micro-batch: pairs (chosen sequences present) and the chosen tokens an NLL term
    averages over: the trained ones (the completion), or with whole_sequence every target of the chosen sequence."""
    chosen = batch["pair_ids"] > 0
    tokens = has_target(batch["segment_ids"]) if whole_sequence else batch["loss_mask"] > 0
    return {"pairs": jnp.sum(chosen & (batch["positions"] == 0)).astype(jnp.float32),
            "chosen_tokens": jnp.sum(tokens & chosen).astype(jnp.float32)}


def pairs_present(batch: Batch) -> jax.Array:
    """[P] float32: 1 for the pair slots that hold a pair (their chosen sequence has a last token), 0 for padding."""
    return (chosen_rejected(batch["sequence_last"])[0] >= 0).astype(jnp.float32)


def task_sums(batch: Batch, present: jax.Array, num_tasks: int, loss: jax.Array, correct: jax.Array) -> dict:
    """Per-task sums [num_tasks] of per-pair loss and correct [P] (a pair's task: its chosen sequence's)."""
    last = jnp.maximum(chosen_rejected(batch["sequence_last"])[0], 0)
    task = jnp.clip(batch["task_ids"].reshape(-1)[last], 0, num_tasks - 1)  # [P]
    by_task = lambda x: jax.ops.segment_sum(x * present, task, num_tasks)  # noqa: E731
    return {"task_loss": by_task(loss), "task_pairs": by_task(jnp.ones_like(loss)), "task_correct": by_task(correct)}


def task_metrics(sums: dict, tasks: tuple[str, ...], accuracy: str) -> dict:
    """<task>/loss, <task>/<accuracy> and <task>/pairs from `task_sums`."""
    return {**per_task("loss", ratio(sums["task_loss"], sums["task_pairs"]), tasks),
            **per_task(accuracy, ratio(sums["task_correct"], sums["task_pairs"]), tasks),
            **per_task("pairs", sums["task_pairs"], tasks)}
