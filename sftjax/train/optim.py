"""The optimizer: optax AdamW / Adafactor / SGD behind global-norm clipping, with a warmup + decay schedule.

It is built for the trainable tree only (the frozen base never has optimizer state). Weight decay applies to
matrices (kernels, embeddings) and never to norm scales or biases: decaying a norm's scale towards 0 only
fights the normalisation.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from sftjax.config import OptimSection

_NO_DECAY = ("scale", "bias")  # parameter names exempt from weight decay


def schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for leaves that take weight decay (kernels, embeddings), False for norm scales and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in _NO_DECAY, params)


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                          optax.sgd(lr, momentum=cfg.momentum or None))
    if cfg.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt
