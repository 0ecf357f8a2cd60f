"""Memory of a frozen base in each storage format, and LoRA trainable-parameter counts (the README's table).

    python experiments/memory/report.py            # presets + Llama-3.1-8B shapes; bench-llama measured

Byte counts come from `quant.memory_report` (exact layout arithmetic: codes, 8-bit absmax codes, float32 scales
and offsets, the 16-entry tables); for bench-llama the base is also quantized for real and the bytes of the
resulting tree are measured and compared. Linear weights of the decoder layers are quantized; embeddings, norms
and lm_head stay float (model.param_dtype: float32 on CPU, bfloat16 on GPU; both columns are given).
"""

from __future__ import annotations

import jax
import numpy as np

from sftjax.model.config import PRESETS, ModelConfig
from sftjax.model.transformer import init_params, param_shapes
from sftjax.peft import lora, quant

LLAMA_31_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128)
MODELS = {"bench-llama": PRESETS["bench-llama"], "llama-3.2-1b": PRESETS["llama-3.2-1b"],
          "llama-3.1-8b (shapes)": LLAMA_31_8B}
GiB = 2**30


def trainable(cfg: ModelConfig, rank: int) -> int:
    spec = lora.LoraSpec(rank=rank, target_modules="all-linear")
    shapes = jax.eval_shape(lambda: lora.init_adapters(cfg, spec, jax.random.key(0)))
    return lora.count(shapes)


def main() -> None:
    print("| model | params | float32 | bfloat16 | linear weights at nf4+dq (bits/param) | nf4 no dq (bits/param) | "
          "whole base: linears nf4+dq, rest float32 / bfloat16 | LoRA r=16 all-linear trainable |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, cfg in MODELS.items():
        m = quant.memory_report(param_shapes(cfg))
        q = m["quantized_params"]
        linears_dq = q * m["dq_bits_per_param"] / 8
        t = trainable(cfg, 16)
        rest_bf16 = linears_dq + 2 * (m["params"] - q)
        print(f"| {name} | {m['params'] / 1e6:,.1f}M | {m['float32_bytes'] / GiB:.3f} GiB | "
              f"{m['bfloat16_bytes'] / GiB:.3f} GiB | {linears_dq / GiB:.3f} GiB ({m['dq_bits_per_param']:.4f}) | "
              f"{m['bits_per_param']:.4f} | {m['nf4_dq_bytes'] / GiB:.3f} / {rest_bf16 / GiB:.3f} GiB | "
              f"{t / 1e6:.2f}M ({t / m['params']:.2%}) |")
    cfg = PRESETS["bench-llama"]
    params = init_params(cfg, jax.random.key(0))
    measured = quant.tree_bytes(quant.quantize_params(params, "nf4", double_quant=True))
    predicted = quant.memory_report(params)["nf4_dq_bytes"]
    print(f"\nbench-llama quantized for real: tree {measured:,} bytes; layout arithmetic {predicted:,.0f} bytes")
    assert np.isclose(measured, predicted), "the layout arithmetic does not match the quantized tree"


if __name__ == "__main__":
    main()
