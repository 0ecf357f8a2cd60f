"""The hand-written backward pass of `dot_product_attention` equals autodiff of the plain softmax expression.

The reference is the textbook form, differentiated by JAX: softmax(q k^T / sqrt(H) + bias) v, written with the
grouped heads as one einsum each way. Both compute the same products, so float32 results agree to 1e-6 of the
largest gradient (observed ~2e-7); with bfloat16 inputs to bf16 rounding (2e-2). The masks come from
`attention_mask`: packed segments, padding (segment 0) and, for a cache, keys beyond the queries.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.model.attention import attention_mask, causal_attention, dot_product_attention, mask_bias, window_mask


def reference_attention(q, k, v, bias):
    """q [B, T, N, H], k and v [B, S, K, H], bias [B, T, S] -> [B, T, N, H], differentiated by JAX."""
    B, T, N, H = q.shape
    K = k.shape[2]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(B, T, K, N // K, H), k).astype(jnp.float32)
    probs = jax.nn.softmax(logits * H**-0.5 + bias[:, None, None], axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    """Random q, k, v and the bias of a batch whose rows pack two segments, the second row left-padded; with
    S > T the queries sit at the last T of S cache slots."""
    q = _normal(seed, (B, T, N, H), dtype)
    k, v = _normal(seed + 1, (B, S, K, H), dtype), _normal(seed + 2, (B, S, K, H), dtype)
    k_index, q_index = jnp.arange(S), jnp.arange(S - T, S)
    segments = np.ones((B, S), np.int32)
    segments[0, S // 2:] = 2  # two packed examples
    segments[1, :3] = 0  # padding
    k_segment = jnp.asarray(segments)
    bias = mask_bias(attention_mask(q_index, k_index, k_segment[:, S - T:], k_segment))
    return q, k, v, bias


@pytest.mark.parametrize("B,T,S,N,K,H", [(2, 9, 9, 4, 4, 8),  # multi-head
                                         (2, 9, 9, 6, 2, 8),  # grouped-query, 3 query heads per key head
                                         (2, 5, 12, 4, 1, 16)])  # a cache: 5 queries over 12 slots, one key head
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_attention_equals_autodiff_of_softmax(B, T, S, N, K, H, dtype, rtol):
    q, k, v, bias = _inputs(B, T, S, N, K, H, dtype)
    probe = _normal(9, (B, T, N, H))  # a random cotangent, so every output element matters

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, bias).astype(jnp.float32) * probe)

    grads = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    out, ref_out = dot_product_attention(q, k, v, bias), reference_attention(q, k, v, bias)
    assert out.dtype == ref_out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=0,
                               atol=rtol * float(jnp.abs(ref_out.astype(jnp.float32)).max()))
    for name, ours, ref in zip("qkv", grads, ref_grads):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=0,
                                   atol=rtol * scale, err_msg=name)


def test_attention_inside_jit_scan_and_remat():
    """The layer stack's setting: one bias shared by every layer (closed over), a scan, rematerialisation."""
    q, k, v, bias = _inputs(2, 8, 8, 4, 2, 8, jnp.float32)
    ws = _normal(5, (3, 8, 8))  # per-layer mixing of the head dimension

    def stack(attention):
        def body(x, w):
            y = attention(x @ w, k, v, bias)
            return x + jnp.tanh(y), None
        return jax.jit(jax.grad(lambda ws, x: jnp.sum(jax.lax.scan(jax.checkpoint(body), x, ws)[0] ** 2),
                                argnums=(0, 1)))

    for ours, ref in zip(stack(dot_product_attention)(ws, q), stack(reference_attention)(ws, q)):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


def test_no_gradient_reaches_the_bias():
    """The bias is a mask: its cotangent is zero, by design (the hand-written backward pass returns none)."""
    q, k, v, bias = _inputs(2, 4, 4, 2, 1, 4, jnp.float32)
    grad = jax.grad(lambda b: jnp.sum(dot_product_attention(q, k, v, b)))(bias)
    assert grad.shape == bias.shape and not np.any(np.asarray(grad))


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("block", [8, 7, 64])  # 3 blocks of 8, 8 and 4 rows; 3 blocks of 7, 7 and 6; one block
def test_causal_blocks_equal_full_attention(window, block):
    """`causal_attention` (query blocks over the keys up to each block's end) equals attention over all pairs, in
    value and gradient, for packed segments, padding and a sliding window (masks that are all causal)."""
    q, k, v, bias = _inputs(2, 20, 20, 4, 2, 8, jnp.float32)
    if window:
        index = jnp.arange(20)
        bias = jnp.minimum(bias, mask_bias(window_mask(index, index, jnp.asarray(window)))[None])
    probe = _normal(9, q.shape)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, bias) * probe)

    ours = causal_attention(q, k, v, bias, block=block)
    ref = dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))
    grads = jax.grad(loss(lambda *a: causal_attention(*a, block=block)), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-6 * float(jnp.abs(r).max()), err_msg=name)
