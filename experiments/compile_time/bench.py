"""Compile time of jit(grad(forward)) on tiny-llama at depth 4 / 16 / 32, with and without scan over layers.

    python experiments/compile_time/bench.py
"""
import time, jax, jax.numpy as jnp, sftjax
def t(L, scan):
    cfg = sftjax.PRESETS["tiny-llama"].replace(num_layers=L, scan_layers=scan)
    params = sftjax.param_shapes(cfg)
    f = jax.jit(jax.grad(lambda p, x: sftjax.forward(cfg, p, x).astype(jnp.float32).mean()))
    s = time.perf_counter(); f.lower(params, jax.ShapeDtypeStruct((2, 64), jnp.int32)).compile(); return time.perf_counter() - s
for L in (4, 16, 32):
    print(L, "scan %.1fs" % t(L, True), "unrolled %.1fs" % t(L, False), flush=True)
