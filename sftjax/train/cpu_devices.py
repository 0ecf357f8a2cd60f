"""How many CPU devices jax exposes in this process (`trainer.cpu_devices`), set before JAX starts.

On CPU, XLA runs one device's program with its ops split over the cores (an intra-op thread pool). For a small
model every op is small, and splitting each of them, with a thread wake-up per piece, costs a share of the step.
With `trainer.cpu_devices=2` the process has two CPU devices and the pmap step (`trainer.parallelism=data`) runs
each half of the batch as its own program, side by side: the main job's step on a 2-core host gets faster
(experiments/main_recipe/README.md). The sums are then added across the devices, so the numbers are those of a
2-device run, rounded differently from a 1-device one; a fixed setting keeps them the same on every host.

0 leaves jax's own choice: `--xla_force_host_platform_device_count` in XLA_FLAGS, else one CPU device. A count set
here wins over XLA_FLAGS. It touches only the CPU backend: on a GPU or TPU host the step runs there as before.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("sftjax")


def use_cpu_devices(count: int) -> None:
    """Expose `count` CPU devices (jax's `jax_num_cpu_devices`); 0 leaves jax's default. Call it before JAX's first
    operation (sftjax-train does); when the backend already runs (a library caller that used JAX before), the
    setting cannot change and a warning says so: the run goes on with the devices it has."""
    if count <= 0 or jax.config.jax_num_cpu_devices == count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        started = len(jax.devices("cpu"))
        if started != count:  # started with that count already (e.g. from XLA_FLAGS): nothing to say
            log.warning("trainer.cpu_devices=%d not applied: JAX already started in this process with %d CPU devices "
                        "(set it before JAX's first operation, as sftjax-train does)", count, started)
