"""Padding-free layers (`model/compact.py`): the host-side index (`objectives/sft.py: token_index`), and the
decoder on a batch's real tokens only giving the values and gradients of the dense path.

Tolerances: float32, the same computation over M rows instead of B*T, so only summation order differs: 1e-5
absolute on hidden states, 1e-5 relative to each gradient leaf's largest entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sftjax
from sftjax.model.compact import gather, scatter
from sftjax.model.transformer import hidden_states
from sftjax.objectives.sft import TOKEN_FRACTIONS, token_index
from tests.model.test_transformer import CONFIGS, _params, _tokens


def _segments() -> np.ndarray:
    """[3, 16]: two packed examples + padding, one full row, one short example + padding (36 of 48 real)."""
    seg = np.zeros((3, 16), np.int32)
    seg[0, :5], seg[0, 5:12] = 1, 2
    seg[1, :] = 1
    seg[2, :8] = 1
    return seg


def test_token_index_lists_real_tokens_and_inverts():
    seg = _segments()
    index, slot = token_index(seg)
    M = index.shape[-1]
    assert M == int(48 * 3 / 4)  # 36 real tokens: the smallest size that holds them is 3/4 of 48
    real = np.flatnonzero(seg.reshape(-1) > 0)
    np.testing.assert_array_equal(index[:len(real)], real)
    assert (index[len(real):] >= 48).all()  # padding entries are out of range
    np.testing.assert_array_equal(slot[real], np.arange(len(real)))
    assert (np.delete(slot, real) == M).all()


def test_token_index_one_size_for_all_micro_batches_and_none_when_full():
    seg = np.zeros((2, 3, 2, 16), np.int32)  # [devices, accum, B, T]
    seg[..., :4] = 1
    seg[1, 2, :, :9] = 1  # the fullest micro-batch: 18 of 32 slots
    index, slot = token_index(seg)
    assert index.shape == (2, 3, 20) and slot.shape == (2, 3, 32)  # 20 = 5/8 of 32, for every micro-batch
    assert token_index(np.ones((2, 16), np.int32)) is None  # no padding: every slot is computed
    almost = np.ones((2, 16), np.int32)
    almost[0, -3:] = 0  # 29 of 32 real: above TOKEN_FRACTIONS[-1], not worth the gathers
    assert 29 > 32 * TOKEN_FRACTIONS[-1] and token_index(almost) is None


def test_gather_and_scatter_are_inverse_with_transposed_gradients():
    seg = _segments()
    index, slot = map(jnp.asarray, token_index(seg))
    x = jnp.asarray(np.random.RandomState(0).standard_normal((3, 16, 4)), jnp.float32)
    compact = gather(x, index, slot)
    assert compact.shape == (1, index.shape[0], 4)
    rows = scatter(compact, index, slot, 3, 16)
    real = (seg > 0)[..., None]
    np.testing.assert_array_equal(rows, np.where(real, x, 0.0))
    # the gradient of each is the other one (a permutation's transpose), as autodiff of a plain gather would give
    ct = jnp.asarray(np.random.RandomState(1).standard_normal(compact.shape), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(gather(x, index, slot) * ct))(x)
    np.testing.assert_array_equal(grad, scatter(ct, index, slot, 3, 16))
    ref = jax.grad(lambda x: jnp.sum(x.reshape(-1, 4).at[index].get(mode="fill", fill_value=0) * ct[0]))(x)
    np.testing.assert_array_equal(grad, ref)


@pytest.mark.parametrize("family,scan_layers", [(f, True) for f in sorted(CONFIGS)] + [("llama", False)])
def test_padding_free_layers_give_the_dense_values_and_gradients(family, scan_layers):
    """Every family switch (sliding windows, biases, q/k norm, Gemma's norms), attention in causal blocks of 4 over
    16 positions, the layers scanned or unrolled: hidden states at the real tokens equal the dense path's, zeros
    at the padding slots, and the gradient of a loss over the real tokens is the same."""
    cfg = CONFIGS[family].replace(attention_block=4, scan_layers=scan_layers)
    params = _params(cfg, seed=2)
    seg = _segments()
    tokens = _tokens(seg.shape, seed=3)
    compact = tuple(map(jnp.asarray, token_index(seg)))
    real = jnp.asarray(seg > 0)[..., None]
    weights = jnp.asarray(np.random.RandomState(4).standard_normal((3, 16, cfg.hidden_size)), jnp.float32)

    def loss(params, compact):
        h = hidden_states(cfg, params, tokens, seg, None, None, compact)
        return jnp.sum(jnp.where(real, jnp.tanh(h) * weights, 0.0)), h

    with jax.default_matmul_precision("highest"):
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (value, dense), grad = step(params, None)
        (value_c, h), grad_c = step(params, compact)
    np.testing.assert_allclose(np.where(real, h, 0.0), np.where(real, dense, 0.0), rtol=0, atol=1e-5)
    assert not np.asarray(jnp.where(real, 0.0, h)).any()
    np.testing.assert_allclose(value_c, value, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad_c), jax.tree.leaves(grad)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))


def test_sft_objective_prepares_the_index_only_when_asked():
    """The SFT objective adds token_index / token_slot under padding_free (and its loss and gradients are the dense
    ones); with padding_free=False the batch is as the pipeline made it."""
    from sftjax.objectives.sft import sft_sums, with_token_index

    cfg = CONFIGS["llama"].replace(attention_block=4)
    seg = _segments()
    tokens = _tokens(seg.shape, seed=5)
    batch = {"tokens": tokens, "targets": _tokens(seg.shape, seed=6), "segment_ids": seg,
             "positions": np.asarray(sftjax.model.transformer.segment_positions(jnp.asarray(seg))),
             "loss_mask": (seg > 0).astype(np.float32), "task_ids": np.zeros_like(seg)}
    assert with_token_index(cfg.replace(padding_free=False), batch) is batch
    prepared = with_token_index(cfg.replace(padding_free=True), batch)
    assert set(prepared) - set(batch) == {"token_index", "token_slot"}
    params = _params(cfg, seed=7)
    with jax.default_matmul_precision("highest"):
        grad_fn = jax.jit(jax.value_and_grad(lambda p, batch: sft_sums(cfg, p, batch)["loss"]))
        ref, ref_grad = grad_fn(params, batch)
        out, out_grad = grad_fn(params, prepared)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out_grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12)
