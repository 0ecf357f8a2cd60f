"""Test-wide settings.

- Four host CPU devices (set before JAX is imported, inherited by subprocesses), so pmap code runs multi-device
  on a one-CPU machine. Single-device code is unaffected: it runs on device 0.
- pytest-xdist runs the suite in several worker processes (pyproject.toml): on a GPU, JAX would have each of
  them reserve 75% of its memory at start, so here a process takes what it uses (unless the variable is set).
- Parity tests compare float32 results with transformers (torch). XLA on CPU may run float32 matmuls at reduced
  precision by default, so every test forces the highest matmul precision: differences then come from
  summation order alone, and the stated tolerances hold.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
