"""Compile time of jit(grad(forward)) on tiny-llama at depth 4 / 16 / 32, with and without scan over layers.

    python experiments/compile_time/bench.py
"""

import time

import jax
import jax.numpy as jnp

import sftjax


def compile_seconds(layers: int, scan: bool) -> float:
    """Seconds to lower and compile the gradient of a mean logit for a [2, 64] token batch."""
    cfg = sftjax.PRESETS["tiny-llama"].replace(num_layers=layers, scan_layers=scan)
    params = sftjax.param_shapes(cfg)
    grad = jax.jit(jax.grad(lambda p, x: sftjax.forward(cfg, p, x).astype(jnp.float32).mean()))
    start = time.perf_counter()
    grad.lower(params, jax.ShapeDtypeStruct((2, 64), jnp.int32)).compile()
    return time.perf_counter() - start


if __name__ == "__main__":
    for depth in (4, 16, 32):
        print(depth, f"scan {compile_seconds(depth, True):.1f}s", f"unrolled {compile_seconds(depth, False):.1f}s",
              flush=True)
