"""The sharded (FSDP) train and eval steps: `jax.jit` over a device mesh ("data", "fsdp", "tensor").

The pmap step (`train/step.py`) keeps a whole copy of the train state on every device. Here every array of the
state (trainable weights and their optimizer state), the frozen base (a 4-bit base included) and the objective's
references is split over the "fsdp" axis of the mesh (and, for the attention and MLP projections, over "tensor"),
so a device holds 1 / (fsdp x tensor) of them; XLA's SPMD partitioner gathers each weight where it is used and
reduce-scatters its gradient (`leaf_spec` says how each array is split).

Same numerics as the pmap step. The batch keeps the pmap layout [G, A, b, T]: G = data x fsdp groups of rows (a
pmap device's rows; the groups are split over ("data", "fsdp"), each process holding its own), A micro-batches of
b rows. The per-group objective is vmapped over G, with the dropout key of group d and micro-batch i at step s
being fold_in(fold_in(fold_in(rng, s), d), i) as on pmap device d, and its sums are added over groups, micro-batches
and tokens, then divided once by the global weight. The parity tests (tests/train/test_parallel.py) compare the
two steps on forced host devices: full, LoRA and QLoRA, with accumulation and dropout.

The train state (donated), the frozen base and the references are global arrays with the shardings of
`state_shardings` / `tree_shardings`; the step's metrics are replicated scalars.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sftjax.objectives.base import Objective
from sftjax.train.checkpoint import path_segment
from sftjax.train.state import merge_params
from sftjax.train.step import apply_sums

PyTree = Any
AXES = ("data", "fsdp", "tensor")
GROUPS = ("data", "fsdp")  # the mesh axes the batch's rows are split over
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # tensor-parallel over their output features
ROW = ("o_proj", "down_proj")  # tensor-parallel over their input features
MIN_SPLIT = 4096  # arrays with fewer elements stay whole on every device (a norm scale, a 4-bit table)


def make_mesh(data: int, fsdp: int, tensor: int) -> Mesh:
    """The (data, fsdp, tensor) mesh over every device of every process, ordered by process then device id, so
    each process's devices form a contiguous block of groups (its slice of each global batch)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), AXES)


def leaf_spec(path: tuple[str, ...], shape: tuple[int, ...], fsdp: int, tensor: int) -> PartitionSpec:
    """How one array is split. The stacked layer axis of scanned layers ("layers" in the path) is never split.
    tensor: a projection's kernel (and LoRA factor on the split side) over its output features (q/k/v/gate/up) or
    input features (o/down). fsdp: the largest remaining axis it divides. Small arrays stay whole."""
    spec: list[Any] = [None] * len(shape)
    if math.prod(shape) < MIN_SPLIT:
        return PartitionSpec(*spec)
    first = 1 if "layers" in path else 0
    if tensor > 1 and len(shape) - first == 2:
        module = next((p for p in reversed(path) if p in COLUMN or p in ROW), None)
        dim = None
        if module in COLUMN and path[-1] in ("kernel", "lora_b"):
            dim = len(shape) - 1
        elif module in ROW and path[-1] in ("kernel", "lora_a"):
            dim = len(shape) - 2
        if dim is not None and shape[dim] % tensor == 0:
            spec[dim] = "tensor"
    if fsdp > 1:
        free = [i for i in range(first, len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """NamedSharding of every leaf of `tree` (arrays or ShapeDtypeStructs) by `leaf_spec`."""
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]

    def one(path, leaf):
        return NamedSharding(mesh, leaf_spec(tuple(path_segment(k) for k in path), tuple(np.shape(leaf)), fsdp, tensor))

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(abstract_state: PyTree, mesh: Mesh) -> PyTree:
    """Shardings of the train state: trainable weights and optimizer state split, step and rng replicated."""
    return {
        "step": replicated(mesh),
        "trainable": tree_shardings(abstract_state["trainable"], mesh),
        "opt_state": tree_shardings(abstract_state["opt_state"], mesh),
        "rng": replicated(mesh),
    }


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[G, ...] arrays: groups split over ("data", "fsdp"), each group's rows replicated over "tensor"."""
    return NamedSharding(mesh, PartitionSpec(GROUPS))


def _group_sums(objective: Objective, params: PyTree, refs: PyTree, micro: dict, keys) -> dict:
    """The objective's sums over micro [G, b, T], vmapped over the G groups (group d with keys[d]), added up."""
    run = lambda m, k: objective.sums(params, refs, m, k)  # noqa: E731
    per_group = jax.vmap(run, spmd_axis_name=GROUPS)(micro, keys) if keys is not None else \
        jax.vmap(lambda m: run(m, None), spmd_axis_name=GROUPS)(micro)
    return jax.tree.map(lambda x: x.sum(0), per_group)


def train_step(state: PyTree, frozen: PyTree, refs: PyTree, batch: dict[str, jax.Array], *, objective: Objective,
               optimizer: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[PyTree, dict[str, jax.Array]]:
    """One optimizer step over the global batch [G, A, b, T]; `step.train_step`'s math without the device axis."""
    trainable = state["trainable"]
    groups, micro_batches = batch["tokens"].shape[:2]  # G, A
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    group_keys = jax.vmap(lambda d: jax.random.fold_in(step_key, d))(jnp.arange(groups))  # pmap device d's key

    def loss_fn(trainable, micro, index):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(group_keys)
        sums = _group_sums(objective, merge_params(frozen, trainable), refs, micro, keys)
        return sums["loss"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    by_micro = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batch)  # [A, G, b, T]
    totals = jax.tree.map(lambda x: x.sum((0, 1)), jax.vmap(jax.vmap(objective.totals))(batch))
    if totals:
        by_micro = {**by_micro, "totals": jax.tree.map(
            lambda x: jnp.broadcast_to(x, (micro_batches, groups, *x.shape)), totals)}

    def accumulate(carry, xs):
        index, micro = xs
        grads, sums = grad_fn(trainable, micro, index)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    first = jax.tree.map(lambda x: x[0], by_micro)
    sums_shape = jax.eval_shape(lambda: loss_fn(trainable, first, 0)[1])
    init = (jax.tree.map(jnp.zeros_like, trainable), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(accumulate, init, (jnp.arange(micro_batches), by_micro))
    return apply_sums(state, grads, sums, objective=objective, optimizer=optimizer, lr_schedule=lr_schedule)


def eval_sums(trainable: PyTree, frozen: PyTree, refs: PyTree, batch: dict[str, jax.Array], *,
              objective: Objective) -> dict[str, jax.Array]:
    """The objective's sums over one global eval batch [G, b, T] (no dropout)."""
    totals = jax.tree.map(lambda x: x.sum(0), jax.vmap(objective.totals)(batch))
    if totals:
        batch = {**batch, "totals": jax.tree.map(lambda x: jnp.broadcast_to(x, (batch["tokens"].shape[0], *x.shape)),
                                                 totals)}
    return _group_sums(objective, merge_params(frozen, trainable), refs, batch, None)


class InMesh:
    """A jitted function called and lowered under `jax.set_mesh(mesh)`, so that the model's activation constraints
    (`layers.rows_as_given`) see the mesh; `set_mesh` cannot be entered inside `jax.jit`."""

    def __init__(self, fn, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)


def compile_steps(objective: Objective, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  mesh: Mesh, state_sharding: PyTree, frozen_sharding: PyTree, refs_sharding: PyTree):
    """(train(state, frozen, refs, batch), eval(trainable, frozen, refs, batch)) jitted over `mesh` (`InMesh`);
    the state is donated and keeps `state_sharding`."""
    rows = batch_sharding(mesh)
    train = jax.jit(functools.partial(train_step, objective=objective, optimizer=optimizer, lr_schedule=lr_schedule),
                    in_shardings=(state_sharding, frozen_sharding, refs_sharding, rows),
                    out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_sums, objective=objective),
                       in_shardings=(state_sharding["trainable"], frozen_sharding, refs_sharding, rows),
                       out_shardings=replicated(mesh))
    return InMesh(train, mesh), InMesh(evaluate, mesh)
