"""Test-wide settings.

- Four host CPU devices (set before JAX is imported, inherited by subprocesses), so pmap code runs multi-device
  on a one-CPU machine. Single-device code is unaffected: it runs on device 0.
- pytest-xdist runs the suite in several worker processes (pyproject.toml): on a GPU, JAX would have each of
  them reserve 75% of its memory at start, so here a process takes what it uses (unless the variable is set).
- The longest modules go first (`SLOW_FIRST`): pytest-xdist's loadscope keeps a module on one worker and hands
  modules out in collection order (`--no-loadscope-reorder` in pyproject.toml; by default it would order them by
  their number of tests, which sent the few-test, minutes-long modules last and left one worker running them alone).
- Parity tests compare float32 results with transformers (torch). XLA on CPU may run float32 matmuls at reduced
  precision by default, so every test forces the highest matmul precision: differences then come from
  summation order alone, and the stated tolerances hold.
- Compiled programs are kept between runs (jax's persistent compilation cache, as `sftjax-train` keeps its own:
  `trainer.compile_cache`) in $SFTJAX_TEST_XLA_CACHE, by default `xla-tests` beside the real model's cache
  ($SFTJAX_CACHE, else ~/.cache/sftjax); "" turns it off. Most tests run tiny models, whose time is mostly XLA
  compiling them: a second run of a module takes a fraction of the first (tests/model/test_compact.py: 70 s ->
  16 s). The sftjax-train runs the tests start use the product's cache, `trainer.compile_cache`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from sftjax.train.compile_cache import use_compile_cache  # noqa: E402
from tests.real_model import cache_root  # noqa: E402

use_compile_cache(os.environ.get("SFTJAX_TEST_XLA_CACHE", str(cache_root() / "xla-tests")))


# Modules that take a minute or more on one worker (the slowest tests of fresh-clone runs on the Zen 4 host,
# 2026-12-07: 20.5 minutes with an empty compilation cache, 13.8 with it filled), roughly longest first.
SLOW_FIRST = ("tests/test_bench.py", "tests/job/test_main_job.py", "tests/train/test_parallel.py",
              "tests/train/test_multihost.py", "tests/train/test_train_cli.py", "tests/train/test_step.py",
              "tests/objectives/test_rl_train.py", "tests/objectives/test_preference_train.py",
              "tests/train/test_lora_train.py", "tests/objectives/test_heads.py", "tests/test_real_model.py",
              "tests/test_bench_dpo.py", "tests/test_bench_grpo.py", "tests/test_memory_sim.py")


def pytest_collection_modifyitems(items):
    """Run the SLOW_FIRST modules first, in that order; the rest keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))
