"""Huge pages for XLA:CPU's per-step buffers on glibc (Linux): the entry points re-run themselves with a tunable.

XLA:CPU allocates every step's buffers (activations, gradients, temp) with malloc and frees them at the end of the
step. glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mapping and hands it back with
munmap, so every step faults on each 4 KiB page of them again: tens to hundreds of thousands of minor faults per
step.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1   glibc asks the kernel to back its mappings with transparent huge
                                            pages (2 MiB): a 20th of the faults, and freed memory still goes back

Huge pages take a 20th of the faults at the same resident memory; faster steps and a faster main job (measured:
experiments/bench/README.md, "Host memory"). The earlier settings (mallopt: no mmap, no trim, one arena) kept freed
memory in the heap instead: as fast, but resident memory grew past the step's need: when small blocks landed in the
space a step's large buffer had freed, the next step's buffer no longer fit and the heap grew by its size.

A tunable is read when the process starts, so `use_huge_pages` re-executes the process (same interpreter, same
arguments, same pid) with it added to the environment, once: the re-run sees it set and goes on. It does so only
where it helps: Linux with glibc >= 2.35 (the tunable's first release), transparent huge pages not `never`, and
JAX on the CPU (with an accelerator the big buffers live on the device). `SFTJAX_MALLOC=system` turns it off.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
TUNABLE_KEY = TUNABLE.split("=")[0]
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"  # e.g. "always [madvise] never"


def jax_runs_on_cpu(environ: Mapping[str, str] = os.environ) -> bool:
    """True when JAX will pick the CPU: JAX_PLATFORMS starts with cpu, or no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return False
    return importlib.util.find_spec("jax_plugins") is None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the process's glibc, or None for another C library or OS."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError, IndexError):  # no confstr (not POSIX) or no such name
        return None


def huge_pages_possible(thp_enabled: str = THP_ENABLED) -> bool:
    """False when the kernel has no transparent huge pages or they are turned off (`[never]`)."""
    try:
        with open(thp_enabled) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_env(environ: Mapping[str, str] = os.environ, glibc: tuple[int, int] | None = None,
                   thp_enabled: str = THP_ENABLED) -> dict[str, str] | None:
    """The environment to re-run the process with, or None where the tunable is set already (by the re-run, or by
    the user to any value) or would not help."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("SFTJAX_MALLOC", "") == "system" or any(t.split("=")[0] == TUNABLE_KEY for t in tunables.split(":")):
        return None
    glibc = glibc or glibc_version()
    if glibc is None or glibc < (2, 35) or not huge_pages_possible(thp_enabled) or not jax_runs_on_cpu(environ):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def use_huge_pages() -> None:
    """Re-execute this process with TUNABLE when `huge_pages_env` says so; otherwise return.

    Call it first thing in an entry point, before anything heavy is imported (the re-run imports it again).
    """
    env = huge_pages_env()
    if env is None or not sys.executable or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # the interpreter cannot be run again (removed, no permission): go on as it is
        return
