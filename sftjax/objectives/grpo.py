"""Group relative policy optimization (`objective=grpo`; Shao et al. 2024, DeepSeekMath), as TRL's GRPOTrainer.

Each rollout samples G completions of every prompt (`objective.num_generations`) and scores each with the reward
(`train/rewards.py`). A completion's advantage is its reward relative to its group, the same for all its tokens:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      scale_rewards: group (default) | batch | none

(none: Dr. GRPO, Liu et al. 2025, which drops the division). No value head. The loss per completion token is the
clipped ratio objective plus beta times the k3 estimate of the KL to the reference (`objectives/rl.py`):

    -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1)

summed over the step's completion tokens and divided by their number (TRL's loss_type "dapo"). The reference is
the policy as training starts: under LoRA / QLoRA the frozen base with the adapters off (no second copy), under
full fine-tuning a frozen copy; beta = 0 needs none. With epochs x minibatches > 1 a rollout trains several steps
and the ratio's denominator is the sampling policy's log-probabilities, computed once per rollout.

Metrics (TRL's names where it has them): loss, policy_loss, kl, entropy, clip_fraction, ratio, tokens; from the
rollout: reward, reward_std, <reward name>, frac_reward_zero_std, completions/mean_length, completions/clipped_ratio.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError
from sftjax.objectives.base import Context
from sftjax.objectives.rl import RLObjective, RolloutSettings, group_advantages, token_logps

NAME = "grpo"
ROLLOUTS = True  # trains on its own samples (train/rollout.py), not on a dataset's completions
SCALES = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True)
class Settings(RolloutSettings):
    """conf/objective/grpo.yaml (defaults: the DeepSeekMath paper's beta, TRL's GRPOConfig for the rest)."""

    scale_rewards: str = "group"  # group | batch | none: what the centred rewards are divided by

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 2:
            raise ConfigError(f"objective.num_generations={self.num_generations}: GRPO needs >= 2 completions per "
                              "prompt (the advantage is relative to the prompt's group)")
        if self.scale_rewards not in SCALES:
            raise ConfigError(f"objective.scale_rewards={self.scale_rewards!r}: must be one of {', '.join(SCALES)}")


@dataclasses.dataclass(frozen=True)
class GRPO(RLObjective):
    name = NAME

    def advantages(self, rows: dict[str, np.ndarray], rewards: np.ndarray) -> dict[str, np.ndarray]:
        """{"advantages": [N, T]}: each completion's group-relative advantage on its tokens."""
        a = group_advantages(rewards, self.settings.num_generations, self.settings.scale_rewards)
        return {"advantages": (a[:, None] * rows["loss_mask"]).astype(np.float32)}

    def sums(self, params, refs, batch, rng):
        logp, entropy, _, mask = token_logps(self.cfg, params, batch, rng)
        per_token, sums = self.policy_sums(logp, entropy, mask, batch)
        return {**sums, "loss": jnp.sum(per_token * mask)}


def make(settings: Settings, context: Context) -> GRPO:
    return GRPO(context.model, context.tasks, settings)
