"""Grouped-query self-attention with segment-id masking, sliding windows and a KV cache.

One mask rule serves training, packed sequences and cached decoding. Every token has a global index (its slot
in the sequence or the cache) and a segment id (0 = padding, 1, 2, ... = examples packed into one row):

    query t may attend key s  <=>  index(s) <= index(t)  and  segment(s) == segment(t)
                                   and (window == 0 or index(t) - index(s) < window)

so packed examples never see each other, left padding in a batch of prompts is invisible, and slots of the cache
not yet written (index > t) are excluded by causality. Positions (for RoPE) are given separately and restart at 0
in each segment. The mask reaches the layers as an additive float32 bias (0 allowed, float32 min excluded), built
once per forward pass: an addition needs nothing saved for the backward pass, where a select per layer would keep
its mask broadcast to every head as a residual.

Grouped-query attention: N query heads share K key/value heads in G = N // K groups, computed without repeating
the keys: per (batch row, key head), the G query heads' rows stacked into one [G*T, H] matrix. Its backward pass
is written out (`dot_product_attention`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.model.compact import gather, scatter
from sftjax.model.config import ATTENTION_BLOCK, ModelConfig
from sftjax.model.layers import Dense, RMSNorm, apply_rope, dense, rope_inv_freq


def attention_mask(q_index: jax.Array, k_index: jax.Array, q_segment: jax.Array,
                   k_segment: jax.Array) -> jax.Array:
    """Causal + same-segment mask [B, T, S] from indices q [T], k [S] and segment ids q [B, T], k [B, S]."""
    causal = k_index[None, :] <= q_index[:, None]  # [T, S]
    same_segment = q_segment[:, :, None] == k_segment[:, None, :]  # [B, T, S]
    return causal[None] & same_segment


def window_mask(q_index: jax.Array, k_index: jax.Array, window: jax.Array) -> jax.Array:
    """[T, S]: keys less than `window` positions back (all keys when window == 0)."""
    return (window == 0) | (q_index[:, None] - k_index[None, :] < window)


def mask_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask [B, T, S] -> additive float32 bias [B, T, S]: 0 where allowed, float32 min where not.

    A row with no allowed key (never produced by `attention_mask`: a token always sees itself) would get uniform
    weights, since all its logits round to the same float32 min.
    """
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def _heads_first(x: jax.Array, groups: int) -> jax.Array:
    """[B, T, K*G, H] -> [B, K, G, T, H]: each (key head, group) a contiguous [T, H] matrix."""
    B, T, N, H = x.shape
    return x.reshape(B, T, N // groups, groups, H).transpose(0, 2, 3, 1, 4)


def _heads_last(x: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, K*G, H] (inverse of `_heads_first`)."""
    B, K, G, T, H = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


def _heads(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, N, H], k and v [B, S, K, H] -> q [B, K, G, T, H], k and v [B, K, S, H]."""
    return _heads_first(q, q.shape[2] // k.shape[2]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _logits(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """q [B, K, G, T, H], k [B, K, S, H], bias [B, T, S] -> float32 logits [B, K, G, T, S] (scaled, biased)."""
    scale = q.shape[-1] ** -0.5
    return jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32) * scale + bias[:, None, None]


def _attention(q, k, v, bias):
    """The forward pass; returns (out [B, T, N, H], log-sum-exp of each query's logits [B, K, G, T])."""
    qh, kh, vh = _heads(q, k, v)
    logits = _logits(qh, kh, bias)
    top = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    probs = (exp / total).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, vh)
    return _heads_last(out), (top + jnp.log(total))[..., 0]


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias) v; logits and softmax in float32.

    q [B, T, N, H], k and v [B, S, K, H], bias [B, T, S] (`mask_bias`) -> [B, T, N, H]

    Computed per (batch, key head) as matmuls over [G*T, H] x [H, S] with the query groups stacked along the
    rows, so the [B, K, G, T, S] logits and probabilities are never transposed (only q, k, v and the output
    are, which are T/H times smaller). The backward pass is written out (as flash attention's): it saves q, k,
    v, the output and the log-sum-exp [B, K, G, T] instead of the probabilities, and recomputes them:

        P  = exp(logits - lse)                  dV = P^T dO
        dP = dO V^T                             dS = P * (dP - rowsum(dO * O)) / sqrt(H)
        dQ = dS K                               dK = dS^T Q

    Autodiff kept the float32 probabilities of every layer (stacked over the layer scan) and transposed the
    logits' gradient before the dQ / dK matmuls. No gradient flows to the bias (a mask).
    """
    return _attention(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
    out, lse = _attention(q, k, v, bias)
    return out, (q, k, v, bias, out, lse)


def _attention_bwd(residuals, d_out):
    q, k, v, bias, out, lse = residuals
    qh, kh, vh = _heads(q, k, v)
    groups = qh.shape[2]
    do, oh = _heads_first(d_out, groups), _heads_first(out, groups)  # [B, K, G, T, H]
    probs = jnp.exp(_logits(qh, kh, bias) - lse[..., None])  # [B, K, G, T, S] float32
    dv = jnp.einsum("bkgts,bkgth->bksh", probs.astype(v.dtype), do)
    dp = jnp.einsum("bkgth,bksh->bkgts", do, vh).astype(jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * oh.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (probs * (dp - delta) * q.shape[-1] ** -0.5).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksh->bkgth", ds, kh)
    dk = jnp.einsum("bkgts,bkgth->bksh", ds, qh)
    # None: a zero cotangent for the bias (a mask), which JAX materialises only if someone asks for it
    return _heads_last(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3), None


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                     block: int = ATTENTION_BLOCK) -> jax.Array:
    """`dot_product_attention` when queries and keys are the same T positions and the bias is causal (key s masked
    for query t whenever s > t), as in training: the queries in blocks of `block` rows, each over the keys up to
    its last row. The keys a block skips are masked for all its rows (weight exactly 0), so the result is the
    same up to summation order; with n blocks it does (n + 1) / 2n of the work (3/4 at T = 256). The block is
    `ModelConfig.attention_block`: smaller blocks skip more work, larger ones make fewer and bigger matmuls.

    q [B, T, N, H], k and v [B, T, K, H], bias [B, T, T] -> [B, T, N, H]
    """
    T = q.shape[1]
    if T <= block:
        return dot_product_attention(q, k, v, bias)
    outs = [dot_product_attention(q[:, a:a + block], k[:, :a + block], v[:, :a + block],
                                  bias[:, a:a + block, :a + block]) for a in range(0, T, block)]
    return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    """Self-attention of one layer. Parameters: q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm for Qwen3)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, bias, kv_cache=None, cache_index=None, compact=None):
        """x [B, T, D], positions [B, T], bias [B, T, S] -> (out [B, T, D], (k, v) [B, S, K, H] each).

        Without a cache S == T. With `kv_cache` = (k, v) [B, S, K, H], the new keys and values are written at
        slots cache_index .. cache_index + T - 1 and attention runs over the whole cache. With `compact` =
        (token_index [M], token_slot [B*T]) (padding-free layers, `compact.py`): x [1, M, D] and positions [1, M]
        are the batch's real tokens, bias [B, T, T] its rows; q, k, v are laid into the rows for attention and
        its output gathered back.
        """
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        projections = [Dense(N * H, cfg.qkv_bias, cfg, name="q_proj"), Dense(K * H, cfg.qkv_bias, cfg, name="k_proj"),
                       Dense(K * H, cfg.qkv_bias, cfg, name="v_proj")]
        q, k, v = dense(x, [p.weights(x) for p in projections], cfg)  # applied together
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        if cfg.qk_norm:
            q = RMSNorm(cfg, name="q_norm")(q)
            k = RMSNorm(cfg, name="k_norm")(k)
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
        if compact is not None:
            q, k, v = (scatter(a, *compact, *bias.shape[:2]) for a in (q, k, v))
        if kv_cache is None:  # the T positions 0 .. T-1 over themselves: a causal mask (see module docstring)
            out = causal_attention(q, k, v, bias, cfg.attention_block)
        else:
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias)
        if compact is not None:
            out = gather(out, *compact)
        return Dense(cfg.hidden_size, cfg.o_bias, cfg, name="o_proj")(out.reshape(B, T, N * H)), (k, v)
