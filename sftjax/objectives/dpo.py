"""Comparative ranking (`objective=dpo`): the DPO family on preference pairs, as TRL computes it.

Data: preference pairs (`data/preference.py`), each pair's chosen and rejected sequence packed into one row, so one
forward pass scores both. For each sequence the policy's log-probability of its completion is the sum over the
completion tokens (the prompt never counts): log pi(y|x). With the reference policy's log pi_ref(y|x):

    delta  = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))
    sigmoid  -(1 - eps) log s(beta delta) - eps log s(-beta delta)          DPO; eps > 0: cDPO (label smoothing)
    robust   (-(1 - eps) log s(beta delta) + eps log s(-beta delta)) / (1 - 2 eps)   robust DPO (Chowdhury et al.)
    hinge    relu(1 - beta delta)                                            SLiC
    ipo      (delta_c / |y_c| - delta_r / |y_r| - 1 / (2 beta))^2           IPO, per-token log ratios as TRL
    simpo    -(1 - eps) log s(beta m) - eps log s(-beta m),  m = lp_c - lp_r - gamma / beta     (reference-free;
             lp = the completion's mean log-probability per token, SimPO / TRL's CPO loss_type "simpo")
    orpo     NLL(x, y_c) - beta log s(log odds(y_c) - log odds(y_r)),  log odds(y) = lp - log(1 - exp(lp))
             (reference-free; ORPO, TRL's ORPOTrainer; lp as in simpo). As TRL and the ORPO authors' code, its
             NLL term covers the whole chosen sequence, prompt included (the other losses' optional NLL term, TRL's
             CPO, covers the chosen completion only).

(s: the logistic sigmoid.) The loss of a step is the mean over its pairs, plus sft_weight times the NLL of the chosen
completions per chosen token (ORPO's SFT term: its default weight is 1; for the others an optional extra term, TRL's
CPO `cpo_alpha`). The per-token mean needs the step's chosen-token count before the sums: `totals`.

The reference policy (`objective.reference` unset): the policy as training starts. Under LoRA / QLoRA it is the same
frozen base with the adapters switched off (`lora.without_adapters`: no second copy in memory; a module trained
beside the adapters, e.g. embed_tokens, keeps its original for the reference). Under full fine-tuning it is a frozen
copy of the initial weights. `objective.reference=DIR` names another model (an HF directory or an sftjax run), and
`objective.precompute_reference=true` computes every pair's reference log-probabilities in one pass before training
(`train/references.py`): the step then runs no reference forward and holds no reference weights.

Metrics, as TRL logs them: rewards/chosen = beta (log pi - log pi_ref)(y_c) (simpo, orpo: beta lp(y_c)),
rewards/rejected, rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen, logps/rejected (per
pair means), plus logps/accuracies (the policy alone ranks the pair right: log pi(y_c|x) > log pi(y_r|x); a model's
pairwise accuracy without a reference), nll and accuracy (greedy next-token) on the chosen completions, pairs, and
per task <task>/loss and <task>/accuracies.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import lm_head
from sftjax.objectives.base import Batch, Context, Objective, Params, ratio
from sftjax.objectives.pairs import (chosen_rejected, has_target, pair_totals, pairs_present, per_sequence,
                                     task_metrics, task_sums, with_sequences)
from sftjax.objectives.sft import at_trained, batch_hidden_states, token_nll, with_label_index, with_token_index
from sftjax.train.references import starting_policy

NAME = "dpo"
PAIRS = True  # trains on preference pairs (the main job then uses the built-in tasks' preference versions)
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclasses.dataclass(frozen=True)
class Settings:
    """conf/objective/dpo.yaml (defaults: TRL's DPOConfig / CPOConfig / ORPOConfig)."""

    loss_type: str = "sigmoid"  # sigmoid | robust | hinge | ipo | simpo | orpo
    beta: float = 0.1  # strength of the preference term (ipo: the regularisation tau; orpo: lambda)
    label_smoothing: float = 0.0  # eps: the share of pairs assumed flipped (sigmoid, robust, simpo)
    simpo_gamma: float = 0.5  # simpo: the target margin gamma
    sft_weight: Optional[float] = None  # weight of the chosen completions' NLL per token (None: 1 for orpo, else 0)
    reference: str = ""  # another reference model (HF directory or sftjax run); "": the policy as training starts
    precompute_reference: bool = False  # reference log-probabilities in one pass before training, none in the step

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"objective.loss_type={self.loss_type!r}: must be one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            raise ConfigError(f"objective.beta={self.beta}: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        if self.sft_weight is not None and self.sft_weight < 0:
            raise ConfigError(f"objective.sft_weight={self.sft_weight}: must be >= 0")
        if self.loss_type in REFERENCE_FREE and (self.reference or self.precompute_reference):
            key = "reference" if self.reference else "precompute_reference"
            raise ConfigError(f"objective.{key}: loss_type={self.loss_type} uses no reference policy")

    @property
    def nll_weight(self) -> float:
        return (1.0 if self.loss_type == "orpo" else 0.0) if self.sft_weight is None else self.sft_weight


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_odds(logp_c, logp_r, len_c, len_r) -> jax.Array:
    """ORPO's log odds ratio [P] of chosen over rejected from summed log-probabilities and lengths [P]."""
    mean_c, mean_r = logp_c / jnp.maximum(len_c, 1), logp_r / jnp.maximum(len_r, 1)
    return (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))


def pair_losses(s: Settings, logp_c, logp_r, ref_c, ref_r, len_c, len_r) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss [P], reward of chosen [P], reward of rejected [P]) of pairs from completion log-probabilities (sums
    over tokens) logp_c, logp_r [P], the reference's ref_c, ref_r [P] and completion lengths len_c, len_r [P]."""
    beta, eps = s.beta, s.label_smoothing
    log_sig = jax.nn.log_sigmoid
    if s.loss_type in REFERENCE_FREE:
        mean_c, mean_r = logp_c / jnp.maximum(len_c, 1), logp_r / jnp.maximum(len_r, 1)
        if s.loss_type == "simpo":
            m = mean_c - mean_r - s.simpo_gamma / beta
            loss = -(1 - eps) * log_sig(beta * m) - eps * log_sig(-beta * m)
        else:
            loss = -beta * log_sig(log_odds(logp_c, logp_r, len_c, len_r))
        return loss, beta * mean_c, beta * mean_r
    ratio_c, ratio_r = logp_c - ref_c, logp_r - ref_r
    delta = ratio_c - ratio_r
    if s.loss_type == "sigmoid":
        loss = -(1 - eps) * log_sig(beta * delta) - eps * log_sig(-beta * delta)
    elif s.loss_type == "robust":
        loss = (-(1 - eps) * log_sig(beta * delta) + eps * log_sig(-beta * delta)) / (1 - 2 * eps)
    elif s.loss_type == "hinge":
        loss = jax.nn.relu(1 - beta * delta)
    else:  # ipo
        loss = (ratio_c / jnp.maximum(len_c, 1) - ratio_r / jnp.maximum(len_r, 1) - 1 / (2 * beta)) ** 2
    return loss, beta * ratio_c, beta * ratio_r


@dataclasses.dataclass(frozen=True)
class DPO(Objective):
    cfg: ModelConfig
    tasks: tuple[str, ...]
    settings: Settings
    reference_cfg: ModelConfig | None = None  # an objective.reference model's architecture (set by bind)
    name = NAME
    pairs = True

    @property
    def precomputes_reference(self) -> bool:
        return self.uses_reference and self.settings.precompute_reference

    @property
    def uses_reference(self) -> bool:
        return self.settings.loss_type not in REFERENCE_FREE

    def references(self) -> dict[str, str]:
        return {"reference": self.settings.reference} if self.settings.reference else {}

    def policy_references(self) -> tuple[str, ...]:
        return ("reference",) if self.uses_reference and not self.settings.reference else ()

    def bind(self, configs: dict[str, ModelConfig]) -> DPO:
        ref = configs.get("reference")
        if ref is not None and ref.vocab_size != self.cfg.vocab_size:
            raise ConfigError(f"objective.reference={self.settings.reference!r}: its vocabulary has {ref.vocab_size} "
                              f"tokens, the policy's {self.cfg.vocab_size}: the same tokenizer is needed")
        return dataclasses.replace(self, reference_cfg=ref)

    @property
    def whole_sequence_nll(self) -> bool:
        return self.settings.loss_type == "orpo"

    def prepare(self, batch: Batch) -> Batch:
        batch = with_token_index(self.cfg, with_sequences(batch))
        return batch if self.whole_sequence_nll else with_label_index(batch)  # orpo: logits at every position

    def totals(self, batch: Batch) -> dict:
        return pair_totals(batch, self.whole_sequence_nll) if self.settings.nll_weight else {}

    def reference_params(self, params: Params, refs: dict[str, Params]) -> Params:
        """The reference policy's tree: a loaded reference as it is; the policy as it started otherwise (its frozen
        base with the adapters off, overlaid with the originals of the modules it trains)."""
        if self.settings.reference:
            return refs["reference"]
        return starting_policy(params, refs["reference"])

    def sequence_logps(self, cfg: ModelConfig, params: Params, batch: Batch, rng=None):
        """(log-probability [S], trained tokens [S], nll [..], weight [..], correct [..], sequence slot [..]) of the
        completion of every sequence slot of a micro-batch under the model `params`."""
        h = batch_hidden_states(cfg, params, batch, rng)
        (h, targets, seq), weight = at_trained(batch, h, batch["targets"], batch["seq_index"])
        nll, correct = token_nll(lm_head(cfg, params, h), targets)
        slots = batch["sequence_last"].shape[-1]
        return (per_sequence(-nll * weight, seq, slots), per_sequence(weight, seq, slots), nll, weight, correct, seq)

    def reference_logps(self, ref_params: Params, batch: Batch) -> jax.Array:
        """The reference's completion log-probability [S] of every sequence slot (no dropout, no gradient)."""
        cfg = self.reference_cfg or self.cfg
        return jax.lax.stop_gradient(self.sequence_logps(cfg, ref_params, batch)[0])

    def sums(self, params, refs, batch, rng):
        s = self.settings
        logp, count, nll, weight, correct, seq = self.sequence_logps(self.cfg, params, batch, rng)
        slots = logp.shape[0]
        if not self.uses_reference:
            ref = jnp.zeros_like(logp)
        elif "reference" in refs:
            ref = self.reference_logps(self.reference_params(params, refs), batch)
        else:  # precomputed: at each sequence's first token
            ref = per_sequence(batch["ref_logps"], batch["seq_index"], slots)
        (logp_c, logp_r), (ref_c, ref_r), (len_c, len_r) = map(chosen_rejected, (logp, ref, count))
        loss, reward_c, reward_r = pair_losses(s, logp_c, logp_r, ref_c, ref_r, len_c, len_r)
        present = pairs_present(batch)  # [P]
        is_chosen = ((seq >= 0) & (seq % 2 == 0)).astype(jnp.float32) * weight  # trained chosen tokens
        if self.whole_sequence_nll:  # every target of the chosen sequence (nll is [B, T] here: no label_index)
            is_chosen = (has_target(batch["segment_ids"]) & (batch["pair_ids"] > 0)).astype(jnp.float32)
        nll_chosen = jnp.sum(nll * is_chosen)
        pair_loss = jnp.sum(loss * present)
        total = pair_loss
        if s.nll_weight:
            t = batch["totals"]
            total = total + s.nll_weight * nll_chosen * t["pairs"] / jnp.maximum(t["chosen_tokens"], 1.0)
        won = (reward_c > reward_r).astype(jnp.float32)
        extra = {}
        if s.loss_type == "orpo":
            odds = log_odds(logp_c, logp_r, len_c, len_r)
            extra = {"log_odds": jnp.sum(odds * present),
                     "log_odds_ratio": jnp.sum(jax.nn.log_sigmoid(odds) * present)}
        return {**extra, "loss": total, "weight": present.sum(), "pair_loss": pair_loss,
                "rewards_chosen": jnp.sum(reward_c * present), "rewards_rejected": jnp.sum(reward_r * present),
                "rewards_correct": jnp.sum(won * present), "logps_chosen": jnp.sum(logp_c * present),
                "logps_rejected": jnp.sum(logp_r * present), "nll_chosen": nll_chosen,
                "logps_correct": jnp.sum((logp_c > logp_r) * present),
                "chosen_tokens": is_chosen.sum(), "chosen_correct": jnp.sum(correct * is_chosen),
                **task_sums(batch, present, len(self.tasks), loss, won)}

    def metrics(self, sums):
        pairs = sums["weight"]
        nll = ratio(sums["nll_chosen"], sums["chosen_tokens"])
        loss = ratio(sums["pair_loss"], pairs)
        out = {"loss": loss + self.settings.nll_weight * nll if self.settings.nll_weight else loss,
               "rewards/chosen": ratio(sums["rewards_chosen"], pairs),
               "rewards/rejected": ratio(sums["rewards_rejected"], pairs),
               "rewards/accuracies": ratio(sums["rewards_correct"], pairs),
               "rewards/margins": ratio(sums["rewards_chosen"] - sums["rewards_rejected"], pairs),
               "logps/chosen": ratio(sums["logps_chosen"], pairs),
               "logps/rejected": ratio(sums["logps_rejected"], pairs),
               "logps/accuracies": ratio(sums["logps_correct"], pairs),
               "nll": nll, "accuracy": ratio(sums["chosen_correct"], sums["chosen_tokens"]), "pairs": pairs}
        if self.settings.loss_type == "orpo":  # TRL's names: log_odds_ratio is the mean log sigmoid(log odds)
            out["log_odds_ratio"] = ratio(sums["log_odds_ratio"], pairs)
            out["log_odds_chosen"] = ratio(sums["log_odds"], pairs)
        out.update(task_metrics(sums, self.tasks, "accuracies"))
        return out


def make(settings: Settings, context: Context) -> DPO:
    return DPO(context.model, context.tasks, settings)
