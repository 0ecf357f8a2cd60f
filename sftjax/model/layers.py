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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sftjax.model.config import ModelConfig
from sftjax.peft import quant

_INIT_STD = 0.02  # initializer_range of every HF Llama-family config


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qlinear(x: jax.Array, q: dict[str, jax.Array], out_features: int) -> jax.Array:
    """x [..., in] @ W^T -> [..., out], W [out, in] the 4-bit weight `q` (a qkernel of `sftjax.peft.quant`)
    dequantized in x's dtype.

    The backward pass dequantizes W again for dx = g @ W, as bitsandbytes' MatMul4Bit does, instead of keeping
    the dequantized W from the forward pass: only the 4-bit codes live between the passes, so QLoRA's training
    memory holds no full-precision copy of the frozen base (with autodiff, every layer's dequantized weights
    would be saved for the backward pass: as much memory as a float base). q gets no gradient: it is frozen.
    """
    return jnp.dot(x, _dequantized(q, out_features, x).T)


def _dequantized(q: dict[str, jax.Array], out_features: int, x: jax.Array) -> jax.Array:
    return quant.dequantize(q, (out_features, x.shape[-1]), x.dtype)  # [out, in]


def _qlinear_fwd(x, q, out_features):
    return jnp.dot(x, _dequantized(q, out_features, x).T), (x, q)


def _qlinear_bwd(out_features, residuals, g):
    x, q = residuals
    return jnp.dot(g, _dequantized(q, out_features, x)), None


qlinear.defvjp(_qlinear_fwd, _qlinear_bwd)


def lora_update(x: jax.Array, adapters: Sequence[tuple[jax.Array, jax.Array]], scale: float) -> list[jax.Array]:
    """The LoRA terms (x @ a_i * scale) @ b_i of adapters that read the same x [..., in]: a_i [in, R_i],
    b_i [R_i, out_i] -> one [..., out_i] each.

    Their first products are one matmul, h = x @ [a_1 ... a_n] * scale ([..., sum R_i]), split into the h_i: one
    thin matmul instead of n, and in the backward pass one dA = x^T [dh_1 ... dh_n] and one dx. The scale
    multiplies the rank-R intermediate, not the [..., out] product as PEFT writes it (x @ a @ b * scale): the same
    value up to rounding, without an elementwise pass over the layer's output in the forward pass and over its
    gradient in the backward pass.
    """
    h = linear(x, jnp.concatenate([a for a, _ in adapters], axis=1)) * jnp.asarray(scale, x.dtype)
    ranks = [a.shape[1] for a, _ in adapters]
    hs = jnp.split(h, np.cumsum(ranks)[:-1].tolist(), axis=-1) if len(adapters) > 1 else [h]  # [..., R_i] each
    return [linear(h_i, b) for h_i, (_, b) in zip(hs, adapters)]


def lora_merge_pays(m: int, n_in: int, n_out: int, rank: int) -> bool:
    """Whether a LoRA layer trains faster through its merged weight W + scale * A @ B than through the factors.

    FLOPs of one training step (forward and backward; a frozen W, so no dW), M = x's rows, r the rank:

        factored   y = x @ W + (x @ A * s) @ B   2 M in out + 3 M r (in + out)   (+ dx through B and A, dA, dB)
        merged     y = x @ (W + s A @ B)          3 M in out + 3 in r out        (dW' = x^T g once, then
                                                                                   dA = s dW' B^T, dB = s A^T dW')

    Merged pays when the rank is large against the layer (r > in out / (3 (in + out)) for large M: rank 64 on the
    main job's 128-wide layers) and M is large (training, not one-token decoding). Both give the same values and
    gradients up to float rounding.
    """
    return 3 * m * n_in * n_out + 3 * n_in * rank * n_out < 2 * m * n_in * n_out + 3 * m * rank * (n_in + n_out)


@dataclasses.dataclass(frozen=True)
class DenseWeights:
    """One linear layer's weights as `Dense.weights` reads them, ready for `dense`. Exactly one of kernel and
    qkernel is set; lora_x is set only while LoRA dropout is active."""

    features: int  # out
    kernel: jax.Array | None  # [in, out] in the compute dtype
    qkernel: dict[str, jax.Array] | None  # the same weight at 4 bits, torch order [out, in] (`sftjax.peft.quant`)
    bias: jax.Array | None  # [out]
    lora: tuple[jax.Array, jax.Array] | None  # a [in, R], b [R, out] in the compute dtype
    lora_x: jax.Array | None  # the adapter's own input dropout(x) [..., in]


class Dense(nn.Module):
    """y = x @ kernel (+ bias) (+ LoRA). The one linear layer of the model. Its parameters:

        kernel  [in, out]   float, stored in param_dtype, applied in the compute dtype; or instead
        qkernel {codes, ...} the same weight quantized to 4 bits (`sftjax.peft.quant`), dequantized on the fly
        bias    [out]       when use_bias
        lora_a  [in, R], lora_b [R, out]   optional LoRA adapter: y += (dropout(x) @ lora_a * lora_scale) @ lora_b

    The base paths stay the same with or without an adapter, so the HF name maps never fork. LoRA dropout
    (cfg.lora_dropout) is active only when a "dropout" rng is given (training). Layers that read the same input
    (q, k, v; gate, up) are applied together: `dense(x, [layer.weights(x) for layer in ...], cfg)`.
    """

    features: int
    use_bias: bool
    cfg: ModelConfig

    @nn.compact
    def weights(self, x: jax.Array) -> DenseWeights:
        """Declare (at init) and read this layer's parameters for the input x [..., in]."""
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kernel = qkernel = bias = lora = lora_x = None
        if self.has_variable("params", "qkernel"):  # frozen 4-bit base (QLoRA)
            qkernel = self.get_variable("params", "qkernel")
        else:
            kernel = self.param("kernel", nn.initializers.normal(_INIT_STD), (x.shape[-1], self.features),
                                param_dtype).astype(dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), param_dtype).astype(dtype)
        if self.has_variable("params", "lora_a"):
            lora = (self.get_variable("params", "lora_a").astype(dtype),  # [in, R]
                    self.get_variable("params", "lora_b").astype(dtype))  # [R, out]
            if cfg.lora_dropout > 0 and self.has_rng("dropout"):
                lora_x = nn.Dropout(cfg.lora_dropout, deterministic=False, name="lora_dropout")(x.astype(dtype))
        return DenseWeights(self.features, kernel, qkernel, bias, lora, lora_x)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        return dense(x, [self.weights(x)], self.cfg)[0]


def dense(x: jax.Array, ws: Sequence[DenseWeights], cfg: ModelConfig) -> list[jax.Array]:
    """Linear layers ws that read the same input: x [..., in] -> [x @ W_i (+ b_i) (+ LoRA_i) for each i], each
    [..., out_i] in the compute dtype.

    Each base weight is its own matmul. The LoRA adapters that read x itself (no dropout) go through one
    `lora_update`, which shares their first product x @ [A_1 ... A_n]. The base kernels stay apart: concatenated,
    they are no faster and LoRA is slower, since XLA keeps each layer's concatenated kernel for the backward pass
    (both measured: experiments/bench/README.md, "Design measurements"). Over a float32 kernel without dropout, a
    large-rank adapter is folded into its kernel, x @ (W + scale * A @ B), where that costs fewer FLOPs
    (`lora_merge_pays`).
    """
    dtype = jnp.dtype(cfg.dtype)
    x = rows_as_given(x.astype(dtype))
    ys, shared = [], []  # shared: (index, (a, b)) of the adapters that read x
    for w in ws:
        lora = w.lora
        if w.qkernel is not None:
            y = qlinear(x, w.qkernel, w.features)
        else:
            kernel = w.kernel
            if (lora is not None and w.lora_x is None and dtype == jnp.float32
                    and lora_merge_pays(math.prod(x.shape[:-1]), x.shape[-1], w.features, lora[0].shape[1])):
                # float32 only: in bfloat16 the merged weight would round the adapter's small update away
                kernel = kernel + jnp.dot(lora[0] * jnp.asarray(cfg.lora_scale, dtype), lora[1])
                lora = None  # folded into the kernel
            y = linear(x, kernel)
        if w.bias is not None:
            y = y + w.bias
        if lora is not None and w.lora_x is not None:  # its own dropout(x)
            y = y + lora_update(w.lora_x, [lora], cfg.lora_scale)[0]
        elif lora is not None:
            shared.append((len(ys), lora))
        ys.append(y)
    if shared:
        for (i, _), term in zip(shared, lora_update(x, [lora for _, lora in shared], cfg.lora_scale)):
            ys[i] = ys[i] + term
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
