"""Supervised fine-tuning objective (`objective=sft`, the default): next-token cross-entropy on the trained tokens.

The loss is returned as a *sum* over tokens together with the number of trained tokens; the train step adds sums
over micro-batches and devices and divides once by the global count. So the loss of a step is the mean over all
its trained tokens whatever the accumulation and device count (averaging per micro-batch would weight short
micro-batches more: transformers PR #34191).

Completion-only SFT trains a small share of the tokens (often a sixth or less), and the vocabulary projection is the
largest matmul of a small model (D x V per token, more than all layers of the built-in base together). So when a
batch carries `label_index` (the flat positions of its trained tokens, padded with -1 to a fixed size K; see
`label_index`), the logits are computed at those K positions only: the same sums, a fraction of the lm_head and
cross-entropy cost. K is rounded up to a fraction of the batch's B*T token slots, so a run compiles its step for
at most a few sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.model.config import ModelConfig
from sftjax.model.transformer import Params, hidden_states, lm_head
from sftjax.objectives.base import Batch, Context, Objective, array_module, flat_positions, per_task, ratio

NAME = "sft"

# Sizes K (fractions of the B*T slots of a micro-batch) the labeled-position path is compiled for; a batch with
# more trained tokens than the largest computes every position's logits.
LABEL_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)


def label_index(loss_mask: np.ndarray) -> np.ndarray | None:
    """Flat positions [..., K] of the trained tokens of each micro-batch loss_mask [..., B, T], padded with -1, or
    None when some micro-batch trains more than LABEL_FRACTIONS[-1] of its slots (then all logits are computed).

    K is the smallest B*T*fraction that holds every micro-batch's count (the same K for all of them: one shape).
    """
    B, T = loss_mask.shape[-2:]
    sizes = [max(int(B * T * f), 1) for f in LABEL_FRACTIONS]
    return flat_positions(loss_mask > 0, lambda most: next((k for k in sizes if k >= most), None))


# Sizes M (fractions of a micro-batch's B*T slots) the padding-free layers are compiled for: a batch with more real
# tokens than the largest runs every slot (the gathers would cost more than the padding they skip). Eighths, not
# finer: each size a run meets compiles its step once more, and batches of one dataset fill their slots to within
# a few eighths (the figures: experiments/bench/README.md, "Padding-free layers").
TOKEN_FRACTIONS = (1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)


def token_index(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(token_index [..., M], token_slot [..., B*T]) of each micro-batch segment_ids [..., B, T] for the
    padding-free layers (`model/compact.py`), or None when some micro-batch fills more than TOKEN_FRACTIONS[-1] of
    its slots.

    token_index: the flat positions of the real tokens (segment id > 0), padded with B*T (out of range);
    token_slot: each slot's place in token_index, M (out of range) at the padding slots. M is the smallest
    B*T*fraction that holds every micro-batch's count (one M for all: one shape).
    """
    B, T = segment_ids.shape[-2:]
    sizes = [max(int(B * T * f), 1) for f in TOKEN_FRACTIONS]
    index = flat_positions(segment_ids > 0, lambda most: next((m for m in sizes if m >= most), None))
    if index is None:
        return None
    M = index.shape[-1]
    index = np.where(index < 0, B * T, index).astype(np.int32)
    rows = index.reshape(-1, M)
    slot = np.full((rows.shape[0], B * T + 1), M, np.int32)  # one spare column takes the padding entries' writes
    np.put_along_axis(slot, rows, np.broadcast_to(np.arange(M, dtype=np.int32), rows.shape), axis=1)
    return index, slot[:, :B * T].reshape(*index.shape[:-1], B * T)


def with_token_index(cfg: ModelConfig, batch: Batch) -> Batch:
    """batch plus its token_index [..., M] and token_slot [..., b*T] (host side; padding-free layers,
    `model/compact.py`) when cfg.padding_free and the batch has padding worth skipping."""
    index = token_index(batch["segment_ids"]) if cfg.padding_free else None
    return batch if index is None else {**batch, "token_index": index[0], "token_slot": index[1]}


def batch_hidden_states(cfg: ModelConfig, params: Params, batch: Batch, rng=None) -> jax.Array:
    """`hidden_states` [b, T, D] of a micro-batch's rows; on its real tokens only when `with_token_index` gave it
    a token_index (zeros at the padding slots then)."""
    compact = (batch["token_index"], batch["token_slot"]) if "token_index" in batch else None
    return hidden_states(cfg, params, batch["tokens"], batch["segment_ids"], batch["positions"], rng, compact)


def with_label_index(batch: Batch) -> Batch:
    """batch plus its `label_index` (host side, per batch) when few enough of its tokens are trained."""
    index = label_index(batch["loss_mask"])
    return batch if index is None else {**batch, "label_index": index}


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T], correct [B, T]) of targets [B, T] under logits [B, T, V], in float32.

    correct: no logit is above the target's, i.e. greedy decoding picks it (a tie counts as correct; argmax would
    pick the lower index). One max over V, cheaper than argmax's (value, index) reduction.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = target_logit >= jnp.max(logits, axis=-1)
    return log_z - target_logit, correct


def at_trained(batch: Batch, *xs: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """([x at the trained positions for x in xs], weight): with batch["label_index"] [K] each x [B, T, ...] becomes
    [1, K, ...] (entries -1 are padding, weight 0); without it, xs are returned whole. weight: float32 loss_mask
    at the same positions."""
    weight = batch["loss_mask"].astype(jnp.float32)
    if "label_index" not in batch:
        return list(xs), weight
    index = batch["label_index"]  # [K]
    valid = index >= 0
    index = jnp.where(valid, index, 0)
    take = lambda x: x.reshape(-1, *x.shape[2:])[index][None]  # [B, T, ...] -> [1, K, ...]  # noqa: E731
    return [take(x) for x in xs], take(weight) * valid[None]


def lm_sums(nll: jax.Array, correct: jax.Array, weight: jax.Array, task: jax.Array, num_tasks: int) -> dict:
    """The LM sums of per-position nll, correct, weight and task id (all [B, T] or [1, K]): overall and per task."""
    task = jnp.clip(task, 0, num_tasks - 1)
    by_task = lambda x: jax.ops.segment_sum(x.reshape(-1), task.reshape(-1), num_tasks)  # noqa: E731
    return {
        "loss": jnp.sum(nll * weight),
        "weight": jnp.sum(weight),
        "correct": jnp.sum(correct * weight),
        "task_loss": by_task(nll * weight),
        "task_weight": by_task(weight),
        "task_correct": by_task(correct * weight),
    }


def lm_metrics(sums: dict, tasks: tuple[str, ...]) -> dict:
    """loss, ppl, accuracy (of the greedy next-token choice) and tokens, overall and per task, from `lm_sums`."""
    xp = array_module(sums["weight"])
    out = {}
    for prefix, (loss, weight, correct) in {"": ("loss", "weight", "correct"),
                                            "task_": ("task_loss", "task_weight", "task_correct")}.items():
        mean = ratio(sums[loss], sums[weight])
        values = {"loss": mean, "ppl": xp.exp(xp.minimum(mean, 50.0)), "accuracy": ratio(sums[correct], sums[weight]),
                  "tokens": sums[weight]}
        for key, value in values.items():
            out.update(per_task(key, value, tasks) if prefix else {key: value})
    return out


def sft_sums(cfg: ModelConfig, params: Params, batch: dict[str, jax.Array], dropout_rng=None,
             num_tasks: int = 1) -> dict[str, jax.Array]:
    """`lm_sums` of one micro-batch (batch arrays [B, T]): loss (summed NLL), weight (trained tokens), correct,
    and per task (from task_ids) task_loss, task_weight, task_correct [num_tasks]. Tokens with loss_mask 0 count
    nowhere. With batch["label_index"] [K] the logits are computed at those K flat positions only; the sums are
    the same.
    """
    h = batch_hidden_states(cfg, params, batch, dropout_rng)
    (h, targets, task), weight = at_trained(batch, h, batch["targets"], batch["task_ids"])
    nll, correct = token_nll(lm_head(cfg, params, h), targets)
    return lm_sums(nll, correct, weight, task, num_tasks)


@dataclasses.dataclass(frozen=True)
class Settings:
    """SFT has no settings of its own: the data section says which tokens are trained (data.mask)."""


@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """Next-token cross-entropy; weight = trained tokens."""

    cfg: ModelConfig
    tasks: tuple[str, ...]
    name = NAME

    def prepare(self, batch: Batch) -> Batch:
        return with_label_index(with_token_index(self.cfg, batch))

    def sums(self, params, refs, batch, rng):
        return sft_sums(self.cfg, params, batch, rng, len(self.tasks))

    def metrics(self, sums):
        return lm_metrics(sums, self.tasks)


def make(settings: Settings, context: Context) -> SFT:
    return SFT(context.model, context.tasks)
