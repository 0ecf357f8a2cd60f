"""Proximal policy optimization for RLHF (`objective=ppo`; Schulman et al. 2017, Ouyang et al. 2022), as TRL's
PPOTrainer (its `trl.experimental` version before removal) computes it, with the value head on the policy's trunk.

Each rollout samples completions (G per prompt; 1 by default), scores each whole completion with the reward
(`train/rewards.py`), and computes per completion token t, with the sampling policy's log-probability old_t, the
reference's ref_t and the value head's v_t = h_t . w (w [D, 1], on the final hidden state at t):

    reward_t   = -beta (old_t - ref_t)  (+ the completion's reward at its last token)   KL penalty (k1), beta 0.05
    advantage  = GAE(reward, v; gamma, lam), whitened over the rollout;   returns = GAE + v   (objectives/rl.py)

and trains `epochs` passes of `minibatches` steps over it (minibatch order reshuffled every pass). Loss per token:

    -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + vf_coef 0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2)

(r = exp(logp - old); c = cliprange_value), summed over the step's completion tokens and divided by their number.
The value head lives in the trainable tree as {"heads": {"value": {"kernel": [D, 1]}}} and is saved with the run
(sftjax-export writes the policy without it). Metrics: those of GRPO's plus value_loss, value_clip_fraction and
the KL penalty's mean (kl_penalty, k1 per token, of the rollout).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError
from sftjax.model.layers import INIT_STD, linear  # a new `score` layer: transformers' initializer_range
from sftjax.objectives.base import Context, Params, ratio
from sftjax.objectives.rl import RLObjective, RolloutSettings, gae, gathered, masked_whiten, scattered, token_logps

NAME = "ppo"
ROLLOUTS = True  # trains on its own samples (train/rollout.py), not on a dataset's completions
HEAD = "value"


@dataclasses.dataclass(frozen=True)
class Settings(RolloutSettings):
    """conf/objective/ppo.yaml (defaults: TRL's PPOConfig)."""

    num_generations: int = 1  # completions per prompt
    beta: float = 0.05  # KL penalty coefficient in the reward (TRL's kl_coef)
    epochs: int = 4  # passes over each rollout (TRL's num_ppo_epochs)
    vf_coef: float = 0.1  # weight of the value loss
    cliprange_value: float = 0.2  # clip range of the value around the rollout's
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False  # whiten the per-token rewards before GAE

    def __post_init__(self):
        super().__post_init__()
        for key in ("vf_coef", "cliprange_value"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"objective.{key}={getattr(self, key)}: must be >= 0")
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"objective.{key}={getattr(self, key)}: must be in [0, 1]")


def values_of(cfg, params: Params, h: jax.Array) -> jax.Array:
    """v [b, T] (float32) of hidden states h [b, T, D] through the value head."""
    return linear(h, params["heads"][HEAD]["kernel"].astype(cfg.dtype))[..., 0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PPO(RLObjective):
    name = NAME
    kl_in_loss = False

    def init(self, rng: jax.Array) -> Params:
        return {"heads": {HEAD: {"kernel": INIT_STD * jax.random.normal(rng, (self.cfg.hidden_size, 1))}}}

    @property
    def needs_old_logps(self) -> bool:
        return True  # the KL penalty of the reward is computed from them

    def score(self, params, refs, batch):
        out = super().score(params, refs, batch)
        logp, _, h, _ = token_logps(self.cfg, params, batch)
        return {**out, "old_logps": scattered(batch, logp), "values": scattered(batch, values_of(self.cfg, params, h))}

    def advantages(self, rows: dict[str, np.ndarray], rewards: np.ndarray) -> dict[str, np.ndarray]:
        """{"advantages", "returns", "kl_penalty"} [N, T] from the sequence rewards [N] and the scored rows."""
        s, mask = self.settings, rows["loss_mask"]
        k1 = (rows["old_logps"] - rows["ref_logps"]) * mask if "ref_logps" in rows else np.zeros_like(mask)
        per_token = -s.beta * k1
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # each row's last completion position
        per_token[np.arange(len(mask)), last] += rewards
        if s.whiten_rewards:
            per_token = masked_whiten(per_token, mask, shift_mean=False)  # as TRL: scaled, mean kept
        adv, returns = gae(per_token, rows["values"] * mask, mask, s.gamma, s.lam)
        return {"advantages": masked_whiten(adv, mask), "returns": returns, "kl_penalty": k1.astype(np.float32)}

    def sums(self, params, refs, batch, rng):
        s = self.settings
        logp, entropy, h, mask = token_logps(self.cfg, params, batch, rng)
        per_token, sums = self.policy_sums(logp, entropy, mask, batch)
        v_old, returns, kl_penalty = gathered(batch, "values", "returns", "kl_penalty")
        v = values_of(self.cfg, params, h)
        v_clipped = v_old + jnp.clip(v - v_old, -s.cliprange_value, s.cliprange_value)
        loss_1, loss_2 = (v - returns) ** 2, (v_clipped - returns) ** 2
        value_loss = 0.5 * jnp.maximum(loss_1, loss_2)
        total = per_token + s.vf_coef * value_loss
        return {**sums, "loss": jnp.sum(total * mask), "value_loss": jnp.sum(value_loss * mask),
                "value_clipped": jnp.sum((loss_2 > loss_1) * mask),
                "kl_penalty": jnp.sum(kl_penalty * mask)}

    def metrics(self, sums):
        tokens = sums["weight"]
        return {**super().metrics(sums), "value_loss": ratio(sums["value_loss"], tokens),
                "value_clip_fraction": ratio(sums["value_clipped"], tokens),
                "kl_penalty": ratio(sums["kl_penalty"], tokens)}


def make(settings: Settings, context: Context) -> PPO:
    return PPO(context.model, context.tasks, settings)
