"""Supervised fine-tuning objective: next-token cross-entropy on the trained tokens.

The loss is returned as a *sum* over tokens together with the number of trained tokens; the train step adds sums
over micro-batches and devices and divides once by the global count. So the loss of a step is the mean over all
its trained tokens whatever the accumulation and device count (averaging per micro-batch would weight short
micro-batches more: transformers PR #34191).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sftjax.model.config import ModelConfig
from sftjax.model.transformer import Params, forward


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T], correct [B, T]) of targets [B, T] under logits [B, T, V], in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == targets
    return log_z - target_logit, correct


def sft_sums(cfg: ModelConfig, params: Params, batch: dict[str, jax.Array], dropout_rng=None,
             num_tasks: int = 1) -> dict[str, jax.Array]:
    """Sums over one micro-batch (batch arrays [B, T]).

    Returns loss_sum and tokens (scalars), correct (scalar), and per task (from task_ids) task_loss_sum,
    task_tokens, task_correct [num_tasks]. Tokens with loss_mask 0 count nowhere.
    """
    logits = forward(cfg, params, batch["tokens"], batch["segment_ids"], batch["positions"], dropout_rng)
    nll, correct = token_nll(logits, batch["targets"])
    weight = batch["loss_mask"].astype(jnp.float32)
    task = jnp.clip(batch["task_ids"], 0, num_tasks - 1)
    per_task = lambda x: jax.ops.segment_sum(x.reshape(-1), task.reshape(-1), num_tasks)  # noqa: E731
    return {
        "loss_sum": jnp.sum(nll * weight),
        "tokens": jnp.sum(weight),
        "correct": jnp.sum(correct * weight),
        "task_loss_sum": per_task(nll * weight),
        "task_tokens": per_task(weight),
        "task_correct": per_task(correct * weight),
    }
