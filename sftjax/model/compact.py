"""Padding-free layers: the per-token work of the decoder on the batch's real tokens only.

A packed or padded batch [B, T] holds padding slots (segment id 0): rows of 512 packed with examples of ~300
tokens are a quarter padding, a batch of unpacked chats often half. Every layer but attention works token by
token (the projections, the MLP, the norms, RoPE, the adapters), so those slots cost their share of the step for
nothing. Given `token_index` [M] (the flat positions of the batch's real tokens, computed host side by the
objective: `objectives/sft.py: token_index`), the decoder gathers the embeddings of those M tokens into one row
[1, M, D] and runs the layers on it; only attention needs the rows back: its q, k, v are laid into the [B, T] slots
(zeros at the padding slots, which attend only to each other: segment 0) and its output gathered back. The final
hidden states are laid back into [B, T, D], zeros at the padding slots, so the caller sees the same shapes as
without the index.

M is rounded up to one of a few sizes (`sft.TOKEN_FRACTIONS` of the B*T slots), so a run compiles its step for a
few shapes at most. Both ways are gathers (`_permute`): token_index [M] lists the real slots (B*T, out of range,
at its padding entries), token_slot [B*T] each slot's place in it (M, out of range, at the padding slots); an
out-of-range entry reads zeros, and each gather's gradient is the gather the other way. The values are those of
the dense path up to float32 summation order (the matmuls see M rows instead of B*T); the padding slots' hidden
states are zeros instead of values nobody reads, and dropout draws its masks over [1, M, D] instead of [B, T, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [n, ...] at index [m] -> [m, ...]; zeros where the index is out of range."""
    return x.at[index].get(mode="fill", fill_value=0)


@jax.custom_vjp
def _permute(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [n, ...] at index [m] (zeros out of range), where index and inverse [n] are each other's inverse on the
    entries in range. The gradient is the gather the other way (not the scatter-add autodiff would make: XLA:CPU
    runs a scatter element by element)."""
    return _take(x, index)


def _permute_fwd(x, index, inverse):
    return _take(x, index), (index, inverse)


def _permute_bwd(residuals, ct):
    index, inverse = residuals
    return _take(ct, inverse), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def gather(x: jax.Array, index: jax.Array, slot: jax.Array) -> jax.Array:
    """x [B, T, ...] at the real tokens -> [1, M, ...] (zeros at the padding entries)."""
    x = jnp.asarray(x)
    return _permute(x.reshape(-1, *x.shape[2:]), index, slot)[None]


def scatter(x: jax.Array, index: jax.Array, slot: jax.Array, B: int, T: int) -> jax.Array:
    """x [1, M, ...] laid into [B, T, ...] (zeros at the padding slots): `gather`'s inverse."""
    return _permute(x[0], slot, index).reshape(B, T, *x.shape[2:])
