"""trainer.cpu_devices: the CPU devices jax exposes, set by sftjax-train before JAX starts (it wins over XLA_FLAGS'
count, which tests/conftest.py sets to 4 for every process the tests start)."""

import subprocess
import sys

from tests.train.conftest import run_train

CODE = """
import logging, sys, jax
from sftjax.train.cpu_devices import use_cpu_devices
logging.basicConfig(level=logging.WARNING, format="%(message)s")
if sys.argv[2] == "started":
    jax.devices()
use_cpu_devices(int(sys.argv[1]))
print(len(jax.devices("cpu")))
"""


def devices(count: int, started: bool = False) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", CODE, str(count), "started" if started else "fresh"],
                          capture_output=True, text=True, check=True, timeout=120)
    return int(done.stdout.strip()), done.stderr


def test_the_setting_wins_over_xla_flags_and_zero_leaves_them():
    assert devices(3) == (3, "")
    assert devices(0) == (4, "")  # XLA_FLAGS' --xla_force_host_platform_device_count=4 (tests/conftest.py)


def test_after_jax_started_it_warns_and_the_run_keeps_its_devices():
    count, err = devices(2, started=True)
    assert count == 4
    assert err.strip() == ("trainer.cpu_devices=2 not applied: JAX already started in this process with 4 CPU "
                           "devices (set it before JAX's first operation, as sftjax-train does)")
    assert devices(4, started=True) == (4, "")  # already the count asked for: no warning


def test_sftjax_train_runs_its_pmap_step_over_the_set_devices(workspace, tmp_path):
    done = run_train(f"model={workspace['model']}", f"data={workspace['train']}", "data.seq_len=64",
                     "trainer.batch_size=4", "trainer.progress=false", "trainer.cpu_devices=2", "trainer.max_steps=2",
                     "trainer.num_samples=0", f"trainer.run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert "the pmap step over 2 devices (1 processes)" in done.stdout + done.stderr
