"""What the RL objectives (grpo.py, ppo.py) share: rollout settings, the per-token formulas, the rollout interface.

An RL objective trains on its own samples. Every rollout (`train/rollout.py`) takes prompts, samples completions
with the policy as it is, scores them with the reward functions, and lays each (prompt, completion) into its own
row; the objective then adds per-token arrays to the rows, and the ordinary train step runs on them for
`epochs` x `minibatches` optimizer steps. Per-token arrays are aligned with `targets` (position t holds the values
of the token targets[t], predicted at t): the completion tokens are where loss_mask is 1.

Besides the seam of `objectives/base.py` an RL objective says

    rollouts = True
    score(params, refs, batch)  compiled, no gradient: {"ref_logps": [b, T]} (when beta > 0), {"old_logps": [b, T]}
                                (when a rollout trains more than one step: the ratio's denominator), PPO's
                                {"values": [b, T]}
    advantages(rows, rewards)   host, numpy: the arrays the loss needs ([N, T] float32: "advantages", PPO's "returns")

Formulas (per completion token t; s the sampling policy pi_old, logp = log pi(token), ref = log pi_ref(token)):

    ratio        r = exp(logp - old_logp)
    clipped      -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)                   PPO (Schulman et al. 2017)
    kl (k3)      exp(ref - logp) - (ref - logp) - 1   >= 0, unbiased for KL(pi || pi_ref) (Schulman 2020; GRPO)
    entropy      -sum_v p_v log p_v of the policy's next-token distribution

The loss of a step is the sum over its completion tokens divided by their number over all devices and
micro-batches (TRL's loss_type "dapo", its GRPO default): every token counts the same, however long its completion.

Logits only at completion tokens: as SFT (`objectives/sft.py`), `prepare` adds each micro-batch's completion
positions (`label_index` [K]) when they are at most half of its slots, and the vocabulary projection, log-softmax
and entropy run on those K positions only ([1, K] arrays; the per-token inputs are gathered the same way). A long
prompt then costs its share of the trunk and nothing of the lm_head.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import lm_head
from sftjax.objectives.base import Batch, Objective, Params, ratio
from sftjax.objectives.sft import at_trained, batch_hidden_states, with_label_index, with_token_index
from sftjax.train.references import starting_policy

STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4), so a group of equal rewards gives 0, not NaN
WHITEN_EPS = 1e-8  # TRL's masked_whiten


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """The keys GRPO and PPO share (conf/objective/grpo.yaml, ppo.yaml say each one's default)."""

    num_generations: int = 8  # G: completions sampled per prompt
    max_new_tokens: int = 128  # longest completion (a completion cut here has no EOS)
    temperature: float = 1.0  # sampling temperature (> 0)
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus sampling (1: all)
    rewards: tuple[str, ...] = ("exact_match",)  # exact_match | module:function | reward model dir or run
    reward_weights: tuple[float, ...] = ()  # one per reward (empty: all 1): the reward is the weighted sum
    beta: float = 0.04  # weight of the KL to the reference (0: no reference, none in memory)
    epsilon: float = 0.2  # clip range of the ratio: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # upper clip (None: epsilon; DAPO's clip-higher: 0.28)
    epochs: int = 1  # passes over each rollout batch (GRPO's mu, PPO's epochs)
    minibatches: int = 1  # optimizer steps per pass: a rollout holds minibatches x trainer.batch_size x grad_accum
    eval_reward: bool = True  # score the greedy completions of held-out prompts with the rewards at each evaluation

    def __post_init__(self):
        bad = lambda key, why: ConfigError(f"objective.{key}={getattr(self, key)!r}: {why}")  # noqa: E731
        if self.num_generations < 1:
            raise bad("num_generations", "must be >= 1")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0 (sampling; 0 would make every completion of a prompt the same)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise bad("top_k" if self.top_k < 0 else "top_p", "need top_k >= 0 and 0 < top_p <= 1")
        if not self.rewards:
            raise bad("rewards", "name at least one reward (exact_match, module:function or a reward model)")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise bad("reward_weights", f"one weight per reward ({len(self.rewards)} rewards)")
        if self.beta < 0:
            raise bad("beta", "must be >= 0")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise bad("epsilon" if not self.epsilon > 0 else "epsilon_high", "must be > 0")
        if self.epochs < 1 or self.minibatches < 1:
            raise bad("epochs" if self.epochs < 1 else "minibatches", "must be >= 1")

    @property
    def weights(self) -> tuple[float, ...]:
        return self.reward_weights or (1.0,) * len(self.rewards)

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches


# ----------------------------------------------------------------------------------------------------------------
# Per-token formulas (jax in the step; the tests check them against the papers' and TRL's)


def token_logps(cfg: ModelConfig, params: Params, batch: Batch, rng=None):
    """(log pi(targets), entropy, hidden states [.., D], weight) at the completion tokens, float32: [1, K] with
    batch["label_index"] (`sft.at_trained`), else at every position [b, T]; weight is the loss mask there."""
    h = batch_hidden_states(cfg, params, batch, rng)
    (h, targets), weight = at_trained(batch, h, batch["targets"])
    logits = lm_head(cfg, params, h).astype(jnp.float32)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy, h, weight


def gathered(batch: Batch, *keys: str) -> list[jax.Array | None]:
    """The per-token rows batch[key] [b, T] at the same positions as `token_logps` (None for an absent key)."""
    present = [k for k in keys if k in batch]
    values = dict(zip(present, at_trained(batch, *(batch[k] for k in present))[0]))
    return [values.get(k) for k in keys]


def scattered(batch: Batch, x: jax.Array) -> jax.Array:
    """Values at the completion positions ([1, K] with label_index) laid back into rows [b, T] (0 elsewhere)."""
    if "label_index" not in batch:
        return x
    b, T = batch["tokens"].shape
    index = batch["label_index"]
    flat = jnp.zeros(b * T, x.dtype).at[jnp.where(index >= 0, index, b * T)].set(x[0], mode="drop")
    return flat.reshape(b, T)


def clipped_objective(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """(per-token loss -min(r A, clip(r) A), clipped [bool]: the clipped term was the smaller one) of PPO."""
    r = jnp.exp(logp - old_logp)
    unclipped, clipped = r * advantages, jnp.clip(r, 1 - eps_low, 1 + eps_high) * advantages
    return -jnp.minimum(unclipped, clipped), clipped < unclipped


def kl_k3(logp, ref_logp):
    """The k3 estimator of KL(pi || pi_ref) per sampled token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Host-side advantages (numpy)


def group_advantages(rewards: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
    """GRPO's advantages [N] of rewards [N] laid out as N / group consecutive groups (the G samples of a prompt):
    r - mean(group), divided by std(group) + 1e-4 (scale "group"), by the std of the whole batch ("batch"), or not
    ("none", Dr. GRPO). std is the unbiased one (torch's, as TRL)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        std = r.std(axis=1, ddof=1, keepdims=True) if group > 1 else np.zeros_like(r)
        centred = centred / (std + STD_EPS)
    elif scale == "batch":
        centred = centred / (r.std(ddof=1) + STD_EPS if r.size > 1 else STD_EPS)
    return centred.reshape(-1).astype(np.float32)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
        ) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation (Schulman et al. 2016) over each row's completion tokens.

    rewards, values, mask [N, T] (mask: 1 on completion tokens, contiguous in a row). With v(t) = 0 past the last
    completion token:
        delta_t = r_t + gamma v_{t+1} - v_t,    A_t = delta_t + gamma lam A_{t+1},    returns = A + v
    Returns (advantages, returns) [N, T] float32, 0 off the mask."""
    r, v, m = (np.asarray(x, np.float64) for x in (rewards, values, mask))
    N, T = r.shape
    adv = np.zeros((N, T))
    last = np.zeros(N)
    for t in reversed(range(T)):
        m_next = m[:, t + 1] if t + 1 < T else np.zeros(N)
        v_next = v[:, t + 1] * m_next if t + 1 < T else np.zeros(N)
        delta = r[:, t] + gamma * v_next - v[:, t]
        last = (delta + gamma * lam * last * m_next) * m[:, t]
        adv[:, t] = last
    return adv.astype(np.float32), ((adv + v) * m).astype(np.float32)


def masked_whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (unbiased variance, as TRL's masked_whiten); 0 off the
    mask. shift_mean=False adds the mean back (scaled only: TRL's whitening of PPO's rewards)."""
    m = np.asarray(mask, np.float64)
    n = m.sum()
    mean = (x * m).sum() / max(n, 1.0)
    var = (((x - mean) ** 2) * m).sum() / max(n, 1.0) * (n / (n - 1) if n > 1 else 1.0)
    out = (x - mean) / np.sqrt(var + WHITEN_EPS) + (0.0 if shift_mean else mean)
    return (out * m).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The shared objective


@dataclasses.dataclass(frozen=True)
class RLObjective(Objective):
    """Base of GRPO and PPO: the reference, the rollout scoring and the clipped policy term with its metrics."""

    cfg: ModelConfig
    tasks: tuple[str, ...]
    settings: RolloutSettings
    rollouts = True
    kl_in_loss = True  # GRPO: beta k3 in the loss; PPO: the KL is a penalty in the reward instead

    def policy_references(self) -> tuple[str, ...]:
        return ("reference",) if self.settings.beta > 0 else ()

    @property
    def needs_old_logps(self) -> bool:
        """A rollout trained by one step only: pi_old = pi at that step, so old_logp = stop_gradient(logp) there
        (as TRL with num_iterations 1) and the rollout needs no extra forward pass."""
        return self.settings.steps_per_rollout > 1

    def prepare(self, batch: Batch) -> Batch:
        return with_label_index(with_token_index(self.cfg, batch))

    def score(self, params: Params, refs: dict[str, Params], batch: Batch) -> dict[str, jax.Array]:
        """Per-token rows [b, T] of one micro-batch: the sampling policy's log-probabilities (when a rollout trains
        more than one step) and the reference's (beta > 0)."""
        out = {}
        if self.needs_old_logps:
            out["old_logps"] = scattered(batch, token_logps(self.cfg, params, batch)[0])
        if self.settings.beta > 0:
            reference = starting_policy(params, refs["reference"])
            out["ref_logps"] = scattered(batch, token_logps(self.cfg, reference, batch)[0])
        return out

    def policy_sums(self, logp, entropy, mask, batch: Batch) -> tuple[jax.Array, dict]:
        """(per-token loss of the clipped term (+ beta k3), the sums every RL objective reports); logp, entropy and
        mask as `token_logps` gives them."""
        s = self.settings
        advantages, old, ref = gathered(batch, "advantages", "old_logps", "ref_logps")
        old = jax.lax.stop_gradient(logp) if old is None else old
        on = mask > 0  # off the completion every input is set to 0 first: exp() of a stray difference stays finite
        logp, old, advantages = (jnp.where(on, x, 0.0) for x in (logp, old, advantages))
        ref = None if ref is None else jnp.where(on, ref, 0.0)
        eps_high = s.epsilon if s.epsilon_high is None else s.epsilon_high
        loss, clipped = clipped_objective(logp, old, advantages, s.epsilon, eps_high)
        kl = jnp.zeros_like(logp) if ref is None else kl_k3(logp, ref)
        per_token = loss + s.beta * kl if self.kl_in_loss else loss
        sums = {"weight": mask.sum(), "policy_loss": jnp.sum(loss * mask), "kl": jnp.sum(kl * mask),
                "entropy": jnp.sum(jax.lax.stop_gradient(entropy) * mask),
                "clipped": jnp.sum(clipped * mask), "ratio": jnp.sum(jnp.exp(logp - old) * mask)}
        return per_token, sums

    def metrics(self, sums):
        tokens = sums["weight"]
        out = {key: ratio(sums[key], tokens) for key in ("policy_loss", "kl", "entropy", "ratio")}
        out["clip_fraction"] = ratio(sums["clipped"], tokens)
        out["loss"] = ratio(sums["loss"], tokens)
        out["tokens"] = tokens
        return out
