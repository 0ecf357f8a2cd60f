"""The decoder: embed -> L x Block -> RMSNorm -> lm_head, as pure functions of (cfg, params, inputs).

Parameter tree (leaves of `layers` are stacked along a leading L axis, whether or not layers are scanned, so a
checkpoint never depends on the execution strategy):

    embed_tokens/embedding               [V, D]
    layers/input_layernorm/scale         [L, D]
    layers/self_attn/{q,k,v,o}_proj/kernel [L, D, N*H] / [L, D, K*H] / [L, N*H, D]  (+ bias [L, out])
    layers/self_attn/{q,k}_norm/scale    [L, H]          (Qwen3)
    layers/post_attention_layernorm/scale [L, D]
    layers/mlp/{gate,up}_proj/kernel     [L, D, F];  layers/mlp/down_proj/kernel [L, F, D]  (+ bias)
    norm/scale                           [D]
    lm_head/kernel                       [D, V]          (absent when embeddings are tied)

A Block is a Flax linen module; the layer stack is a `lax.scan` (cfg.scan_layers) or an unrolled loop over the
same stacked tree, optionally rematerialised (cfg.remat).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sftjax.model.attention import Attention, attention_mask, mask_bias, window_mask
from sftjax.model.compact import gather, scatter
from sftjax.model.config import ModelConfig
from sftjax.model.layers import INIT_STD, Dense, RMSNorm, dense, gated_activation, linear

Params = dict[str, Any]
Cache = dict[str, jax.Array]


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama, GeGLU for Gemma. [B, T, D] -> [B, T, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        projections = [Dense(cfg.intermediate_size, cfg.mlp_bias, cfg, name="gate_proj"),
                       Dense(cfg.intermediate_size, cfg.mlp_bias, cfg, name="up_proj")]
        gate, up = dense(x, [p.weights(x) for p in projections], cfg)  # applied together
        return Dense(cfg.hidden_size, cfg.mlp_bias, cfg, name="down_proj")(gated_activation(cfg.hidden_act, gate, up))


class Block(nn.Module):
    """Pre-norm residual block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).

    Dropout (cfg.dropout_rate) is active only when applied with a "dropout" rng (training).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, bias, kv_cache=None, cache_index=None, deterministic=True, compact=None):
        drop = nn.Dropout(self.cfg.dropout_rate, deterministic=deterministic)
        h = RMSNorm(self.cfg, name="input_layernorm")(x)
        h, kv = Attention(self.cfg, name="self_attn")(h, positions, bias, kv_cache, cache_index, compact)
        x = x + drop(h)
        x = x + drop(MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x)))
        return x, kv


# ----------------------------------------------------------------------------------------------------------------
# Parameters


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) kernels and embeddings, zero biases, unit norms), as HF initialises."""
    k_embed, k_layers, k_head = jax.random.split(rng, 3)
    param_dtype = jnp.dtype(cfg.param_dtype)
    D, V = cfg.hidden_size, cfg.vocab_size
    x = jnp.zeros((1, 1, D), cfg.dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    bias = jnp.zeros((1, 1, 1), jnp.float32)
    init_layer = lambda key: Block(cfg).init(key, x, positions, bias)["params"]  # noqa: E731
    params: Params = {
        "embed_tokens": {"embedding": (INIT_STD * jax.random.normal(k_embed, (V, D))).astype(param_dtype)},
        "layers": jax.vmap(init_layer)(jax.random.split(k_layers, cfg.num_layers)),
        "norm": {"scale": (jnp.zeros if cfg.norm_plus_one else jnp.ones)((D,), param_dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": (INIT_STD * jax.random.normal(k_head, (D, V))).astype(param_dtype)}
    return params


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


# ----------------------------------------------------------------------------------------------------------------
# Forward


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes along a row. [B, T] -> [B, T]"""
    T = segment_ids.shape[1]
    index = jnp.arange(T)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return (index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)).astype(jnp.int32)


def embed(cfg: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, D] in the compute dtype (Gemma: times sqrt(D), rounded to that dtype)."""
    x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(cfg.dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(cfg.hidden_size**0.5, dtype=cfg.dtype)
    return x


def lm_head(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> logits [B, T, V] in the compute dtype."""
    if cfg.tie_word_embeddings:
        return linear(h, params["embed_tokens"]["embedding"].astype(cfg.dtype).T)
    return linear(h, params["lm_head"]["kernel"].astype(cfg.dtype))


def _remat(cfg: ModelConfig, fn):
    if cfg.remat == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if cfg.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


def run_layers(cfg: ModelConfig, layers: Params, x: jax.Array, positions: jax.Array, mask: jax.Array,
               q_index: jax.Array, k_index: jax.Array, kv_cache=None, cache_index=None, dropout_rng=None,
               compact=None):
    """Apply the L blocks. x [B, T, D], mask [B, T, S] -> (x [B, T, D], updated cache (k, v) [L, B, S, K, H]).
    With compact = (token_index [M], token_slot [B*T]) (padding-free layers, `compact.py`) x and positions are
    [1, M, ...], mask the rows'.

    Per-layer inputs (parameters, attention window, cache slice, layer index) are scanned or looped over
    together. Dropout (residual, and the linear plug-in's; training only) uses the key fold_in(dropout_rng,
    layer). Without sliding windows every layer shares one attention bias, built here once.
    """
    block = Block(cfg)
    windows = jnp.asarray(cfg.layer_windows(), jnp.int32)
    shared_bias = None if any(cfg.layer_windows()) else mask_bias(mask)
    train = dropout_rng is not None and (cfg.dropout_rate > 0 or (cfg.linear is not None and cfg.linear.stochastic))

    def layer(x, per_layer):
        params, window, kv, index = per_layer
        if shared_bias is None:
            bias = mask_bias(mask & window_mask(q_index, k_index, window)[None])
        else:
            bias = shared_bias
        rngs = {"dropout": jax.random.fold_in(dropout_rng, index)} if train else {}
        x, new_kv = block.apply({"params": params}, x, positions, bias, kv, cache_index,
                                deterministic=not train, rngs=rngs, compact=compact)
        return x, (None if kv is None else new_kv)

    layer = _remat(cfg, layer)
    per_layer = (layers, windows, kv_cache, jnp.arange(cfg.num_layers))
    if cfg.scan_layers:
        return jax.lax.scan(layer, x, per_layer)
    kvs = []
    for i in range(cfg.num_layers):
        x, kv = layer(x, jax.tree.map(lambda a: a[i], per_layer))
        kvs.append(kv)
    return x, (None if kv_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs))


def hidden_states(cfg: ModelConfig, params: Params, tokens: jax.Array, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None, dropout_rng: jax.Array | None = None,
                  compact: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Final normalised hidden states [B, T, D] for tokens [B, T] (no cache).

    segment_ids [B, T]: packed examples (0 = padding); default: one segment per row. positions default to
    restarting at 0 in every segment. dropout_rng: training mode (dropout on, if cfg.dropout_rate > 0).
    compact: (token_index [M], token_slot [B*T]) of the batch (`objectives/sft.py: token_index`): the layers run
    on its M real tokens only, and the padding slots' hidden states are zeros.
    """
    B, T = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    index = jnp.arange(T)
    mask = attention_mask(index, index, segment_ids, segment_ids)
    if compact is None:
        x, _ = run_layers(cfg, params["layers"], embed(cfg, params, tokens), positions, mask, index, index,
                          dropout_rng=dropout_rng)
        return RMSNorm(cfg).apply({"params": params["norm"]}, x)
    x = embed(cfg, params, gather(tokens, *compact))  # [1, M, D]
    x, _ = run_layers(cfg, params["layers"], x, gather(positions, *compact), mask, index, index,
                      dropout_rng=dropout_rng, compact=compact)
    return scatter(RMSNorm(cfg).apply({"params": params["norm"]}, x), *compact, B, T)


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (compute dtype) for int tokens [B, T]. See `hidden_states` for the optional inputs.

    Compiled once per (cfg, shapes); inside another jit it is inlined.
    """
    h = hidden_states(cfg, params, jnp.asarray(tokens), segment_ids, positions, dropout_rng)
    return lm_head(cfg, params, h)


# ----------------------------------------------------------------------------------------------------------------
# KV cache


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
    """Empty cache for `length` slots: k, v [L, B, S, K, H]; segment_ids [B, S] (0 = empty); index = next slot."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, cfg.dtype),
        "v": jnp.zeros(shape, cfg.dtype),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def forward_cached(cfg: ModelConfig, params: Params, tokens: jax.Array, cache: Cache, segment_ids: jax.Array,
                   positions: jax.Array) -> tuple[jax.Array, Cache]:
    """Run tokens [B, T] at cache slots index .. index + T - 1 -> (logits [B, T, V], updated cache)."""
    T = tokens.shape[1]
    S = cache["segment_ids"].shape[1]
    start = cache["index"]
    q_index = start + jnp.arange(T)
    k_index = jnp.arange(S)
    k_segment = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids.astype(jnp.int32), (0, start))
    mask = attention_mask(q_index, k_index, segment_ids, k_segment)
    x, (k, v) = run_layers(cfg, params["layers"], embed(cfg, params, tokens), positions, mask, q_index, k_index,
                           (cache["k"], cache["v"]), start)
    h = RMSNorm(cfg).apply({"params": params["norm"]}, x)
    return lm_head(cfg, params, h), {"k": k, "v": v, "segment_ids": k_segment, "index": start + T}
