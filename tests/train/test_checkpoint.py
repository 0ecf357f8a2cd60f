"""Checkpointer: bitwise restore, last-k + best-k retention, async saves, uncommitted saves, errors; fingerprints."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity

from sftjax.errors import CheckpointError, ConfigError
from sftjax.train.checkpoint import Checkpointer, check_base, fingerprint

_TMP = ".orbax-checkpoint-tmp"  # orbax-checkpoint's suffix for a step directory still being written


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "layer_0": {
            "attn": {"wq": jax.random.normal(k1, (4, 8), jnp.float32)},
            "norm": {"scale": jax.random.normal(k2, (8,), jnp.bfloat16)},
        },
        "head": {"kernel": jax.random.normal(k3, (8, 3), jnp.float32), "bias": jnp.zeros((3,), jnp.float32)},
    }


def _state(seed=0):
    """A train state like the loop's: params, an optax state after one update (namedtuples, counts, masked
    placeholders), the step and raw RNG key data."""
    params = _params(seed)
    decay_mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("wq", "kernel"), params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=decay_mask))
    opt_state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.cos(p.astype(jnp.float32) * 7).astype(p.dtype), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "step": jnp.asarray(1, jnp.int32),
        "trainable": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(jax.random.PRNGKey(seed + 100)),
    }


def _extras(metrics=None):
    return {
        "data_state": {"epoch": 0, "position": 17},
        "config": {"optim": {"lr": 1e-3}},
        "base_fingerprint": "sha256:" + "0" * 64,
        "metrics": metrics or {},
    }


def _assert_bitwise_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.dtype, g.shape) == (w.dtype, w.shape), jax.tree_util.keystr(path)
        assert g.tobytes() == w.tobytes(), jax.tree_util.keystr(path)


def _step_dirs(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_restore_is_bitwise_exact_into_the_callers_structure(tmp_path):
    state = _state()
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(state))
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        ckpt.save(1, state, _extras({"eval/loss": 2.0}))
    with Checkpointer(tmp_path, keep_last=2) as ckpt:  # a new process would do this
        assert ckpt.latest_step() == 1
        restored, extras = ckpt.restore(jax.eval_shape(lambda: state))
        _assert_bitwise_equal(restored, state)
        # The optax namedtuples come back as namedtuples, so the optimizer accepts the state.
        assert type(restored["opt_state"][1][0]).__name__ == "ScaleByAdamState"
        # A concrete example tree works as the target too.
        again, _ = ckpt.restore(_state(seed=5), step=1)
        _assert_bitwise_equal(again, state)
    assert extras.pop("checkpoint") == {"directory": str(tmp_path), "step": 1}
    assert extras == _extras({"eval/loss": 2.0})


def test_restore_refuses_a_state_of_another_shape_or_dtype(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.save(3, state, _extras())
        wrong_dtype = jax.eval_shape(lambda: state)
        wrong_dtype["trainable"]["layer_0"]["norm"]["scale"] = jax.ShapeDtypeStruct((8,), jnp.float32)
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(wrong_dtype)
        assert str(err.value) == (
            f"{tmp_path}/3: trainable/layer_0/norm/scale was saved as (8,) bfloat16, this run expects (8,) float32"
        )
        missing = jax.eval_shape(lambda: state)
        missing["trainable"]["lora"] = {"a": jax.ShapeDtypeStruct((8, 2), jnp.float32)}
        with pytest.raises(CheckpointError, match=r"1 leaves missing \(first: trainable/lora/a\)"):
            ckpt.restore(missing)


@pytest.mark.parametrize("mode, values", [("min", [5, 1, 4, 3, 6, 7]), ("max", [5, 9, 6, 7, 4, 3])])
def test_retention_keeps_the_last_k_and_the_best_k(tmp_path, mode, values):
    state = _state()
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric="eval/loss", best_mode=mode) as ckpt:
        for step, value in enumerate(values, start=1):
            ckpt.save(step, state, _extras({"eval/loss": value}))
        ckpt.wait()
        # Step 2 is the best; 5 and 6 are the last two. Every other step is neither and is gone.
        assert ckpt.steps() == _step_dirs(tmp_path) == [2, 5, 6]
        assert ckpt.best_step() == 2
    # A resumed run keeps ranking against the checkpoints already on disk.
    worse = 100 if mode == "min" else -100
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric="eval/loss", best_mode=mode) as ckpt:
        assert ckpt.best_step() == 2
        ckpt.save(7, state, _extras({"eval/loss": worse}))
        ckpt.wait()
        assert _step_dirs(tmp_path) == [2, 6, 7]


def test_unranked_checkpoints_only_compete_for_the_latest_slots(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, keep_last=2, keep_best=1, best_metric="eval/loss") as ckpt:
        ckpt.save(1, state, _extras({"eval/loss": float("nan")}))  # a diverged eval is never the best
        ckpt.save(2, state, _extras({"eval/loss": 3.0}))
        ckpt.save(3, state, _extras())  # no eval at this step
        ckpt.save(4, state, _extras(), metrics={"eval/loss": 9.0})  # explicit metrics win over extras
        ckpt.save(5, state, _extras({"other": 1.0}))
        ckpt.wait()
        assert _step_dirs(tmp_path) == [2, 4, 5]
        assert ckpt.best_step() == 2


def test_without_best_metric_only_the_last_k_remain(tmp_path):
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        for step in range(1, 7):
            ckpt.save(step * 10, _state(), _extras({"eval/loss": float(step)}))
        ckpt.wait()
        assert _step_dirs(tmp_path) == [40, 50, 60]
        assert ckpt.best_step() is None


def test_async_save_returns_before_commit_and_survives_donated_buffers(tmp_path, monkeypatch):
    """save() returns while the write is still uncommitted; the caller may then delete (donate) its buffers."""
    release = threading.Event()
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self):
        release.wait(timeout=30)
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
    state = _state()
    expected = jax.tree_util.tree_map(np.array, state)
    with Checkpointer(tmp_path, keep_last=1, save_async=True) as ckpt:
        ckpt.save(1, state, _extras())
        assert not (tmp_path / "1").exists() and (tmp_path / f"1{_TMP}").is_dir()
        for leaf in jax.tree_util.tree_leaves(state):
            leaf.delete()  # what pmap(donate_argnums=...) does to the state on the next step
        release.set()
        ckpt.wait()
        assert (tmp_path / "1").is_dir() and not (tmp_path / f"1{_TMP}").exists()
        restored, _ = ckpt.restore(jax.eval_shape(lambda: expected))
    _assert_bitwise_equal(restored, expected)


_KILLED_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from sftjax.train.checkpoint import Checkpointer

def state(step):
    return {{"step": jnp.asarray(step, jnp.int32), "w": jnp.full((64, 64), step, jnp.float32)}}

ckpt = Checkpointer(sys.argv[1], keep_last=5)
ckpt.save(1, state(1), {{"base_fingerprint": "x"}})
ckpt.wait()

async def killed(self):  # every array is written; the commit (rename) never happens
    os.kill(os.getpid(), signal.SIGKILL)

atomicity.AtomicRenameTemporaryPath.finalize = killed
ckpt.save({step}, state({step}), {{"base_fingerprint": "x"}})
ckpt.wait()
"""


def test_a_save_killed_before_commit_is_never_resumed_from(tmp_path):
    script = _KILLED_SAVE.format(step=2)
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / f"2{_TMP}").is_dir() and _step_dirs(tmp_path) == [1]
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    with Checkpointer(tmp_path, keep_last=5) as ckpt:
        assert ckpt.latest_step() == 1
        restored, _ = ckpt.restore(abstract)
        assert int(restored["step"]) == 1 and float(restored["w"][0, 0]) == 1.0
        ckpt.save(2, {"step": jnp.asarray(2, jnp.int32), "w": jnp.full((64, 64), 2.0)}, {"base_fingerprint": "x"})
        ckpt.wait()
        assert ckpt.latest_step() == 2 and int(ckpt.restore(abstract)[0]["step"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # the leftover was cleaned up


def test_hand_made_uncommitted_layouts_are_skipped(tmp_path):
    with Checkpointer(tmp_path, keep_last=5) as ckpt:
        ckpt.save(1, _state(), _extras())
    for name in (f"3{_TMP}", f"4{_TMP}-1700000000"):  # both layouts Orbax documents for unfinished saves
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "state" / "manifest.ocdbt").write_bytes(b"\0partial")
    with Checkpointer(tmp_path, keep_last=5) as ckpt:
        assert ckpt.latest_step() == 1
        ckpt.save(3, _state(seed=3), _extras())
        ckpt.wait()
        assert ckpt.steps() == [1, 3]
        _assert_bitwise_equal(ckpt.restore(_state())[0], _state(seed=3))


def test_empty_directory_has_no_latest_step(tmp_path):
    with Checkpointer(tmp_path / "new", keep_last=1) as ckpt:
        assert ckpt.latest_step() is None and ckpt.best_step() is None
        with pytest.raises(CheckpointError, match="no checkpoint to restore"):
            ckpt.restore(_state())


# Orbax does not cancel the sibling reads of a failed restore: their errors surface later as asyncio noise
# ("Event loop is closed", "coroutine ... was never awaited"), which is not what this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_foreign_or_corrupt_directories_fail_with_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        Checkpointer(tmp_path / "a_file", keep_last=1)

    foreign = tmp_path / "foreign"
    (foreign / "5").mkdir(parents=True)
    (foreign / "5" / "weights.bin").write_bytes(b"1234")
    with Checkpointer(foreign, keep_last=1) as ckpt:
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(_state())
    assert str(err.value) == f"{foreign}/5: not an sftjax checkpoint (no 'state' item)"

    corrupt = tmp_path / "corrupt"
    with Checkpointer(corrupt, keep_last=1) as ckpt:
        ckpt.save(1, _state(), _extras())
    for root, _, files in os.walk(corrupt / "1" / "state"):
        for name in files:
            if "ocdbt" in root or name == "manifest.ocdbt":
                os.truncate(os.path.join(root, name), 3)
    with Checkpointer(corrupt, keep_last=1) as ckpt:
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(_state())
    assert str(err.value).startswith(f"{corrupt}/1: cannot read checkpoint arrays (")
    assert "\n" not in str(err.value)
    time.sleep(0.5)  # let the abandoned reads finish inside this test
    gc.collect()


def test_an_existing_step_is_never_overwritten(tmp_path):
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        ckpt.save(1, _state(), _extras())
    with Checkpointer(tmp_path, keep_last=3) as ckpt:
        with pytest.raises(CheckpointError, match=r"/1: checkpoint step 1 already exists; refusing to overwrite it"):
            ckpt.save(1, _state(seed=9), _extras())
        _assert_bitwise_equal(ckpt.restore(_state())[0], _state())


def test_bad_options_and_extras_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(ConfigError, match="needs best_metric"):
        Checkpointer(tmp_path, keep_last=1, keep_best=1)
    with pytest.raises(ConfigError, match="best_mode"):
        Checkpointer(tmp_path, keep_last=1, best_metric="eval/loss", best_mode="lowest")
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.save(1, _state(), {"data_state": object()})
        with pytest.raises(TypeError, match="leaf step is a int, not an array"):
            ckpt.save(1, {"step": 1}, _extras())
        assert ckpt.latest_step() is None


def test_fingerprint_is_stable_and_sensitive():
    params = _params()
    fp = fingerprint(params)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert fingerprint(_params()) == fp
    assert fingerprint(jax.tree_util.tree_map(np.asarray, params)) == fp  # host or device arrays alike
    reordered = {"head": dict(reversed(list(params["head"].items()))), "layer_0": params["layer_0"]}
    assert list(reordered)[0] == "head" and list(reordered["head"]) == ["bias", "kernel"]
    assert fingerprint(reordered) == fp

    def changed(fn):
        p = jax.tree_util.tree_map(lambda x: x, params)
        fn(p)
        return fingerprint(p)

    one_element = np.asarray(params["head"]["kernel"]).copy()
    one_element[7, 2] = np.nextafter(one_element[7, 2], np.float32(np.inf))
    variants = {
        "one element": changed(lambda p: p["head"].__setitem__("kernel", one_element)),
        "dtype": changed(lambda p: p["head"].__setitem__("bias", jnp.zeros((3,), jnp.bfloat16))),
        "shape": changed(lambda p: p["head"].__setitem__("kernel", params["head"]["kernel"].reshape(3, 8))),
        "name": changed(lambda p: p.__setitem__("lm_head", p.pop("head"))),
        "extra leaf": changed(lambda p: p["head"].__setitem__("scale", jnp.ones(()))),
    }
    assert len(set(variants.values()) | {fp}) == len(variants) + 1, variants


def test_check_base_refuses_another_base(tmp_path):
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.save(7, _state(), _extras() | {"base_fingerprint": "sha256:aaa"})
        _, extras = ckpt.restore(_state())
    check_base(extras, "sha256:aaa")
    with pytest.raises(CheckpointError) as err:
        check_base(extras, "sha256:bbb")
    assert str(err.value) == (
        f"{tmp_path}: checkpoint step 7 was trained on base sha256:aaa, this run loads sha256:bbb; "
        "refusing to resume on a different base"
    )
    with pytest.raises(CheckpointError, match="records no base fingerprint"):
        check_base({k: v for k, v in extras.items() if k != "base_fingerprint"}, "sha256:aaa")


def test_read_only_checkpointer_leaves_a_save_in_progress_alone(tmp_path):
    """An evaluator opening a run's checkpoints must not delete the temporary directory of a running save."""
    directory = tmp_path / "ckpt"
    state = {"w": np.arange(4, dtype=np.float32)}
    with Checkpointer(directory, keep_last=2, save_async=False) as writer:
        writer.save(1, state, {"note": "first"})
    in_progress = directory / "2.orbax-checkpoint-tmp"
    (in_progress / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    with Checkpointer(directory, keep_last=2, read_only=True) as reader:
        assert reader.latest_step() == 1
        restored, extras = reader.restore(jax.eval_shape(lambda: state))
        np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
    assert in_progress.is_dir()
    assert not (tmp_path / "missing").exists()
    Checkpointer(tmp_path / "missing", keep_last=1, read_only=True).close()
    assert not (tmp_path / "missing").exists()  # read-only never creates
