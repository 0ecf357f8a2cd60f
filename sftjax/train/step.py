"""The per-device train and eval steps, compiled with `jax.pmap` over the device axis "data".

One optimizer step sees a batch [A, b, T] per device: A micro-batches (gradient accumulation) of b rows. The
micro-batches run in a `lax.scan`, each adding its gradient of the *summed* token loss; the sums (gradients,
loss, token counts) are `psum`-reduced over devices and divided once by the global number of trained tokens:

    grad = sum over devices, micro-batches and tokens of d nll(token) / number of trained tokens

so the result does not depend on how the rows are split over devices and micro-batches (up to float summation
order). A non-finite loss leaves the state unchanged (`finite` = 0 in the metrics): the loop stops the run and
the last saved checkpoint stays the last good one.

Randomness: the dropout key of micro-batch i on device d at step s is fold_in(fold_in(fold_in(rng, s), d), i).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sftjax.model.config import ModelConfig
from sftjax.objectives.sft import sft_sums
from sftjax.train.state import merge_params

AXIS = "data"
PyTree = Any


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def train_step(state: PyTree, frozen: PyTree, batch: dict[str, jax.Array], *, cfg: ModelConfig,
               optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
               num_tasks: int) -> tuple[PyTree, dict[str, jax.Array]]:
    """One optimizer step on one device. batch arrays [A, b, T]; returns (new state, metrics identical on all
    devices)."""
    trainable = state["trainable"]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]),
                             jax.lax.axis_index(AXIS))

    def loss_fn(trainable, micro, rng):
        sums = sft_sums(cfg, merge_params(frozen, trainable), micro, rng, num_tasks)
        return sums["loss_sum"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
        index, micro = xs
        grads, sums = grad_fn(trainable, micro, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    micro_batches = batch["tokens"].shape[0]  # A
    sums_shape = jax.eval_shape(lambda: loss_fn(trainable, jax.tree.map(lambda x: x[0], batch), None)[1])
    init = (_zeros_like(trainable), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(accumulate, init, (jnp.arange(micro_batches), batch))
    grads, sums = jax.lax.psum((grads, sums), AXIS)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = sums["loss_sum"] / tokens

    updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "trainable": jax.tree.map(keep, new_trainable, trainable),
        "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
        "rng": state["rng"],
    }
    metrics = {
        "loss": loss,
        "accuracy": sums["correct"] / tokens,
        "tokens": sums["tokens"],
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_schedule(state["step"]),
        "finite": finite.astype(jnp.float32),
    }
    return new_state, metrics


def eval_sums(trainable: PyTree, frozen: PyTree, batch: dict[str, jax.Array], *, cfg: ModelConfig,
              num_tasks: int) -> dict[str, jax.Array]:
    """Loss / token / correct sums (overall and per task) of one eval batch [b, T] per device, psum-reduced."""
    return jax.lax.psum(sft_sums(cfg, merge_params(frozen, trainable), batch, None, num_tasks), AXIS)


def compile_steps(cfg: ModelConfig, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  num_tasks: int, devices: int):
    """(p_train_step(state, frozen, batch), p_eval_sums(trainable, frozen, batch)), pmapped over `devices`.

    The train state is donated: its buffers are reused for the new state.
    """
    local = jax.local_devices()[:devices]
    p_train = jax.pmap(functools.partial(train_step, cfg=cfg, optimizer=optimizer, lr_schedule=lr_schedule,
                                         num_tasks=num_tasks), axis_name=AXIS, devices=local, donate_argnums=(0,))
    p_eval = jax.pmap(functools.partial(eval_sums, cfg=cfg, num_tasks=num_tasks), axis_name=AXIS, devices=local)
    return p_train, p_eval
