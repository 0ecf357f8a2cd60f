"""Where the train state lives and which step runs on it: `trainer.parallelism`.

    data  `DataParallel`: the pmap step (`train/step.py`); every device holds the whole state (leading device axis).
    fsdp  `Sharded`: the jit step over a ("data", "fsdp", "tensor") mesh (`train/sharded.py`); each device holds
          its part of the state, the frozen base and the references.

Both take the same host batches, [groups, A, b, T] arrays of this process's rows (`groups` = its local devices,
or its local devices / tensor), and give the loop the same things: placed trees, a train step, eval sums and
metrics on the host, the state to save (global arrays Orbax writes from every process, or host arrays), and the
abstract state a checkpoint restores into. A checkpoint holds the state without a device axis, so either layout
resumes from the other's checkpoints.
"""

from __future__ import annotations

from typing import Any

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sftjax.train import sharded, step
from sftjax.train.state import device_mesh, replicate

PyTree = Any
log = logging.getLogger("sftjax")


def first(x: jax.Array) -> np.ndarray:
    """One device's copy of a replicated value, on the host (pmap outputs: the first row of its device axis)."""
    return np.asarray(x.addressable_data(0))


class DataParallel:
    """pmap over this process's devices (all devices of all processes in a multi-process run)."""

    name = "data"

    def __init__(self, objective, optimizer, lr_schedule, devices: int):
        self.groups = devices
        self.mesh = device_mesh(devices)
        self._train, self._eval = step.compile_steps(objective, optimizer, lr_schedule, devices)

    def place_state(self, state: PyTree) -> PyTree:
        return replicate(jax.tree.map(_host, state), self.mesh)

    place_frozen = place_refs = place_state

    def batch(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return host

    def train(self, state, frozen, refs, batch):
        return self._train(state, frozen, refs, batch)

    def eval_sums(self, trainable, frozen, refs, batch) -> dict[str, np.ndarray]:
        return {k: first(v)[0].astype(np.float64) for k, v in self._eval(trainable, frozen, refs, batch).items()}

    def scalars(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
        return {k: float(first(v)[0]) for k, v in metrics.items()}

    def to_save(self, state: PyTree) -> PyTree:
        """Device 0's copy; in a multi-process run as global replicated arrays, which Orbax writes once."""
        host = jax.tree.map(lambda x: first(x)[0], state)
        if jax.process_count() == 1:
            return host
        everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(x, everywhere), host)

    def restore_target(self, abstract: PyTree) -> PyTree:
        if jax.process_count() == 1:
            return abstract  # restored on the first local device, then replicated
        everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), abstract)

    def params(self, trainable: PyTree) -> PyTree:
        """The trainable tree on the host (for generating samples)."""
        return jax.tree.map(lambda x: first(x)[0], trainable)


class Sharded:
    """jit over a (data, fsdp, tensor) mesh of every device; state, frozen base and references split."""

    name = "fsdp"

    def __init__(self, objective, optimizer, lr_schedule, mesh: Mesh, abstract_state: PyTree, frozen: PyTree,
                 refs: PyTree):
        self.mesh = mesh
        self.groups = jax.local_device_count() // mesh.shape["tensor"]
        self.state_sharding = sharded.state_shardings(abstract_state, mesh)
        self.frozen_sharding = sharded.tree_shardings(frozen, mesh)
        self.refs_sharding = sharded.tree_shardings(refs, mesh)
        self._rows = sharded.batch_sharding(mesh)
        self._train, self._eval = sharded.compile_steps(objective, optimizer, lr_schedule, mesh, self.state_sharding,
                                                        self.frozen_sharding, self.refs_sharding)

    def place_state(self, state: PyTree) -> PyTree:
        return jax.tree.map(_placed, state, self.state_sharding)

    def place_frozen(self, tree: PyTree) -> PyTree:
        return jax.tree.map(_placed, tree, self.frozen_sharding)

    def place_refs(self, tree: PyTree) -> PyTree:
        return jax.tree.map(_placed, tree, self.refs_sharding)

    def batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows [groups, ...] -> the global batch [groups x processes, ...]."""
        def one(x):
            return jax.make_array_from_process_local_data(self._rows, x, (x.shape[0] * jax.process_count(),
                                                                          *x.shape[1:]))
        return jax.tree.map(one, host)

    def train(self, state, frozen, refs, batch):
        return self._train(state, frozen, refs, self.batch(batch))

    def eval_sums(self, trainable, frozen, refs, batch) -> dict[str, np.ndarray]:
        sums = self._eval(trainable, frozen, refs, self.batch(batch))
        return {k: first(v).astype(np.float64) for k, v in sums.items()}

    def scalars(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
        return {k: float(first(v)) for k, v in metrics.items()}

    def to_save(self, state: PyTree) -> PyTree:
        return state  # global arrays: each process writes its shards

    def restore_target(self, abstract: PyTree) -> PyTree:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                            self.state_sharding)

    def params(self, trainable: PyTree) -> PyTree:
        """The whole trainable tree on the host of every process (gathered from the devices that hold it)."""
        if jax.process_count() == 1:
            return jax.device_get(trainable)
        return multihost_utils.process_allgather(trainable, tiled=True)


def _host(x) -> np.ndarray:
    """A host array of x (a numpy array, or a global jax array replicated on this process's devices)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return first(x)
    return np.asarray(x)


def _placed(x, sharding: NamedSharding) -> jax.Array:
    """x with `sharding`: a restored global array already has it; a host array is split onto the devices."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = _host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def local_groups(t) -> int:
    """This process's groups of rows in each batch (trainer settings `t`): its pmap devices, or its devices / tensor."""
    if t.parallelism == "fsdp":
        return jax.local_device_count() // t.tensor
    return t.devices or jax.local_device_count()


def check_tensor(model_cfg, tensor: int) -> None:
    """Tensor parallelism splits attention heads and MLP features: `tensor` must divide them."""
    from sftjax.errors import ConfigError

    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(model_cfg, name)
        if value % tensor:
            raise ConfigError(f"trainer.tensor={tensor}: must divide the model's {name}={value}")


def build_parallel(t, model_cfg, objective, optimizer, lr_schedule, abstract_state, frozen, refs):
    """The run's `DataParallel` or `Sharded` (trainer settings `t`, already validated)."""
    from sftjax.config import mesh_shape

    if t.parallelism == "data":
        engine = DataParallel(objective, optimizer, lr_schedule, local_groups(t))
        log.info("parallelism data: the pmap step over %d devices (%d processes), the whole state on each (%s)",
                 engine.groups * jax.process_count(), jax.process_count(),
                 _mib(per_device_bytes(abstract_state, None) + per_device_bytes(frozen, None)))
        return engine
    check_tensor(model_cfg, t.tensor)
    data, fsdp, tensor = mesh_shape(t, jax.device_count())
    engine = Sharded(objective, optimizer, lr_schedule, sharded.make_mesh(data, fsdp, tensor), abstract_state, frozen,
                     refs)
    held = per_device_bytes(abstract_state, engine.state_sharding) + per_device_bytes(frozen, engine.frozen_sharding)
    log.info("parallelism fsdp: mesh data %d x fsdp %d x tensor %d over %d devices (%d processes); state and frozen "
             "base per device %s", data, fsdp, tensor, jax.device_count(), jax.process_count(), _mib(held))
    return engine


def per_device_bytes(tree: PyTree, shardings: PyTree | None) -> int:
    """Bytes of `tree` one device holds: all of it (shardings None), or its largest shard of each array."""
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)
    return sum(int(np.prod(s.shard_shape(np.shape(x)))) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, jax.tree.leaves(shardings)))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
