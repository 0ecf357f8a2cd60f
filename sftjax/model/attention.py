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
the keys: `BTKGH,BSKH->BKGTS`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.model.config import ModelConfig
from sftjax.model.layers import Dense, RMSNorm, apply_rope, rope_inv_freq


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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias) v; logits and softmax in float32.

    q [B, T, N, H], k and v [B, S, K, H], bias [B, T, S] (`mask_bias`) -> [B, T, N, H]
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * (H**-0.5)
    logits = logits.astype(jnp.float32) + bias[:, None, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)


class Attention(nn.Module):
    """Self-attention of one layer. Parameters: q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm for Qwen3)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, bias, kv_cache=None, cache_index=None):
        """x [B, T, D], positions [B, T], bias [B, T, S] -> (out [B, T, D], (k, v) [B, S, K, H] each).

        Without a cache S == T. With `kv_cache` = (k, v) [B, S, K, H], the new keys and values are written at
        slots cache_index .. cache_index + T - 1 and attention runs over the whole cache.
        """
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Dense(N * H, cfg.qkv_bias, cfg, name="q_proj")(x).reshape(B, T, N, H)
        k = Dense(K * H, cfg.qkv_bias, cfg, name="k_proj")(x).reshape(B, T, K, H)
        v = Dense(K * H, cfg.qkv_bias, cfg, name="v_proj")(x).reshape(B, T, K, H)
        if cfg.qk_norm:
            q = RMSNorm(cfg, name="q_norm")(q)
            k = RMSNorm(cfg, name="k_norm")(k)
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias)
        return Dense(cfg.hidden_size, cfg.o_bias, cfg, name="o_proj")(out.reshape(B, T, N * H)), (k, v)
