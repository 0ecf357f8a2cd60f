"""sftjax-train end to end in subprocesses: smoke run, exact resume after SIGKILL, early stopping, divergence,
bad configuration, and sweeps (grid and Optuna)."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import yaml

import sftjax
from sftjax.config import OptimSection
from sftjax.train.checkpoint import Checkpointer
from sftjax.train.optim import make_optimizer
from sftjax.train.state import init_state
from tests.model import hf_models
from tests.train.conftest import run_train, train_command

BASE = ("data.seq_len=64", "trainer.devices=1", "trainer.batch_size=4", "trainer.progress=false")


def _common(ws, *extra):
    return (f"model={ws['model']}", f"data={ws['train']}", *BASE, *extra)


def _train_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("time", "tokens_per_s")} for line in lines]


def test_smoke_run_writes_everything(workspace, tmp_path):
    run = tmp_path / "run"
    done = run_train(*_common(workspace, "trainer=smoke", f"data.eval=[{{path:'{workspace['eval']}'}}]",
                              f"trainer.run_dir={run}"), cwd=tmp_path)
    assert "sftjax-train: done: step=4" in done.stdout
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 4 and final["metric"] == final["eval/loss"] and np.isfinite(final["eval/loss"])
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    lines = _train_lines(run)
    assert [line["step"] for line in lines if line["split"] == "train"] == [1, 2, 3, 4]
    # per-task metrics carry the training task's name in evaluation too (data.eval[i] is task i)
    assert {"loss", "ppl", "accuracy", "arith/loss"} <= set(next(x for x in lines if x["split"] == "eval"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    sample = json.loads(json.loads((run / "samples.jsonl").read_text().splitlines()[0])["text"])
    assert sample["prompt"].endswith("<|im_start|>assistant\n") and "reference" in sample
    assert json.loads((run / "config.json").read_text())["trainer"]["max_steps"] == 4


def _restore_final(run_dir, ws, max_steps):
    cfg, params = sftjax.load_pretrained(ws["model"])
    example = init_state(params, make_optimizer(OptimSection(), max_steps), 0)
    abstract = jax.eval_shape(lambda: example)
    with Checkpointer(run_dir / "checkpoints", keep_last=1) as ckpt:
        assert ckpt.latest_step() == max_steps
        return ckpt.restore(abstract)


def _committed(run_dir):
    directory = run_dir / "checkpoints"
    return [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []


def _kill_when(process, run_dir, step, checkpoint):
    """SIGKILL `process` once a checkpoint >= `checkpoint` is committed and metrics.jsonl shows step >= `step`."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if max(_committed(run_dir), default=0) >= checkpoint and metrics.exists() and any(
                json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.strip()):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_resume_after_sigkill_is_bitwise_exact(workspace, tmp_path):
    # Dropout on, so the per-step randomness must survive the restarts too; evaluation in between.
    args = _common(workspace, "trainer.max_steps=30", "trainer.save_every=3", "trainer.log_every=1",
                   "trainer.eval_every=10", "data.eval_fraction=0.1", "trainer.num_samples=1",
                   "trainer.sample_tokens=4", "model.dropout=0.1", "trainer.keep_last=2")
    run_train(*args, f"trainer.run_dir={tmp_path / 'a'}", cwd=tmp_path)

    b = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for kill_at, checkpoint in ((5, 3), (17, 12)):  # killed twice: mid-run, then after an evaluation
        process = subprocess.Popen(train_command(*args, f"trainer.run_dir={b}"), cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(process, b, kill_at, checkpoint)
    resumed = run_train(*args, f"trainer.run_dir={b}", cwd=tmp_path)
    log = resumed.stdout + resumed.stderr  # Hydra's log handler writes to stdout
    assert "resuming" in log  # it did resume, not restart
    assert int(log.split("from step ")[1].split()[0]) >= 12

    state_a, extras_a = _restore_final(tmp_path / "a", workspace, 30)
    state_b, extras_b = _restore_final(b, workspace, 30)
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert extras_a["data_state"] == extras_b["data_state"]
    # The metrics history of the resumed run is the uninterrupted one, without duplicates.
    assert _train_lines(tmp_path / "a") == _train_lines(b)


def test_resume_on_a_different_base_is_refused(workspace, tmp_path):
    """Same architecture, other weights (seed): the checkpoint's adapters / optimizer state do not belong to it."""
    other_base = tmp_path / "other"
    shutil.copytree(workspace["model"], other_base)
    model = hf_models.load_hf(other_base)
    hf_models.randomize_(model, seed=99)
    model.save_pretrained(other_base)
    run = tmp_path / "run"
    run_train(*_common(workspace, "trainer.max_steps=2", f"trainer.run_dir={run}"), cwd=tmp_path)
    args = [a if not a.startswith("model=") else f"model={other_base}" for a in _common(workspace)]
    other = run_train(*args, "trainer.max_steps=4", f"trainer.run_dir={run}", cwd=tmp_path, check=False)
    assert other.returncode == 2
    assert "refusing to resume on a different base" in other.stderr.strip().splitlines()[-1]


def test_early_stopping(workspace, tmp_path):
    run = tmp_path / "run"
    done = run_train(*_common(workspace, "trainer.max_steps=50", "trainer.eval_every=1", "trainer.patience=2",
                              "trainer.min_delta=100", "data.eval_fraction=0.1", "trainer.num_samples=0",
                              f"trainer.run_dir={run}"), cwd=tmp_path)
    # The first evaluation sets the best; the next two do not improve it by min_delta: stop after step 3.
    assert "early stopping at step 3" in done.stderr + done.stdout
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3
    assert Checkpointer(run / "checkpoints", keep_last=1).latest_step() == 3


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(workspace, tmp_path):
    run = tmp_path / "run"
    done = run_train(*_common(workspace, "optim=sgd", "optim.lr=1e30", "optim.max_grad_norm=0",
                              "trainer.max_steps=20", "trainer.save_every=1", "trainer.log_every=1",
                              f"trainer.run_dir={run}"), cwd=tmp_path, check=False)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("sftjax-train: error: non-finite loss or gradient at step ")
    bad_step = int(error.split("at step ")[1].split()[0])
    ckpt = Checkpointer(run / "checkpoints", keep_last=1)
    assert ckpt.latest_step() == bad_step - 1
    cfg, params = sftjax.load_pretrained(workspace["model"])
    example = init_state(params, make_optimizer(OptimSection(name="sgd", max_grad_norm=0.0), 20), 0)
    abstract = jax.eval_shape(lambda: example)
    state, _ = ckpt.restore(abstract)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["trainable"]))


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "sftjax-train: error: optim.lr=0.0: must be > 0"),
    ("trainer.batch_size=3", "sftjax-train: error: trainer.batch_size=3: must be divisible by the 2 devices"),
    ("trainer.max_steps=0", "sftjax-train: error: trainer.max_steps=0: must be >= 1"),
    ("data.eval_fraction=0.999", "sftjax-train: error: data.eval_fraction=0.999: holding out"),
])
def test_impossible_values_fail_at_start_with_one_line(workspace, tmp_path, override, message):
    done = run_train(*_common(workspace, override, "trainer.devices=2", f"trainer.run_dir={tmp_path / 'r'}"),
                     cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


@pytest.mark.parametrize("override,message", [
    ("trainer.max_stepz=3", "Could not override 'trainer.max_stepz'."),
    ("trainer.max_steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ("optim=rmsprop", "Could not find 'optim/rmsprop'"),
])
def test_unknown_keys_and_wrong_types_fail_at_start(workspace, tmp_path, override, message):
    done = run_train(*_common(workspace, override), cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("sftjax-train: error: ") and message in line


def test_grid_multirun(workspace, tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", *_common(workspace, "trainer.max_steps=2", "optim.lr=1e-3,1e-2", "trainer.num_samples=0",
                             f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    finals = [json.loads((sweep / str(i) / "final_metrics.json").read_text()) for i in range(2)]
    assert all(f["step"] == 2 for f in finals) and finals[0]["train/lr"] != finals[1]["train/lr"]


def test_optuna_sweep_with_the_provided_config(workspace, tmp_path):
    sweep = tmp_path / "optuna"
    run_train("-m", *_common(workspace, "experiment=optuna_lr", "hydra.sweeper.n_trials=3",
                             "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_steps=16",
                             "trainer.eval_every=0", "trainer.num_samples=0", f"hydra.sweep.dir={sweep}"),
              cwd=tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads((sweep / str(i) / "final_metrics.json").read_text())["eval/loss"] for i in range(3)]
    assert results["best_value"] == pytest.approx(min(values))
    assert 1e-5 <= results["best_params"]["optim.lr"] <= 1e-2
