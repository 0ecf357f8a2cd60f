"""The train state and its placement on devices.

    state = {"step": int32 [], "trainable": params, "opt_state": optax state, "rng": uint32 [2] (raw key data)}

Only `trainable` is differentiated and has optimizer state. The `frozen` tree (the base under LoRA; empty for full
fine-tuning) is passed to the step separately, never donated, never checkpointed (it is reloaded from the model
directory, and its fingerprint is checked on resume). `merge_params(frozen, trainable)` is the full tree the
model sees.

For the pmap step every array gets a leading device axis: `replicate` copies host values to each device (as a
sharded array, so no copy stays on the host), `unreplicate` takes device 0's copy back.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


def merge_params(frozen: PyTree, trainable: PyTree) -> PyTree:
    """Deep-merge two dict trees with disjoint leaves (trainable wins where both have a subtree)."""
    if not isinstance(frozen, dict) or not frozen:
        return trainable
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = merge_params(frozen[key], value) if key in frozen and isinstance(value, dict) else value
    return out


def init_state(trainable: PyTree, optimizer: optax.GradientTransformation, seed: int) -> PyTree:
    return {
        "step": np.zeros((), np.int32),
        "trainable": trainable,
        "opt_state": optimizer.init(trainable),
        "rng": jax.random.key_data(jax.random.key(seed)),  # traceable: jax.eval_shape(init_state) works
    }


def device_mesh(devices: int) -> Mesh:
    return Mesh(np.asarray(jax.local_devices()[:devices]), ("data",))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host or device tree -> the same values with a leading device axis, one copy per device."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    n = mesh.devices.size
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding),
                        tree)


def unreplicate(tree: PyTree) -> PyTree:
    """Device 0's copy of a replicated tree, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x[0]), tree)
