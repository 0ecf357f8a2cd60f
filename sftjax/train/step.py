"""The per-device train and eval steps of any objective (`sftjax/objectives/base.py`), compiled with `jax.pmap`
over the device axis "data".

One optimizer step sees a batch [A, b, T] per device: A micro-batches (gradient accumulation) of b rows. The
micro-batches run in a `lax.scan`, each adding its gradient of the objective's *summed* loss; the sums (gradients,
loss, weight and whatever else the objective sums) are `psum`-reduced over devices and divided once by the global
weight (trained tokens for SFT):

    grad = sum over devices, micro-batches and tokens of d loss(token) / number of trained tokens

so the result does not depend on how the rows are split over devices and micro-batches (up to float summation
order). A non-finite loss leaves the state unchanged (`finite` = 0 in the metrics): the loop stops the run and
the last saved checkpoint stays the last good one.

Three trees go in: the train `state` (donated), the `frozen` base and the objective's `refs` (frozen models
besides the policy: a teacher, a reference), both replicated once and never donated.

An objective's `totals` (counts that depend on the batch only) are summed over micro-batches and devices first
and handed to every micro-batch as batch["totals"], for a term normalised by another count than the weight.

Randomness: the dropout key of micro-batch i on device d at step s is fold_in(fold_in(fold_in(rng, s), d), i).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sftjax.objectives.base import Objective
from sftjax.train.state import merge_params

AXIS = "data"
PyTree = Any


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def train_step(state: PyTree, frozen: PyTree, refs: PyTree, batch: dict[str, jax.Array], *, objective: Objective,
               optimizer: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[PyTree, dict[str, jax.Array]]:
    """One optimizer step on one device. batch arrays [A, b, T]; returns (new state, metrics identical on all
    devices)."""
    trainable = state["trainable"]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]),
                             jax.lax.axis_index(AXIS))

    def loss_fn(trainable, micro, rng):
        sums = objective.sums(merge_params(frozen, trainable), refs, micro, rng)
        return sums["loss"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
        index, micro = xs
        grads, sums = grad_fn(trainable, micro, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    micro_batches = batch["tokens"].shape[0]  # A
    totals = jax.lax.psum(jax.tree.map(lambda x: x.sum(0), jax.vmap(objective.totals)(batch)), AXIS)
    if totals:
        batch = {**batch, "totals": jax.tree.map(lambda x: jnp.broadcast_to(x, (micro_batches, *x.shape)), totals)}
    sums_shape = jax.eval_shape(lambda: loss_fn(trainable, jax.tree.map(lambda x: x[0], batch), None)[1])
    init = (_zeros_like(trainable), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(accumulate, init, (jnp.arange(micro_batches), batch))
    grads, sums = jax.lax.psum((grads, sums), AXIS)
    return apply_sums(state, grads, sums, objective=objective, optimizer=optimizer, lr_schedule=lr_schedule)


def apply_sums(state: PyTree, grads: PyTree, sums: dict[str, jax.Array], *, objective: Objective,
               optimizer: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[PyTree, dict[str, jax.Array]]:
    """The end of a step (pmap's and the sharded one's): the global summed gradient and sums divided once by the
    weight, the optimizer update, applied only when the loss and the gradient are finite; (new state, metrics).

    The guard is a `lax.cond`, not a select of new against old: a select keeps both states alive, one more copy
    of the weights and the optimizer state among the step's temporaries."""
    trainable = state["trainable"]
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = sums["loss"] / weight
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))

    def update(_):
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        return optax.apply_updates(trainable, updates), opt_state

    new_trainable, opt_state = jax.lax.cond(finite, update, lambda _: (trainable, state["opt_state"]), None)
    new_state = {"step": state["step"] + 1, "trainable": new_trainable, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {
        **objective.metrics(sums),
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": lr_schedule(state["step"]),
        "finite": finite.astype(jnp.float32),
    }
    return new_state, metrics


def eval_sums(trainable: PyTree, frozen: PyTree, refs: PyTree, batch: dict[str, jax.Array], *,
              objective: Objective) -> dict[str, jax.Array]:
    """The objective's sums over one eval batch [b, T] per device (no dropout), psum-reduced."""
    totals = jax.lax.psum(objective.totals(batch), AXIS)
    if totals:
        batch = {**batch, "totals": totals}
    return jax.lax.psum(objective.sums(merge_params(frozen, trainable), refs, batch, None), AXIS)


def _devices(devices: int):
    """The pmap's devices: the first `devices` local ones; in a multi-process run every device of every process
    (each process passes its local rows; the psum spans all of them)."""
    return None if jax.process_count() > 1 else jax.local_devices()[:devices]


def compile_eval(objective: Objective, devices: int):
    """p_eval(trainable, frozen, refs, batch) -> sums, pmapped over the first `devices` local devices: the one eval
    step of the training loop, `sftjax-eval` and the main job's report."""
    return jax.pmap(functools.partial(eval_sums, objective=objective), axis_name=AXIS, devices=_devices(devices))


def compile_steps(objective: Objective, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  devices: int):
    """(p_train_step(state, frozen, refs, batch), p_eval(trainable, frozen, refs, batch)), pmapped over `devices`.

    The train state is donated: its buffers are reused for the new state.
    """
    p_train = jax.pmap(functools.partial(train_step, objective=objective, optimizer=optimizer,
                                         lr_schedule=lr_schedule), axis_name=AXIS,
                       devices=_devices(devices), donate_argnums=(0,))
    return p_train, compile_eval(objective, devices)
