"""Multi-task heads (`objective=heads`): classification heads on the shared trunk beside the LM head.

A task whose dataset declares a head (`data.train[i].head=true`; its classes listed in `labels` or collected from
the training split; with no declaration at all, every dataset of the run) is a classification task: each example is
its prompt, and a head [D, C] reads the final normalised hidden state of the example's last token (the token
transformers' `*ForSequenceClassification` pools) and predicts the class. Tasks without a head keep the LM head and
next-token cross-entropy on their trained tokens, as SFT. The trunk is shared (full, LoRA or QLoRA); the task id of
each example picks its head.

    logits_e = h[last token of e] @ W_task(e)          h [B, T, D], W_task [D, C_task]
    loss     = sum over trained tokens of CE(token) + head_weight * sum over head examples of CE(logits_e, class_e)
    weight   = trained tokens + head examples

The heads live in the trainable tree under "heads" ({task: {"kernel": [D, C]}}), are saved in checkpoints and
exported beside the model (`sftjax-export`; one task's head as a transformers sequence-classification checkpoint
with `--head TASK`). The batch carries `class_ids` [B, T] (the class at each head example's last token, -1
elsewhere: `data/packing.py`); `prepare` adds `head_index` [P], the flat positions of those tokens (padded with
-1), so the heads run on P hidden states instead of B * T.

Metrics: loss (the objective's mean), the LM tasks' loss / ppl / accuracy / tokens, and for each head task
`<task>/loss` (cross-entropy per example), `<task>/accuracy` (the argmax class is right) and `<task>/examples`;
overall `head_accuracy` and `examples`.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig
from sftjax.model.layers import INIT_STD, linear  # a new `score` layer: transformers' initializer_range
from sftjax.model.transformer import lm_head
from sftjax.objectives.base import Batch, Context, Objective, Params, flat_positions, per_task, ratio
from sftjax.objectives.sft import (at_trained, batch_hidden_states, lm_metrics, lm_sums, token_nll, with_label_index,
                                   with_token_index)

NAME = "heads"
log = logging.getLogger("sftjax")
_MIN_HEAD_SLOTS = 8  # smallest P: the head index is padded to a power of two at least this large


@dataclasses.dataclass(frozen=True)
class Settings:
    """conf/objective/heads.yaml."""

    head_weight: float = 1.0  # weight of each head example's cross-entropy against one trained token's

    def __post_init__(self):
        if not self.head_weight > 0:
            raise ConfigError(f"objective.head_weight={self.head_weight}: must be > 0")


def head_index(class_ids: np.ndarray) -> np.ndarray:
    """Flat positions [..., P] of the labelled tokens of each micro-batch's class_ids [..., B, T], padded with -1.

    P is the smallest power of two (>= 8, <= B * T) holding every micro-batch's count: few compiled shapes.
    """
    slots = class_ids.shape[-2] * class_ids.shape[-1]
    return flat_positions(class_ids >= 0, lambda most: min(max(_MIN_HEAD_SLOTS, 1 << max(most - 1, 0).bit_length()),
                                                            slots))


def class_nll(logits: jax.Array, classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cross-entropy [P], correct [P]) of classes [P] (clipped into range) under logits [P, C], in float32."""
    logits = logits.astype(jnp.float32)
    classes = jnp.clip(classes, 0, logits.shape[-1] - 1)
    target = jnp.take_along_axis(logits, classes[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target, jnp.argmax(logits, axis=-1) == classes


@dataclasses.dataclass(frozen=True)
class Heads(Objective):
    cfg: ModelConfig
    tasks: tuple[str, ...]
    labels: tuple[tuple[str, ...] | None, ...]  # per task: the head's classes, None for an LM task
    settings: Settings
    name = NAME

    def init(self, rng: jax.Array) -> Params:
        keys = jax.random.split(rng, len(self.tasks))
        return {"heads": {task: {"kernel": INIT_STD * jax.random.normal(key, (self.cfg.hidden_size, len(classes)))}
                          for task, classes, key in zip(self.tasks, self.labels, keys) if classes is not None}}

    def prepare(self, batch: Batch) -> Batch:
        return with_label_index(with_token_index(self.cfg, {**batch, "head_index": head_index(batch["class_ids"])}))

    def sums(self, params, refs, batch, rng):
        h = batch_hidden_states(self.cfg, params, batch, rng)
        (h_lm, targets, task_lm), weight = at_trained(batch, h, batch["targets"], batch["task_ids"])
        nll, correct = token_nll(lm_head(self.cfg, params, h_lm), targets)
        lm = lm_sums(nll, correct, weight, task_lm, len(self.tasks))

        index = batch["head_index"]  # [P]
        valid = index >= 0
        take = lambda x: x.reshape(-1, *x.shape[2:])[jnp.where(valid, index, 0)]  # [B, T, ...] -> [P, ...]  # noqa: E731
        h_head, classes, task = take(h), take(batch["class_ids"]), take(batch["task_ids"])
        loss = jnp.zeros(index.shape, jnp.float32)
        hit = jnp.zeros(index.shape, bool)
        for t, task_classes in enumerate(self.labels):
            if task_classes is None:
                continue
            kernel = params["heads"][self.tasks[t]]["kernel"].astype(self.cfg.dtype)
            task_loss, task_hit = class_nll(linear(h_head, kernel), classes)
            mine = task == t
            loss, hit = jnp.where(mine, task_loss, loss), jnp.where(mine, task_hit, hit)
        examples = (valid & (classes >= 0)).astype(jnp.float32)
        by_task = lambda x: jax.ops.segment_sum(x, jnp.clip(task, 0, len(self.tasks) - 1),  # noqa: E731
                                                len(self.tasks))
        head_loss = jnp.sum(loss * examples)
        return {**lm, "lm_loss": lm["loss"], "lm_weight": lm["weight"],
                "loss": lm["loss"] + self.settings.head_weight * head_loss, "weight": lm["weight"] + examples.sum(),
                "head_loss": head_loss, "examples": examples.sum(), "head_correct": jnp.sum(hit * examples),
                "task_head_loss": by_task(loss * examples), "task_examples": by_task(examples),
                "task_head_correct": by_task(hit * examples)}

    def metrics(self, sums):
        lm_tasks = tuple(t for t, c in zip(self.tasks, self.labels) if c is None)
        lm = lm_metrics({**sums, "loss": sums["lm_loss"], "weight": sums["lm_weight"]}, self.tasks)
        out = {k: v for k, v in lm.items() if "/" not in k or k.split("/")[0] in lm_tasks}
        out = {("lm_" + k if k in ("loss", "ppl") else k): v for k, v in out.items()}
        out.update({"loss": ratio(sums["loss"], sums["weight"]), "examples": sums["examples"],
                    "head_accuracy": ratio(sums["head_correct"], sums["examples"])})
        heads = [t for t, c in enumerate(self.labels) if c is not None]
        pick = lambda x: x[np.asarray(heads)]  # noqa: E731
        names = tuple(self.tasks[t] for t in heads)
        out.update(per_task("loss", ratio(pick(sums["task_head_loss"]), pick(sums["task_examples"])), names))
        out.update(per_task("accuracy", ratio(pick(sums["task_head_correct"]), pick(sums["task_examples"])), names))
        out.update(per_task("examples", pick(sums["task_examples"]), names))
        return out


def make(settings: Settings, context: Context) -> Heads:
    """Without any head task (e.g. `sftjax-eval --data` files of a heads run) this computes what SFT does."""
    if not context.heads:
        log.warning("objective=heads: no task has a head: every task is scored as text")
    return Heads(context.model, context.tasks, tuple(context.labels), settings)
