"""Reward modeling (`objective=reward`): a scalar head on the trunk, trained on preference pairs (Bradley-Terry).

Each sequence of a pair (prompt + chosen, prompt + rejected; `data/preference.py`) is scored by a head w [D, 1]
(no bias) on the final normalised hidden state of its LAST token: the token transformers'
`*ForSequenceClassification` pools. Rows are packed, so the last token comes from the segment layout
(`objectives/pairs.py`), never from a pad id: it is right also when pad == eos (transformers #35352, trl #3750).

    r = h[last token] . w                                          h [B, T, D], w [D, 1]
    loss per pair = -log s(r_c - r_r - margin) + c (r_c + r_r)^2   (s: the sigmoid; TRL's RewardTrainer)

margin: the record's `margin` field (0 without one); c: `center_rewards_coefficient` (TRL's; None = 0, 0.01 is the
usual choice: keeps the rewards centred on 0). weight = pairs. The head lives in the trainable tree as
{"heads": {"reward": {"kernel": [D, 1]}}}, is saved with the checkpoints, and `sftjax-export` writes the run as a
transformers `<Family>ForSequenceClassification` checkpoint (num_labels 1, `score`); `sftjax.load_reward_model`
scores text with it.

Metrics (TRL's): loss, accuracy (r_c > r_r), margin (mean r_c - r_r), rewards/chosen, rewards/rejected, pairs;
per task <task>/loss, <task>/accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig
from sftjax.model.layers import INIT_STD, linear  # a new `score` layer: transformers' initializer_range
from sftjax.objectives.base import Batch, Context, Objective, Params, ratio
from sftjax.objectives.pairs import (chosen_rejected, pairs_present, per_sequence, task_metrics, task_sums,
                                     with_sequences)
from sftjax.objectives.sft import batch_hidden_states, with_token_index

NAME = "reward"
PAIRS = True  # trains on preference pairs (the main job then uses the built-in tasks' preference versions)
HEAD = "reward"  # the head's name under trainable["heads"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """conf/objective/reward.yaml (defaults: TRL's RewardConfig)."""

    center_rewards_coefficient: Optional[float] = None  # c: weight of (r_c + r_r)^2 per pair (None: off)

    def __post_init__(self):
        c = self.center_rewards_coefficient
        if c is not None and not c >= 0:
            raise ConfigError(f"objective.center_rewards_coefficient={c}: must be >= 0 (or null: off)")


def bradley_terry(r_c: jax.Array, r_r: jax.Array, margin: jax.Array, center: float) -> jax.Array:
    """Per-pair loss [P] from rewards r_c, r_r [P] and margins [P]."""
    return -jax.nn.log_sigmoid(r_c - r_r - margin) + center * (r_c + r_r) ** 2


def sequence_rewards(cfg: ModelConfig, params: Params, batch: Batch, rng=None) -> jax.Array:
    """r [S] (float32) of every sequence slot of a micro-batch (0 for empty slots)."""
    h = batch_hidden_states(cfg, params, batch, rng)
    last = batch["sequence_last"]  # [S]
    pooled = h.reshape(-1, h.shape[-1])[jnp.maximum(last, 0)]  # [S, D]
    r = linear(pooled, params["heads"][HEAD]["kernel"].astype(cfg.dtype))[:, 0].astype(jnp.float32)
    return jnp.where(last >= 0, r, 0.0)


@dataclasses.dataclass(frozen=True)
class Reward(Objective):
    cfg: ModelConfig
    tasks: tuple[str, ...]
    settings: Settings
    name = NAME
    pairs = True

    def init(self, rng: jax.Array) -> Params:
        return {"heads": {HEAD: {"kernel": INIT_STD * jax.random.normal(rng, (self.cfg.hidden_size, 1))}}}

    def prepare(self, batch: Batch) -> Batch:
        return with_token_index(self.cfg, with_sequences(batch))

    def sums(self, params, refs, batch, rng):
        r_c, r_r = chosen_rejected(sequence_rewards(self.cfg, params, batch, rng))
        slots = batch["sequence_last"].shape[-1]
        margin = chosen_rejected(per_sequence(batch["margins"], batch["seq_index"], slots))[0]
        present = pairs_present(batch)
        loss = bradley_terry(r_c, r_r, margin, self.settings.center_rewards_coefficient or 0.0)
        won = (r_c > r_r).astype(jnp.float32)
        return {"loss": jnp.sum(loss * present), "weight": present.sum(), "correct": jnp.sum(won * present),
                "margin": jnp.sum((r_c - r_r) * present), "rewards_chosen": jnp.sum(r_c * present),
                "rewards_rejected": jnp.sum(r_r * present), **task_sums(batch, present, len(self.tasks), loss, won)}

    def metrics(self, sums):
        pairs = sums["weight"]
        out = {"loss": ratio(sums["loss"], pairs), "accuracy": ratio(sums["correct"], pairs),
               "margin": ratio(sums["margin"], pairs), "rewards/chosen": ratio(sums["rewards_chosen"], pairs),
               "rewards/rejected": ratio(sums["rewards_rejected"], pairs), "pairs": pairs}
        out.update(task_metrics(sums, self.tasks, "accuracy"))
        return out


def make(settings: Settings, context: Context) -> Reward:
    return Reward(context.model, context.tasks, settings)
