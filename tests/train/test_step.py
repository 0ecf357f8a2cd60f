"""The pmap train step: device count and gradient accumulation do not change the result; the loss is per token.

Tolerance: 1e-5 relative (float32; only the order of summation differs between the three layouts).
"""

import jax
import numpy as np
import optax
import pytest

import sftjax
from sftjax.config import OptimSection
from sftjax.objectives.sft import SFT, label_index, token_nll
from sftjax.train.optim import make_optimizer, schedule
from sftjax.train.state import device_mesh, init_state, replicate, unreplicate
from sftjax.train.step import compile_steps

CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16)
ROWS, T = 8, 12
RTOL = 1e-5


def _rows(seed=0):
    """ROWS rows with very different trained-token counts per row (so per-micro-batch averaging would differ)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 64, (ROWS, T)).astype(np.int32)
    mask = np.zeros((ROWS, T), np.float32)
    for r in range(ROWS):
        mask[r, rng.randint(0, T):] = 1.0
    mask[0] = 1.0
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
            "segment_ids": np.ones((ROWS, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (ROWS, 1)),
            "task_ids": np.zeros((ROWS, T), np.int32)}


def _run(devices, accum, opt_cfg, steps=2):
    """Train `steps` steps on the same ROWS rows per step, laid out as [devices, accum, ROWS/(devices*accum), T]."""
    optimizer = make_optimizer(opt_cfg, 10)
    params = sftjax.init_params(CFG, jax.random.key(0))
    p_train, _ = compile_steps(SFT(CFG, ("t",)), optimizer, schedule(opt_cfg, 10), devices)
    mesh = device_mesh(devices)
    state = replicate(init_state(params, optimizer, seed=0), mesh)
    frozen = replicate({}, mesh)
    history = []
    for s in range(steps):
        rows = _rows(seed=s)
        # Row r goes to micro-batch (r // b) % accum of device r // (b * accum): the stream order of the pipeline.
        batch = {k: v.reshape(devices, accum, ROWS // (devices * accum), T) for k, v in rows.items()}
        state, metrics = p_train(state, frozen, frozen, batch)
        history.append(jax.tree.map(lambda x: float(x[0]), metrics))
    return unreplicate(state), history


@pytest.mark.parametrize("opt", ["sgd", "adamw", "adafactor"])
def test_devices_and_accumulation_agree(opt):
    assert jax.local_device_count() == 4  # tests/conftest.py
    opt_cfg = OptimSection(name=opt, lr=0.1 if opt == "sgd" else 1e-3, momentum=0.0, max_grad_norm=0.0,
                           weight_decay=0.01)
    runs = {layout: _run(*layout, opt_cfg) for layout in [(1, 1), (1, 4), (4, 1), (2, 2)]}
    ref_state, ref_hist = runs[1, 1]
    for layout, (state, hist) in runs.items():
        for m, r in zip(hist, ref_hist):
            np.testing.assert_allclose(m["loss"], r["loss"], rtol=RTOL, err_msg=str(layout))
            np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=RTOL, err_msg=str(layout))
            assert m["tokens"] == r["tokens"]
        for a, b in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(ref_state["trainable"])):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7, err_msg=str(layout))


def test_loss_is_mean_over_trained_tokens():
    """The step's loss equals the plain mean NLL over all trained tokens of the batch, computed directly."""
    opt_cfg = OptimSection(name="sgd", lr=0.0 + 1e-9, momentum=0.0, max_grad_norm=0.0)
    _, hist = _run(2, 2, opt_cfg, steps=1)
    rows = _rows(seed=0)
    params = sftjax.init_params(CFG, jax.random.key(0))
    nll, _ = token_nll(sftjax.forward(CFG, params, rows["tokens"]), rows["targets"])
    expected = float((np.asarray(nll) * rows["loss_mask"]).sum() / rows["loss_mask"].sum())
    np.testing.assert_allclose(hist[0]["loss"], expected, rtol=RTOL)


def test_non_finite_loss_leaves_state_unchanged():
    opt_cfg = OptimSection(name="sgd", lr=0.1, momentum=0.0, max_grad_norm=0.0)
    optimizer = make_optimizer(opt_cfg, 10)
    params = sftjax.init_params(CFG, jax.random.key(0))
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(np.nan)
    p_train, _ = compile_steps(SFT(CFG, ("t",)), optimizer, schedule(opt_cfg, 10), 1)
    mesh = device_mesh(1)
    state = replicate(init_state(params, optimizer, seed=0), mesh)
    before = unreplicate(state)
    rows = {k: v.reshape(1, 1, ROWS, T) for k, v in _rows().items()}
    state, metrics = p_train(state, replicate({}, mesh), replicate({}, mesh), rows)
    assert float(metrics["finite"][0]) == 0.0
    after = unreplicate(state)
    assert int(after["step"]) == 1
    for a, b in zip(jax.tree.leaves(after["trainable"]), jax.tree.leaves(before["trainable"])):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_skips_norms_and_biases():
    from sftjax.train.optim import decay_mask
    cfg = CFG.replace(family="qwen2", qkv_bias=True)
    mask = decay_mask(sftjax.param_shapes(cfg))
    assert mask["layers"]["self_attn"]["q_proj"] == {"kernel": True, "bias": False}
    assert mask["norm"]["scale"] is False and mask["embed_tokens"]["embedding"] is True


def test_schedules():
    warm_cos = schedule(OptimSection(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert float(warm_cos(0)) == 0.0 and abs(float(warm_cos(5)) - 0.5) < 1e-6
    assert abs(float(warm_cos(10)) - 1.0) < 1e-6 and abs(float(warm_cos(110)) - 0.1) < 1e-6
    lin = schedule(OptimSection(lr=1.0, schedule="linear"), 100)
    assert abs(float(lin(50)) - 0.5) < 1e-6
    assert float(schedule(OptimSection(lr=0.3, schedule="constant"), 100)(99)) == pytest.approx(0.3)
    opt = make_optimizer(OptimSection(name="adafactor"), 10)
    assert isinstance(opt, optax.GradientTransformation)


def test_label_index_buckets_and_pads():
    mask = np.zeros((2, 3, 4, 8), np.float32)  # [devices, accum, B, T]: 32 slots per micro-batch
    mask[0, 0, 1, 2:5] = 1.0  # 3 trained tokens
    mask[1, 2, 3, 7] = 1.0
    index = label_index(mask)
    assert index.shape == (2, 3, 4)  # K = 32 / 8 holds the largest count (3)
    np.testing.assert_array_equal(index[0, 0], [10, 11, 12, -1])
    np.testing.assert_array_equal(index[1, 2], [31, -1, -1, -1])
    np.testing.assert_array_equal(index[0, 1], [-1, -1, -1, -1])
    mask[0, 0, 2, :] = 1.0  # 11 trained tokens: K = 32 / 2
    assert label_index(mask).shape == (2, 3, 16)
    mask[0, 0] = 1.0  # all 32 slots: every position's logits
    assert label_index(mask) is None


def test_labeled_positions_only_give_the_same_step():
    """A batch with label_index (logits at the trained positions only) trains exactly like the full computation:
    loss, gradient norm, per-token accuracy and the SGD-updated weights (rtol 1e-5), per device layout. (SGD: AdamW
    would scale float-rounding differences of near-zero gradients up to the learning rate.)"""
    opt_cfg = OptimSection(name="sgd", lr=0.5, momentum=0.0, max_grad_norm=0.0)
    optimizer = make_optimizer(opt_cfg, 10)
    params = sftjax.init_params(CFG, jax.random.key(0))
    rows = _rows()
    rng = np.random.RandomState(1)
    rows["loss_mask"] = (rng.rand(ROWS, T) < 0.15).astype(np.float32)  # ~15% trained: K = 1/4 of the slots
    rows["task_ids"] = rng.randint(0, 2, (ROWS, T)).astype(np.int32)
    for devices, accum in [(1, 1), (2, 2)]:
        p_train, _ = compile_steps(SFT(CFG, ("a", "b")), optimizer, schedule(opt_cfg, 10), devices)
        mesh = device_mesh(devices)
        batch = {k: v.reshape(devices, accum, ROWS // (devices * accum), T) for k, v in rows.items()}
        index = label_index(batch["loss_mask"])
        assert index is not None and index.shape[-1] < ROWS * T // (devices * accum)
        dropped = index.copy()
        dropped[..., 0] = -1  # the index is what is used: dropping an entry drops that token
        results = []
        for b in (batch, {**batch, "label_index": index}, {**batch, "label_index": dropped}):
            state = replicate(init_state(params, optimizer, seed=0), mesh)
            state, metrics = p_train(state, replicate({}, mesh), replicate({}, mesh), b)
            results.append((unreplicate(state), jax.tree.map(lambda x: float(x[0]), metrics)))
        (full_state, full), (sparse_state, sparse), (_, fewer) = results
        assert fewer["tokens"] == full["tokens"] - devices * accum
        for k in ("loss", "grad_norm", "accuracy", "tokens"):
            np.testing.assert_allclose(sparse[k], full[k], rtol=RTOL, err_msg=k)
        for a, b in zip(jax.tree.leaves(sparse_state["trainable"]), jax.tree.leaves(full_state["trainable"])):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)


def test_padding_free_layers_give_the_same_step():
    """A batch with token_index (the layers on its real tokens only: `model/compact.py`) trains like the full
    computation: loss, gradient norm, accuracy and the SGD-updated weights (rtol 1e-5), on one device and on two
    devices with two micro-batches each (one M for all four micro-batches)."""
    opt_cfg = OptimSection(name="sgd", lr=0.5, momentum=0.0, max_grad_norm=0.0)
    optimizer = make_optimizer(opt_cfg, 10)
    params = sftjax.init_params(CFG, jax.random.key(0))
    rows = _rows(seed=3)
    lengths = np.random.RandomState(2).randint(3, 10, ROWS)  # rows padded after their first 3..9 tokens
    real = np.arange(T)[None, :] < lengths[:, None]
    rows["segment_ids"] = real.astype(np.int32)
    rows["loss_mask"] = rows["loss_mask"] * real
    objective = SFT(CFG.replace(padding_free=True), ("t",))
    for devices, accum in [(1, 1), (2, 2)]:
        p_train, _ = compile_steps(objective, optimizer, schedule(opt_cfg, 10), devices)
        mesh = device_mesh(devices)
        batch = {k: v.reshape(devices, accum, ROWS // (devices * accum), T) for k, v in rows.items()}
        compact = objective.prepare(batch)
        assert compact["token_index"].shape[-1] < ROWS * T // (devices * accum)
        results = []
        for b in ({k: v for k, v in compact.items() if k not in ("token_index", "token_slot")}, compact):
            state = replicate(init_state(params, optimizer, seed=0), mesh)
            state, metrics = p_train(state, replicate({}, mesh), replicate({}, mesh), b)
            results.append((unreplicate(state), jax.tree.map(lambda x: float(x[0]), metrics)))
        (full_state, full), (compact_state, out) = results
        for k in ("loss", "grad_norm", "accuracy", "tokens"):
            np.testing.assert_allclose(out[k], full[k], rtol=RTOL, err_msg=k)
        for a, b in zip(jax.tree.leaves(compact_state["trainable"]), jax.tree.leaves(full_state["trainable"])):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)


def test_token_nll_correct_is_the_greedy_choice():
    rng = np.random.RandomState(0)
    logits = rng.randn(4, 5, 64).astype(np.float32)  # no ties among random floats
    targets = rng.randint(0, 64, (4, 5)).astype(np.int32)
    targets[0, :] = logits[0].argmax(-1)  # some hits for sure
    nll, correct = token_nll(jax.numpy.asarray(logits), jax.numpy.asarray(targets))
    np.testing.assert_array_equal(np.asarray(correct), logits.argmax(-1) == targets)
    expected = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-5)
    tie = np.zeros((1, 1, 8), np.float32)  # every logit equal: greedy decoding may pick the target
    _, correct = token_nll(jax.numpy.asarray(tie), jax.numpy.asarray([[5]]))
    assert bool(correct[0, 0])
