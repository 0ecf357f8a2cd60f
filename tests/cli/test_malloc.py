"""sftjax/cli/malloc.py: when the entry points re-run themselves with the huge-page tunable, that they do so once,
and that the tunable stops the 4 KiB page faults on every fresh mapping of a big block.

Each check that re-runs runs in a fresh interpreter: the test process keeps its own allocator as it is.
"""

import platform
import subprocess
import sys

import pytest

from sftjax.cli.malloc import TUNABLE, glibc_version, huge_pages_env, huge_pages_possible, jax_runs_on_cpu

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): each one is a fresh mapping, faulted in anew
PAGES = BLOCK // 4096
ROUNDS = 20

# Print a line, maybe re-run (then the line shows twice), then allocate, fill (bytes repetition writes every page)
# and free the same big block ROUNDS times; print the tunables and the minor page faults of the loop.
_SCRIPT = f"""
import os, resource
print("started", flush=True)
from sftjax.cli.malloc import use_huge_pages
use_huge_pages()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({ROUNDS}):
    block = b"\\x01" * {BLOCK}
    del block
print(os.environ.get("GLIBC_TUNABLES", "-"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

needs_huge_pages = pytest.mark.skipif(
    not sys.platform.startswith("linux") or (glibc_version() or (0, 0)) < (2, 35) or not huge_pages_possible(),
    reason="needs glibc >= 2.35 and transparent huge pages (the tunable does nothing elsewhere)")


def _run(setting: str) -> tuple[list[str], str, int]:
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "SFTJAX_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, env=env)
    *starts, last = out.stdout.splitlines()
    tunables, faults = last.split()
    return starts, tunables, int(faults)


@needs_huge_pages
def test_the_entry_point_re_runs_once_with_the_tunable_and_faults_far_less():
    starts, tunables, faults = _run("")
    assert starts == ["started", "started"]  # re-run once, then the tunable is seen and it goes on
    assert tunables == TUNABLE
    assert faults < ROUNDS * PAGES // 8, faults  # mostly 2 MiB pages (measured: 10,880 in all, vs 327,700)
    starts, tunables, faults = _run("system")
    assert starts == ["started"] and tunables == "-"
    assert faults > (ROUNDS // 2) * PAGES, faults  # glibc's default: every round faults on each 4 KiB page


def _env(tmp_path, mode="always [madvise] never", **environ):
    thp = tmp_path / "enabled"
    thp.write_text(mode + "\n")
    return huge_pages_env({"JAX_PLATFORMS": "cpu", **environ}, glibc=(2, 36), thp_enabled=str(thp))


def test_huge_pages_env_adds_the_tunable_to_any_already_set(tmp_path):
    assert _env(tmp_path)["GLIBC_TUNABLES"] == TUNABLE
    assert _env(tmp_path, "[always] madvise never")["GLIBC_TUNABLES"] == TUNABLE
    added = _env(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2", OTHER="kept")
    assert added["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}" and added["OTHER"] == "kept"


def test_huge_pages_env_is_none_where_it_would_not_help_or_is_set(tmp_path):
    assert _env(tmp_path, GLIBC_TUNABLES=TUNABLE) is None  # the re-run: no second one
    assert _env(tmp_path, GLIBC_TUNABLES=f"glibc.malloc.arena_max=2:{TUNABLE}") is None
    assert _env(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0") is None  # the user's own choice stands
    assert _env(tmp_path, SFTJAX_MALLOC="system") is None  # opted out
    assert _env(tmp_path, "always madvise [never]") is None  # huge pages turned off
    assert _env(tmp_path, JAX_PLATFORMS="cuda") is None  # the big buffers live on the device
    thp = tmp_path / "enabled"
    assert huge_pages_env({"JAX_PLATFORMS": "cpu"}, glibc=(2, 34), thp_enabled=str(thp)) is None  # no tunable yet
    assert huge_pages_env({"JAX_PLATFORMS": "cpu"}, glibc=(2, 36), thp_enabled=str(tmp_path / "none")) is None


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


def test_glibc_version_reads_this_process_library():
    name, version = platform.libc_ver()
    expected = tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None
    assert glibc_version() == expected


def test_a_failed_re_run_goes_on_as_it_is(monkeypatch):
    import sftjax.cli.malloc as malloc

    calls = []

    def execve(*args):
        calls.append(args)
        raise PermissionError("no")

    monkeypatch.setattr(malloc, "huge_pages_env", lambda: {"GLIBC_TUNABLES": TUNABLE})
    monkeypatch.setattr(malloc.os, "execve", execve)
    malloc.use_huge_pages()  # returns instead of raising
    assert calls and calls[0][2] == {"GLIBC_TUNABLES": TUNABLE} and calls[0][0] == sys.executable
