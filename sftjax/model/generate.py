"""Autoregressive generation with a KV cache, compiled once per (config, batch, prompt bucket, length, sampler).

A batch of prompts of different lengths is left-padded to a common length P (rounded up to a bucket, so nearby
lengths share one compilation). Padding slots get segment id 0 and prompt tokens segment id 1, so no prompt sees
padding (see `attention.py`); positions count only real tokens. The cache has P + max_new_tokens slots:

    prefill: all P prompt slots in one forward pass -> logits of the last slot -> first new token
    decode:  one token per step at slot P + i, inside a lax.while_loop that ends when every row has emitted an
             end-of-sequence token or max_new_tokens are out

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p (nucleus: the
smallest set of tokens whose probability reaches top_p), then a categorical draw with key fold_in(key(seed), i).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import UserError
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import Params, forward_cached, init_cache

_PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this: fewer recompilations


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [B] from logits [B, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token if the probability mass before it is still below top_p (the first token is always kept).
        keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_loop(cfg: ModelConfig, params: Params, tokens, segment_ids, positions, eos_ids, pad_id, key, *,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    """tokens / segment_ids / positions [B, P] (left-padded) -> (new tokens [B, max_new_tokens], lengths [B]).

    Traceable (the RL rollout runs it inside its pmapped sampler); token i is drawn with fold_in(key, i)."""
    B, P = tokens.shape
    cache = init_cache(cfg, B, P + max_new_tokens)
    logits, cache = forward_cached(cfg, params, tokens, cache, segment_ids, positions)
    first = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    lengths = jnp.zeros((B,), jnp.int32)
    done = jnp.zeros((B,), bool)
    next_pos = jnp.max(positions, axis=1) + 1  # [B]

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, done, out, lengths, cache, pos = state
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        logits, cache = forward_cached(cfg, params, token[:, None], cache, jnp.ones((B, 1), jnp.int32),
                                       pos[:, None])
        token = sample_logits(logits[:, 0], jax.random.fold_in(key, i + 1), temperature, top_k, top_p)
        return i + 1, token, done, out, lengths, cache, pos + 1

    state = (jnp.zeros((), jnp.int32), first, done, out, lengths, cache, next_pos)
    _, _, _, out, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(cfg: ModelConfig, params: Params, tokens, segment_ids, positions, eos_ids, pad_id, seed, **settings):
    return sample_loop(cfg, params, tokens, segment_ids, positions, eos_ids, pad_id, jax.random.key(seed), **settings)


def left_padded(prompts: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions) [B, length] of prompts left-padded to `length` (segment id 0 on padding,
    positions counting real tokens only)."""
    B = len(prompts)
    tokens = np.full((B, length), pad, np.int32)
    segment_ids = np.zeros((B, length), np.int32)
    positions = np.zeros((B, length), np.int32)
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[b, length - n:] = prompt
        segment_ids[b, length - n:] = 1
        positions[b, length - n:] = np.arange(n)
    return tokens, segment_ids, positions


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise UserError("generate: prompts must be a non-empty list of token-id lists")
    checked = []
    for b, prompt in enumerate(prompts):
        prompt = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not prompt:
            raise UserError(f"generate: prompt {b} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"generate: prompt {b} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        checked.append(prompt)
    return checked


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
             prompt_len: int = 0) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids); greedy by default.

    Each row stops after its first end-of-sequence token (included in the output, as transformers does);
    eos_token_ids defaults to cfg.eos_token_ids, and an empty tuple means never stop early. Prompts are
    left-padded to a multiple of 16 tokens, at least `prompt_len`: one compiled program serves every batch of that
    size (pass the longest prompt of a dataset when generating for it batch by batch).
    """
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, "
                        f"{top_p}, {top_k})")
    eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
    B = len(prompts)
    P = -(-max(prompt_len, *(len(p) for p in prompts)) // _PROMPT_BUCKET) * _PROMPT_BUCKET
    tokens, segment_ids, positions = left_padded(prompts, P, pad)
    out, lengths = _generate(cfg, params, tokens, segment_ids, positions,
                             np.asarray(eos if eos else (-1,), np.int32), np.int32(pad), np.uint32(seed),
                             max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                             top_p=float(top_p))
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[b, : lengths[b]].tolist() for b in range(B)]
