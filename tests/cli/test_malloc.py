"""sftjax/cli/malloc.py: when the malloc settings apply, and that they stop the map-fault-unmap cycle of big blocks.

Each check that applies them runs in a fresh interpreter: mallopt changes the whole process, and the test process
keeps its own allocator as it is.
"""

import subprocess
import sys

import pytest

from sftjax.cli.malloc import jax_runs_on_cpu, keep_freed_host_memory

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): without the settings each one is a fresh mapping
PAGES = BLOCK // 4096
ROUNDS = 20

# Allocate, fill (bytes repetition writes every page) and free the same big block ROUNDS times; print the minor
# page faults of the loop.
_FAULTS = f"""
import resource, sys
from sftjax.cli.malloc import keep_freed_host_memory
applied = keep_freed_host_memory({{"JAX_PLATFORMS": "cpu", "SFTJAX_MALLOC": sys.argv[1]}})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({ROUNDS}):
    block = b"\\x01" * {BLOCK}
    del block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, setting], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_blocks_are_reused_not_mapped_afresh():
    applied, faults = _faults("")
    assert applied
    assert faults < 3 * PAGES, faults  # the block's pages are touched once, then reused
    applied, faults = _faults("system")
    assert not applied
    assert faults > (ROUNDS // 2) * PAGES, faults  # glibc's default: every round faults on a fresh mapping


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu,cpu", False),
                                            (" cpu ", True)])
def test_jax_platforms_decides(platforms, cpu):
    assert jax_runs_on_cpu({"JAX_PLATFORMS": platforms}) is cpu


def test_without_jax_platforms_an_accelerator_plugin_decides(monkeypatch):
    import sftjax.cli.malloc as malloc

    monkeypatch.setattr(malloc.importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(malloc.importlib.util, "find_spec", lambda name: None)
    assert jax_runs_on_cpu({})  # nothing but jaxlib's CPU backend installed
    monkeypatch.setattr(malloc.importlib.util, "find_spec", lambda name: object() if name == "jax_plugins" else None)
    assert not jax_runs_on_cpu({})  # a namespace plugin (jax_plugins.xla_cuda12, ...)
    monkeypatch.setattr(malloc.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(malloc.importlib.metadata, "entry_points", lambda group: ["xla_cuda12"])
    assert not jax_runs_on_cpu({})  # a plugin registered by entry point


def test_not_applied_for_an_accelerator_or_when_opted_out():
    assert not keep_freed_host_memory({"JAX_PLATFORMS": "cuda"})  # returns before touching the allocator
    assert not keep_freed_host_memory({"JAX_PLATFORMS": "cpu", "SFTJAX_MALLOC": "system"})
