"""The adapted linear layer: LoRA adapters and the 4-bit frozen base, plugged into the model's Dense.

The model (`sftjax.model.layers.Dense`) knows one weight, `kernel` [in, out], and y = x @ kernel (+ bias). A
LoRA or QLoRA run gives the model `AdaptedLinear` as its linear plug-in (`ModelConfig.linear`, set by
`lora.model_config`); the plug-in then reads each Dense's parameters as the tree holds them and applies them:

    kernel  [in, out]      the float weight, as the plain model; or instead
    qkernel {codes, ...}   the same weight at 4 bits (`sftjax.peft.quant`), dequantized on the fly (QLoRA)
    bias    [out]          when the layer has one
    lora_a  [in, R], lora_b [R, out]   an adapter: y += (dropout(x) @ lora_a * scale) @ lora_b

The parameter paths are the model's own plus lora_a / lora_b (or qkernel for kernel), so the HF name maps never
fork, and a Dense without an adapter runs exactly as in the plain model. Adapter dropout is active only when a
"dropout" rng is given (training); its mask comes from the Dense's `lora_dropout` scope, one key per layer.

Speed (what `apply` keeps from the plain model, and adds):
  * the adapters of layers that read the same input (q, k, v; gate, up) share their first product
    x @ [A_1 ... A_n] (`lora_update`), one thin matmul instead of n;
  * the base kernels stay apart: concatenated they are no faster, and LoRA is slower (XLA keeps each layer's
    concatenated kernel for the backward pass);
  * over a float32 kernel without dropout, a large-rank adapter is folded into its kernel, x @ (W + s A @ B),
    where that costs fewer FLOPs (`lora_merge_pays`);
  * a 4-bit weight is dequantized again in the backward pass (`qlinear`), so only the codes live between passes.
(The measurements: experiments/bench/README.md, "Design measurements".)
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

from sftjax.model.layers import linear
from sftjax.peft import quant


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qlinear(x: jax.Array, q: dict[str, jax.Array], out_features: int) -> jax.Array:
    """x [..., in] @ W^T -> [..., out], W [out, in] the 4-bit weight `q` (a qkernel of `sftjax.peft.quant`)
    dequantized in x's dtype.

    The backward pass dequantizes W again for dx = g @ W, as bitsandbytes' MatMul4Bit does, instead of keeping
    the dequantized W from the forward pass: only the 4-bit codes live between the passes, so QLoRA's training
    memory holds no full-precision copy of the frozen base (with autodiff, every layer's dequantized weights
    would be saved for the backward pass: as much memory as a float base). q gets no gradient: it is frozen.
    """
    return jnp.dot(x, dequantized(q, out_features, x).T)


def dequantized(q: dict[str, jax.Array], out_features: int, x: jax.Array) -> jax.Array:
    """The 4-bit weight q as [out, in] in x's dtype."""
    return quant.dequantize(q, (out_features, x.shape[-1]), x.dtype)


def _qlinear_fwd(x, q, out_features):
    return jnp.dot(x, dequantized(q, out_features, x).T), (x, q)


def _qlinear_bwd(out_features, residuals, g):
    x, q = residuals
    return jnp.dot(g, dequantized(q, out_features, x)), None


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
class AdaptedWeights:
    """One linear layer's weights as `AdaptedLinear.weights` reads them. Exactly one of kernel and qkernel is
    set; lora_x is set only while adapter dropout is active."""

    features: int  # out
    kernel: jax.Array | None  # [in, out] in the compute dtype
    qkernel: dict[str, jax.Array] | None  # the same weight at 4 bits, torch order [out, in] (`sftjax.peft.quant`)
    bias: jax.Array | None  # [out]
    lora: tuple[jax.Array, jax.Array] | None  # a [in, R], b [R, out] in the compute dtype
    lora_x: jax.Array | None  # the adapter's own input dropout(x) [..., in]


@dataclasses.dataclass(frozen=True)
class AdaptedLinear:
    """The model's linear plug-in for LoRA and QLoRA trees (see the module docstring). Hashable: it is part of
    the static model config that jit keys on."""

    scale: float | None = None  # the adapters' alpha / r (rsLoRA: alpha / sqrt(r)); None: a tree without adapters
    dropout: float = 0.0  # on the adapters' input, training only

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout {self.dropout!r}: must be in [0, 1)")

    @property
    def stochastic(self) -> bool:
        """Whether training needs the "dropout" rng."""
        return self.dropout > 0

    def weights(self, module: nn.Module, x: jax.Array) -> AdaptedWeights:
        """Declare (at init) and read the parameters of the Dense `module` for the input x [..., in]. Called from
        inside the module's compact method, so the dropout below is its submodule `lora_dropout`."""
        dtype = jnp.dtype(module.cfg.dtype)
        qkernel = lora = lora_x = None
        if module.has_variable("params", "qkernel"):  # frozen 4-bit base (QLoRA)
            qkernel = module.get_variable("params", "qkernel")
        kernel, bias = module.kernel_and_bias(x, kernel=qkernel is None)
        if module.has_variable("params", "lora_a"):
            if self.scale is None:
                raise ValueError(f"{'/'.join(module.scope.path)}: holds adapters, but no LoRA spec gave their "
                                 "scale: run it under `sftjax.peft.lora.model_config(cfg, spec)`")
            lora = (module.get_variable("params", "lora_a").astype(dtype),  # [in, R]
                    module.get_variable("params", "lora_b").astype(dtype))  # [R, out]
            if self.dropout > 0 and module.has_rng("dropout"):
                lora_x = nn.Dropout(self.dropout, deterministic=False, name="lora_dropout")(x.astype(dtype))
        return AdaptedWeights(module.features, kernel, qkernel, bias, lora, lora_x)

    def apply(self, x: jax.Array, ws: Sequence[AdaptedWeights]) -> list[jax.Array]:
        """Linear layers ws that read the same input x [..., in] (compute dtype) -> [x @ W_i (+ b_i) (+ LoRA_i)],
        each [..., out_i]. See the module docstring for what is shared and what is merged."""
        dtype = x.dtype
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
                    kernel = kernel + jnp.dot(lora[0] * jnp.asarray(self.scale, dtype), lora[1])
                    lora = None  # folded into the kernel
                y = linear(x, kernel)
            if w.bias is not None:
                y = y + w.bias
            if lora is not None and w.lora_x is not None:  # its own dropout(x)
                y = y + lora_update(w.lora_x, [lora], self.scale)[0]
            elif lora is not None:
                shared.append((len(ys), lora))
            ys.append(y)
        if shared:
            for (i, _), term in zip(shared, lora_update(x, [lora for _, lora in shared], self.scale)):
                ys[i] = ys[i] + term
        return ys
