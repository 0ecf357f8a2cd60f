"""Knowledge distillation: train a student to match a teacher's next-token distributions (same vocabulary).

At every trained token the student is pulled towards the teacher's distribution over the vocabulary, and
(optionally) towards the data's target token:

    loss = sum over trained tokens of  alpha * tau^2 * D(p_t, p_s) + (1 - alpha) * CE(student, target)

with p_t = softmax(teacher_logits / tau), p_s = softmax(student_logits / tau) and tau the temperature (T in Hinton
et al. 2015). The tau^2 factor keeps the divergence's gradients, which scale as 1 / tau^2, on the scale of the
cross-entropy's when tau changes. As in sft.py the loss is a *sum*: the train step divides once by the number of
trained tokens (TRL's reduction="batchmean" with labels, or num_items_in_batch, divides the same way).

The divergences D, summed over the vocabulary V at each position:

- "forward_kl": KL(p_t || p_s) = sum_v p_t (log p_t - log p_s). Hinton et al.; mass-covering. GKD's beta = 0.
- "reverse_kl": KL(p_s || p_t) = sum_v p_s (log p_s - log p_t). Mode-seeking. GKD's beta = 1.
- "jsd": the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1; TRL
  `GKDTrainer.generalized_jsd_loss`), with the mixture m = beta * p_t + (1 - beta) * p_s:

      JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)

  TRL's convention, followed exactly: beta = 0 is forward KL and beta = 1 reverse KL (both special-cased, since
  the formula above degenerates to 0 there), log m = logsumexp(log p_s + log1p(-beta), log p_t + log(beta)).
  beta = 0.5 is the symmetric JSD (TRL `GKDConfig` default).

TRL's GKD applies the temperature to the logits of both models but no tau^2 factor, and `GKDTrainer.compute_loss`
does not pass its `temperature` on (the loss uses tau = 1; `GKDConfig.temperature`, 0.9, is the sampling one).

The teacher is a frozen reference (`objective.teacher`: a local HF directory or an sftjax run directory, its
adapters merged) with the student's vocabulary; it runs in the same step on the same packed rows under
`stop_gradient`, and both models' logits are computed only at the trained positions (SFT's `label_index`), so
its extra cost is one forward pass of its layers plus its vocabulary projection at those positions.

Everything is computed from log-probabilities (log_softmax, in float32) as exp(log q) * (log q - log p): a
probability that underflows to 0 (a logit far below the others) contributes 0 with finite gradients, and so does
a vocabulary row masked to -inf in both models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import lm_head
from sftjax.objectives.base import Batch, Context, Objective, per_task, ratio
from sftjax.objectives.sft import (at_trained, batch_hidden_states, lm_metrics, lm_sums, token_nll, with_label_index,
                                   with_token_index)

NAME = "distill"

# ----------------------------------------------------------------------------------------------------------------
# Divergences

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    """KL(q || p) [...] = sum_v q (log q - log p) from log-probabilities [..., V].

    Terms with q == 0 are 0 (the limit of q log q). The `where` keeps -inf - -inf (= NaN, where both are 0) out
    of the value; its unselected branch gets a zero cotangent, which a subtraction passes on as zeros.
    """
    q = jnp.exp(log_q)
    diff = jnp.where(q > 0, log_q - log_p, 0.0)
    return jnp.sum(q * diff, axis=-1)


def divergence(student_logits: jax.Array, teacher_logits: jax.Array, kind: str, beta: float = 0.5,
               temperature: float = 1.0) -> jax.Array:
    """Per-position divergence [...] (float32) between teacher and student logits [..., V] at a temperature.

    kind is one of DIVERGENCES; beta (in [0, 1]) is used by "jsd" only, with TRL's convention (0: forward KL,
    1: reverse KL, exactly). Logits are upcast to float32 before dividing by the temperature.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {student_logits.shape} vs "
                         f"{teacher_logits.shape} (distillation needs a shared vocabulary)")
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return _kl(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return _kl(log_s, log_t)
    beta = jnp.float32(beta)
    # log m = log(beta p_t + (1 - beta) p_s). Where both are exactly 0 (-inf logits in both models) logaddexp's
    # gradient is NaN (-inf - -inf), so those entries get finite stand-ins and m = 0.
    empty = jnp.isneginf(log_s) & jnp.isneginf(log_t)
    student_part = jnp.where(empty, 0.0, log_s + jnp.log1p(-beta))
    teacher_part = jnp.where(empty, 0.0, log_t + jnp.log(beta))
    log_m = jnp.where(empty, -jnp.inf, jnp.logaddexp(student_part, teacher_part))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


# ----------------------------------------------------------------------------------------------------------------
# The objective


@dataclasses.dataclass(frozen=True)
class Settings:
    """conf/objective/distill.yaml."""

    teacher: str = ""  # local HF model directory or sftjax run directory (its latest checkpoint, adapters merged)
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs the cross-entropy on the data
    temperature: float = 2.0  # tau: both models' logits are divided by it (the loss is scaled by tau^2)
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # jsd only: the mixture weight of the teacher (TRL's: 0 = forward KL, 1 = reverse KL)
    positions: str = "trained"  # where D is taken: trained (the trained tokens) | all (every token of each example)

    def __post_init__(self):
        if not self.teacher:
            raise ConfigError("objective.teacher: not set (a local HF model directory or an sftjax run directory)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"objective.alpha={self.alpha}: must be in [0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"objective.temperature={self.temperature}: must be > 0")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"objective.divergence={self.divergence!r}: must be one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"objective.beta={self.beta}: must be in [0, 1]")
        if self.positions not in ("trained", "all"):
            raise ConfigError(f"objective.positions={self.positions!r}: must be trained or all")


@dataclasses.dataclass(frozen=True)
class Distill(Objective):
    """alpha * tau^2 * D(teacher, student) + (1 - alpha) * CE per trained token; weight = trained tokens.
    With positions=all, D is taken at every token (prompts too: distillation toward a model to keep, e.g. the base
    against forgetting) and the loss is still divided by the trained tokens.

    Metrics: loss (the objective), ce and ppl (the student's cross-entropy on the data), divergence (D at tau),
    accuracy and tokens, overall and per task.
    """

    cfg: ModelConfig
    tasks: tuple[str, ...]
    settings: Settings
    teacher: ModelConfig | None = None  # set by bind, once the teacher is loaded
    name = NAME

    def references(self) -> dict[str, str]:
        return {"teacher": self.settings.teacher}

    def bind(self, configs: dict[str, ModelConfig]) -> Distill:
        teacher = configs["teacher"]
        if teacher.vocab_size != self.cfg.vocab_size:
            raise ConfigError(f"objective.teacher={self.settings.teacher!r}: the teacher's vocabulary has "
                              f"{teacher.vocab_size} tokens, the student's {self.cfg.vocab_size}: distillation "
                              "needs the same vocabulary and tokenizer")
        return dataclasses.replace(self, teacher=teacher)

    def prepare(self, batch: Batch) -> Batch:
        batch = with_token_index(self.cfg, batch)
        return with_label_index(batch) if self.settings.positions == "trained" else batch

    def sums(self, params, refs, batch, rng):
        s = self.settings
        h = batch_hidden_states(self.cfg, params, batch, rng)
        h_teacher = batch_hidden_states(self.teacher, refs["teacher"], batch)
        (h, h_teacher, targets, task), weight = at_trained(batch, h, h_teacher, batch["targets"], batch["task_ids"])
        logits = lm_head(self.cfg, params, h)
        teacher_logits = jax.lax.stop_gradient(lm_head(self.teacher, refs["teacher"], h_teacher))
        nll, correct = token_nll(logits, targets)
        div = divergence(logits, teacher_logits, s.divergence, s.beta, s.temperature)
        # positions=all: D at every token of every example (padding excluded), CE still on the trained tokens
        kd_weight = weight if s.positions == "trained" else (batch["segment_ids"] > 0).astype(jnp.float32)
        ce = lm_sums(nll, correct, weight, task, len(self.tasks))
        kd = lm_sums(div, correct, kd_weight, task, len(self.tasks))
        return {**ce, "loss": s.alpha * s.temperature**2 * kd["loss"] + (1 - s.alpha) * ce["loss"],
                "ce": ce["loss"], "task_ce": ce["task_loss"], "divergence": kd["loss"], "kd_weight": kd["weight"],
                "task_divergence": kd["task_loss"], "task_kd_weight": kd["task_weight"]}

    def metrics(self, sums):
        lm = lm_metrics({**sums, "loss": sums["ce"], "task_loss": sums["task_ce"]}, self.tasks)
        out = {("ce" if k == "loss" else k.replace("/loss", "/ce")): v for k, v in lm.items()}
        out["loss"] = ratio(sums["loss"], sums["weight"])
        out["divergence"] = ratio(sums["divergence"], sums["kd_weight"])
        out.update(per_task("divergence", ratio(sums["task_divergence"], sums["task_kd_weight"]), self.tasks))
        return out


def make(settings: Settings, context: Context) -> Distill:
    return Distill(context.model, context.tasks, settings)
