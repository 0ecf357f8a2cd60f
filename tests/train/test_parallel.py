"""The sharded (FSDP) step against the pmap step on the 4 forced host devices of the test process: the same losses,
eval sums and weights for full fine-tuning, LoRA and QLoRA, with gradient accumulation and dropout, on every mesh
shape; how arrays are split; bad layouts refused with one line.

Tolerances (float32, matmul precision "highest"): losses 2e-6 absolute (~3e-7 relative: summation order only);
weights after 3 SGD steps (lr 0.1; they move by up to 1e-2) 2e-7 absolute. Under AdamW only the losses are
compared: Adam divides by sqrt(v), so a last-bit difference in a near-zero gradient can flip an update's sign and
move a weight by up to lr.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sftjax.config import OptimSection, TrainConfig, TrainerSection
from sftjax.train.optim import make_optimizer, schedule
from sftjax.train.parallel import build_parallel
from sftjax.train.setup import build_model, build_objective, run_trainable
from sftjax.train.sharded import leaf_spec, make_mesh
from sftjax.train.state import init_state
from tests.train.conftest import run_train

G, A, B, T = 4, 2, 2, 32  # groups (pmap devices), micro-batches, rows each, tokens


def _setup(method: str, dropout: float, optim: str):
    cfg = TrainConfig()
    lora = dataclasses.replace(cfg.method.lora, dropout=dropout)  # model and adapter dropout alike
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=method, lora=lora),
                              model=dataclasses.replace(cfg.model, dropout=dropout),
                              optim=dataclasses.replace(OptimSection(), name=optim, lr=0.1 if optim == "sgd" else 1e-2))
    model = build_model(cfg)
    objective = build_objective(cfg, model.cfg, (None,))
    trainable = run_trainable(model, objective, 0)
    optimizer = make_optimizer(cfg.optim, 10)
    return model, objective, trainable, optimizer, schedule(cfg.optim, 10)


def _batches(objective, n: int, groups: int = G):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, 500, (G, A, B, T)).astype(np.int32)
        segments = np.where(np.arange(T) < T - 4, 1, 0).astype(np.int32) * np.ones((G, A, B, 1), np.int32)
        batch = {"tokens": tokens, "targets": np.roll(tokens, -1, -1),
                 "loss_mask": ((rng.random((G, A, B, T)) > 0.3) & (segments > 0)).astype(np.float32),
                 "segment_ids": segments, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape),
                 "task_ids": np.where(segments > 0, 0, -1).astype(np.int32),
                 "class_ids": np.full(tokens.shape, -1, np.int32)}
        if groups != G:  # fewer groups of more rows: group g holds pmap devices g*k .. g*k+k-1's rows
            k = G // groups
            batch = {key: v.reshape(groups, k, A, B, T).swapaxes(1, 2).reshape(groups, A, k * B, T)
                     for key, v in batch.items()}
        out.append(objective.prepare(batch))
    return out


def _run(layout, model, objective, trainable, optimizer, lr_schedule, steps=3):
    parallelism, fsdp, tensor = layout
    t = dataclasses.replace(TrainerSection(), parallelism=parallelism, fsdp=fsdp, tensor=tensor)
    abstract = jax.eval_shape(lambda: init_state(trainable, optimizer, 0))
    engine = build_parallel(t, model.cfg, objective, optimizer, lr_schedule, abstract, model.frozen, {})
    state = engine.place_state(init_state(trainable, optimizer, 0))
    frozen = engine.place_frozen(model.frozen)
    batches = _batches(objective, steps, engine.groups)
    losses = []
    for batch in batches:
        state, metrics = engine.train(state, frozen, {}, batch)
        losses.append(engine.scalars(metrics)["loss"])
    eval_batch = {k: v[:, 0] for k, v in batches[0].items()}
    sums = engine.eval_sums(state["trainable"], frozen, {}, eval_batch)
    return engine, np.array(losses), engine.params(state["trainable"]), sums


def _close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("method,dropout,optim", [("full", 0.1, "sgd"), ("lora", 0.1, "adamw"), ("lora", 0.0, "sgd"),
                                                  ("qlora", 0.0, "sgd")])
def test_sharded_step_matches_the_pmap_step(method, dropout, optim):
    with jax.default_matmul_precision("highest"):
        setup = _setup(method, dropout, optim)
        _, losses, weights, sums = _run(("data", 0, 1), *setup)
        layouts = [("fsdp", 0, 1), ("fsdp", 2, 1)] + ([("fsdp", 2, 2)] if dropout == 0 else [])
        for layout in layouts:  # fsdp over all 4; data 2 x fsdp 2; fsdp 2 x tensor 2 (2 groups of 2 devices' rows)
            engine, other_losses, other_weights, other_sums = _run(layout, *setup)
            np.testing.assert_allclose(other_losses, losses, atol=2e-6, rtol=0, err_msg=str(layout))
            if optim == "sgd":
                _close(other_weights, weights, 2e-7)
            for key in sums:
                np.testing.assert_allclose(other_sums[key], sums[key], rtol=1e-6, atol=1e-6, err_msg=key)
    moved = [np.abs(np.asarray(w) - np.asarray(w0)).max() for w, w0 in zip(jax.tree.leaves(weights),
                                                                           jax.tree.leaves(setup[2]))]
    assert max(moved) > 1e-3  # the weights moved: the comparison is not of untouched weights
    split = [leaf.sharding.spec for leaf in jax.tree.leaves(engine.place_frozen(setup[0].frozen))
             if leaf.size >= 4096]
    assert split and all("fsdp" in spec for spec in split) or method == "full"  # the frozen base (4-bit too) split


def test_leaf_spec_splits_the_largest_axis_never_the_layer_axis():
    assert leaf_spec(("layers", "mlp", "up_proj", "kernel"), (32, 4096, 14336), 8, 1) == P(None, None, "fsdp")
    assert leaf_spec(("embed_tokens", "embedding"), (128256, 4096), 8, 1) == P("fsdp", None)
    # tensor: q over output features, o over input features, LoRA factors on the split side; fsdp takes the other
    assert leaf_spec(("layers", "self_attn", "q_proj", "kernel"), (32, 4096, 4096), 4, 2) == P(None, "fsdp", "tensor")
    assert leaf_spec(("layers", "self_attn", "o_proj", "kernel"), (32, 4096, 4096), 4, 2) == P(None, "tensor", "fsdp")
    assert leaf_spec(("layers", "self_attn", "o_proj", "lora_a"), (32, 4096, 16), 1, 2) == P(None, "tensor", None)
    assert leaf_spec(("0", "mu", "layers", "mlp", "down_proj", "lora_b"), (32, 16, 4096), 8, 2) == \
        P(None, None, "fsdp")
    assert leaf_spec(("layers", "input_layernorm", "scale"), (32, 64), 8, 1) == P(None, None)  # small: whole
    assert leaf_spec(("x",), (4099, 3), 8, 1) == P(None, None)  # nothing divisible: whole
    mesh = make_mesh(1, 2, 2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}


BAD = [
    ("trainer.parallelism=zero3", "trainer.parallelism='zero3': must be one of data, fsdp"),
    ("trainer.parallelism=fsdp trainer.fsdp=3", "trainer.fsdp=3: fsdp x tensor = 3 x 1 must divide the 4 devices"),
    ("trainer.parallelism=fsdp trainer.tensor=4", "trainer.tensor=4: must divide the model's num_kv_heads=2"),
    ("trainer.parallelism=fsdp trainer.tensor=3", "trainer.tensor=3: must divide the 4 devices"),
    ("trainer.parallelism=fsdp trainer.fsdp=2 trainer.batch_size=6",
     "trainer.batch_size=6: must be divisible by data x fsdp = 2 x 2"),
    ("trainer.fsdp=2", "trainer.fsdp=2: splits the state only with trainer.parallelism=fsdp"),
    ("trainer.parallelism=fsdp trainer.devices=2", "trainer.devices=2: parallelism=fsdp runs on every device"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0] for b in BAD])
def test_bad_layouts_fail_with_one_line(workspace, tmp_path, overrides, message):
    done = run_train(f"model={workspace['model']}", f"data={workspace['train']}", "data.seq_len=64",
                     "trainer.batch_size=4", *overrides.split(), f"trainer.run_dir={tmp_path / 'r'}", cwd=tmp_path,
                     check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()[-1:]
    assert line == f"sftjax-train: error: {message}" or line.startswith(f"sftjax-train: error: {message}"), line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_sharded_checkpoint_restores_into_the_pmap_layout_and_back(tmp_path):
    from sftjax.train.checkpoint import Checkpointer

    model, objective, trainable, optimizer, lr_schedule = _setup("lora", 0.0, "adamw")
    abstract = jax.eval_shape(lambda: init_state(trainable, optimizer, 0))
    engines = {name: build_parallel(dataclasses.replace(TrainerSection(), parallelism=name), model.cfg, objective,
                                    optimizer, lr_schedule, abstract, model.frozen, {}) for name in ("fsdp", "data")}
    fsdp = engines["fsdp"]
    state, _ = fsdp.train(fsdp.place_state(init_state(trainable, optimizer, 0)), fsdp.place_frozen(model.frozen), {},
                          _batches(objective, 1)[0])
    saved = jax.tree.map(np.asarray, jax.device_get(state))
    with Checkpointer(tmp_path / "c", keep_last=2) as ckpt:
        ckpt.save(1, fsdp.to_save(state), {})
        ckpt.wait()
        for name, engine in engines.items():  # into pmap's replicated layout, and back into the split one
            restored, _ = ckpt.restore(engine.restore_target(abstract), 1)
            placed = engine.place_state(restored)
            host = jax.device_get(placed if name == "fsdp" else jax.tree.map(lambda x: x[0], placed))
            for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(host)):
                np.testing.assert_array_equal(np.asarray(y), x)
