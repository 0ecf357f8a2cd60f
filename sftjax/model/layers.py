"""Building blocks: Dense, RMSNorm, rotary position embeddings, activations.

Parameter names follow Flax (`kernel`, `bias`, `scale`, `embedding`); `sftjax.model.hf` maps them to HF names.
Kernels are stored [in, out] (torch Linear stores [out, in]).

Numerics follow transformers: RMSNorm normalises in float32; RoPE angles are computed in float32 and cast to the
compute dtype; matmuls run in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sftjax.model.config import ModelConfig

INIT_STD = 0.02  # initializer_range of every HF Llama-family config


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out], with its backward pass written as two 2-D matmuls:

        dx = g @ w^T                                  [..., out] x [out, in] -> [..., in]
        dw = x2^T @ g2    (x2 [M, in], g2 [M, out]: the leading axes flattened, M = prod(...))

    Autodiff of the same dot contracts dw over the leading axes as a multi-dimensional dot_general, and XLA:CPU
    then writes the output gradient out a second time, transposed, before the weight-gradient dot (a copy the
    size of the activations per linear layer); the explicit form saves that copy (measured: experiments/bench/
    README.md, "Design measurements"). The results are the same dots, bit for bit. An unused dw (a frozen weight)
    is removed by XLA.
    """
    return jnp.dot(x, w)


def _linear_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _linear_bwd(residuals, g):
    x, w = residuals
    dx = jnp.dot(g, w.T)
    dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd)


class LinearPlugin(Protocol):
    """How Dense layers read and apply their weights when the tree holds more than a kernel and a bias: set as
    `ModelConfig.linear` (`sftjax.peft.adapted.AdaptedLinear`: LoRA adapters, a 4-bit frozen base). Hashable, as
    the config is a jit static argument. (The field is typed Any: model/config.py cannot import this module.)"""

    stochastic: bool  # training needs the "dropout" rng

    def weights(self, module: Dense, x: jax.Array) -> Any:
        """Declare and read the parameters of `module` for x [..., in]; runs inside its compact method."""

    def apply(self, x: jax.Array, ws: Sequence[Any]) -> list[jax.Array]:
        """x [..., in] in the compute dtype, the weights of layers that read it -> one [..., out_i] each."""


@dataclasses.dataclass(frozen=True)
class DenseWeights:
    """One linear layer's weights as `Dense.weights` reads them, ready for `dense`."""

    kernel: jax.Array  # [in, out] in the compute dtype
    bias: jax.Array | None  # [out]


class Dense(nn.Module):
    """y = x @ kernel (+ bias). The one linear layer of the model. Its parameters:

        kernel  [in, out]   float, stored in param_dtype, applied in the compute dtype
        bias    [out]       when use_bias

    A linear plug-in (cfg.linear) reads and applies them instead, with whatever else the tree holds at this path
    (adapters, a quantized kernel); the paths of kernel and bias stay the same, so the HF name maps never fork.
    Layers that read the same input (q, k, v; gate, up) are applied together:
    `dense(x, [layer.weights(x) for layer in ...], cfg)`.
    """

    features: int
    use_bias: bool
    cfg: ModelConfig

    @nn.compact
    def weights(self, x: jax.Array) -> Any:
        """Declare (at init) and read this layer's parameters for the input x [..., in]."""
        cfg = self.cfg
        if cfg.linear is not None:
            return cfg.linear.weights(self, x)
        held = sorted(self.variables.get("params", {}))
        if not self.is_initializing() and not {"kernel"} <= set(held) <= {"kernel", "bias"}:
            raise ValueError(f"{'/'.join(self.scope.path)}: holds {held}, not a kernel and bias; a tree with "
                             "adapters or 4-bit kernels runs under `sftjax.peft.lora.model_config(cfg[, spec])`")
        return DenseWeights(*self.kernel_and_bias(x))

    def kernel_and_bias(self, x: jax.Array, kernel: bool = True) -> tuple[jax.Array | None, jax.Array | None]:
        """Declare (at init) and read kernel [in, out] (unless kernel=False) and bias [out] (None without one), in
        the compute dtype. Runs inside `weights` (a plug-in calls it for the parameters it keeps as they are)."""
        dtype, param_dtype = jnp.dtype(self.cfg.dtype), jnp.dtype(self.cfg.param_dtype)
        w = b = None
        if kernel:
            w = self.param("kernel", nn.initializers.normal(INIT_STD), (x.shape[-1], self.features),
                           param_dtype).astype(dtype)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,), param_dtype).astype(dtype)
        return w, b

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        return dense(x, [self.weights(x)], self.cfg)[0]


def dense(x: jax.Array, ws: Sequence[Any], cfg: ModelConfig) -> list[jax.Array]:
    """Linear layers ws that read the same input: x [..., in] -> [x @ W_i (+ b_i) for each i], each [..., out_i]
    in the compute dtype (through cfg.linear when set).

    Each weight is its own matmul: concatenated kernels are no faster (measured: experiments/bench/README.md,
    "Design measurements"). A plug-in may share work between the layers (LoRA's first products).
    """
    x = rows_as_given(x.astype(jnp.dtype(cfg.dtype)))
    if cfg.linear is not None:
        ys = cfg.linear.apply(x, ws)
    else:
        ys = [linear(x, w.kernel) if w.bias is None else linear(x, w.kernel) + w.bias for w in ws]
    return [rows_as_given(y) for y in ys]


def rows_as_given(x: jax.Array) -> jax.Array:
    """x, unchanged; under a device mesh (`jax.set_mesh`: the sharded step, `train/sharded.py`) also pinned to
    stay split as its rows are, every other axis left to XLA. The sharded step vmaps the model over groups of rows
    with `spmd_axis_name`, which turns this into "split over the groups": without it, XLA's partitioner may gather
    every group's activations onto every device instead of the weights (at 64 devices, experiments/memory)."""
    mesh = jax.sharding.get_abstract_mesh()  # inside pmap (a shard_map) its axes are Manual: nothing to pin
    if mesh.empty or jax.sharding.AxisType.Auto not in mesh.axis_types:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*[PartitionSpec.UNCONSTRAINED] * x.ndim))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, normalised in float32; Gemma scales by (1 + w) (w initialised to 0)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        dtype, plus_one = jnp.dtype(self.cfg.dtype), self.cfg.norm_plus_one
        init = nn.initializers.zeros if plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.dtype(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        if plus_one:  # Gemma: (x * (1 + w)) in float32, then cast
            return (y * (1.0 + scale.astype(jnp.float32))).astype(dtype)
        return scale.astype(dtype) * y.astype(dtype)  # Llama: cast, then scale


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_activation(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up, the GLU of the MLP (SwiGLU, GeGLU). gate, up [..., F] -> [..., F]

    Differentiated by hand so that the backward pass keeps only gate and up (2 arrays of [B, T, F] per layer)
    and recomputes act(gate) from them; autodiff of the composition keeps the activation's intermediates too (4
    arrays for silu), and the extra residual traffic costs more than the recomputation.
    """
    return activation(name, gate) * up


def _gated_activation_fwd(name, gate, up):
    return gated_activation(name, gate, up), (gate, up)


def _gated_activation_bwd(name, residuals, g):
    gate, up = residuals
    act, act_vjp = jax.vjp(lambda x: activation(name, x), gate)
    (d_gate,) = act_vjp(g * up)
    return d_gate, g * act


gated_activation.defvjp(_gated_activation_fwd, _gated_activation_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half layout, as in HF checkpoints).


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in float32, with the config's RoPE scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv_freq = inv_freq.astype(np.float32)
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":  # Llama 3.1: scale long wavelengths, interpolate the middle band
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_len = cfg.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, heads, H] by the angles positions [B, T] x inv_freq [H/2]."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
