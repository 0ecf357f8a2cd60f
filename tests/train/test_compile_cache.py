"""trainer.compile_cache: jax's persistent compilation cache, so a second process loads what the first compiled."""

import subprocess
import sys

CODE = """
import sys, jax, jax.numpy as jnp
from jax._src import monitoring
from sftjax.train.compile_cache import use_compile_cache
use_compile_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny program below compiles in ms
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
print(float(f(jnp.ones((8, 8))).sum()), len(hits))
"""


def run(directory):
    out = subprocess.run([sys.executable, "-c", CODE, str(directory)], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    return float(out[0]), int(out[1])


def test_a_second_process_loads_the_compiled_program(tmp_path):
    cache = tmp_path / "xla"
    first, first_hits = run(cache)
    assert first_hits == 0 and any(cache.iterdir())
    second, second_hits = run(cache)
    assert second == first and second_hits >= 1


def test_an_empty_setting_leaves_the_cache_off(tmp_path):
    code = ("import jax; from sftjax.train.compile_cache import use_compile_cache; use_compile_cache(''); "
            "print(jax.config.jax_compilation_cache_dir)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "None"
