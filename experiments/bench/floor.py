"""The matmul floor of the sftjax train step: every matmul the step runs, each timed alone through jax, summed.

If everything but the matmuls (norms, softmax, RoPE, the loss, the optimizer, copies) took no time, the step could
still be no faster than this sum. So tokens/s at the floor, set against the peer's measured tokens/s, says how far
sftjax could go without computing less; and floor / measured step time is the share of the step the matmuls
take. The list is what the step executes after `sftjax.model.layers.linear`'s and
`sftjax.model.attention.dot_product_attention`'s hand-written backward passes, per layer (x L) and once for the
lm_head, with M = B*T rows, in/out the widths of each linear layer, R the LoRA rank:

    linear (q, k, v, o, gate, up, down; lm_head)   forward  [M, in] @ [in, out]
                                                   input gradient  [M, out] @ [in, out]^T
                                                   weight gradient [M, in]^T @ [M, out]   (full fine-tuning only)
    LoRA adapter (LoRA / QLoRA, each target)       forward [M, in] @ [in, R], [M, R] @ [R, out]; backward
                                                   [M, out] @ [R, out]^T, [M, R]^T @ [M, out], [M, R] @ [in, R]^T,
                                                   [M, in]^T @ [M, R]
    attention, per (batch row, key head) and block of up to 128 queries (`causal_attention`): q [G*rows, H],
                                                   k and v [keys, H], keys = the positions up to the block's end;
                                                   forward q k^T, p v; backward (probabilities recomputed) q k^T,
                                                   p^T dO, dO v^T, dS k, dS^T q

Each dot runs on random operands of its exact shape and contraction (float32, or bfloat16 under --precision bf16),
jitted alone, median of `reps` after two warm-up calls. Dequantization (QLoRA) is not a matmul: QLoRA's floor is LoRA's.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, NamedTuple

from sftjax.model.config import ATTENTION_BLOCK

NN = (((1,), (0,)), ((), ()))  # [m, k] @ [k, n]
NT = (((1,), (1,)), ((), ()))  # [m, k] @ [n, k]^T
TN = (((0,), (0,)), ((), ()))  # [k, m]^T @ [k, n]
BNN = (((2,), (1,)), ((0,), (0,)))  # batched [b, m, k] @ [b, k, n]
BNT = (((2,), (2,)), ((0,), (0,)))  # batched [b, m, k] @ [b, n, k]^T
BTN = (((1,), (1,)), ((0,), (0,)))  # batched [b, k, m]^T @ [b, k, n]


class Dot(NamedTuple):
    name: str
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dims: Any  # lax.dot_general dimension_numbers
    count: int  # how many times one step runs it

    def flops(self) -> int:
        """2 x batch x m x k x n = 2 x (all of lhs) x (the rhs axes that are neither contracted nor batch)."""
        (_, rhs_contracting), (_, rhs_batch) = self.dims
        n = math.prod(size for i, size in enumerate(self.rhs) if i not in rhs_contracting + rhs_batch)
        return 2 * math.prod(self.lhs) * n


def step_dots(m: dict[str, Any], mode: str, batch: int, seq: int, rank: int) -> list[Dot]:
    """The matmuls of one train step of model config `m` (a ModelConfig as a dict) on a [batch, seq] batch."""
    L, D, N, K, H, F, V = (m[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                          "intermediate_size", "vocab_size"))
    M, T, G = batch * seq, seq, N // K
    linears = {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, D), "gate": (D, F), "up": (D, F),
               "down": (F, D)}
    dots = []

    def linear(name: str, n_in: int, n_out: int, count: int, weight_grad: bool) -> None:
        dots.append(Dot(f"{name} forward", (M, n_in), (n_in, n_out), NN, count))
        dots.append(Dot(f"{name} input grad", (M, n_out), (n_in, n_out), NT, count))
        if weight_grad:
            dots.append(Dot(f"{name} weight grad", (M, n_in), (M, n_out), TN, count))

    for name, (n_in, n_out) in linears.items():
        linear(name, n_in, n_out, L, mode == "full")
        if mode != "full":
            dots += [Dot(f"{name} lora x@a", (M, n_in), (n_in, rank), NN, L),
                     Dot(f"{name} lora h@b", (M, rank), (rank, n_out), NN, L),
                     Dot(f"{name} lora dh", (M, n_out), (rank, n_out), NT, L),
                     Dot(f"{name} lora db", (M, rank), (M, n_out), TN, L),
                     Dot(f"{name} lora dx", (M, rank), (n_in, rank), NT, L),
                     Dot(f"{name} lora da", (M, n_in), (M, rank), TN, L)]
    bk = batch * K
    for start in range(0, T, ATTENTION_BLOCK):  # `causal_attention`: a block of queries over the keys up to its end
        rows, keys = min(ATTENTION_BLOCK, T - start), min(start + ATTENTION_BLOCK, T)
        q, kv, p = (bk, G * rows, H), (bk, keys, H), (bk, G * rows, keys)
        dots += [Dot(f"attention q k^T (forward, and recomputed backward), keys {keys}", q, kv, BNT, 2 * L),
                 Dot(f"attention p v, keys {keys}", p, kv, BNN, L),
                 Dot(f"attention p^T dO, keys {keys}", p, q, BTN, L),
                 Dot(f"attention dO v^T, keys {keys}", q, kv, BNT, L),
                 Dot(f"attention dS k, keys {keys}", p, kv, BNN, L),
                 Dot(f"attention dS^T q, keys {keys}", p, q, BTN, L)]
    linear("lm_head", D, V, 1, mode == "full")
    return dots


def time_dot(dot: Dot, reps: int, dtype: str = "float32") -> float:
    """Median seconds of one jitted dot_general of this shape in `dtype` (after 2 warm-up calls)."""
    import jax

    lhs = jax.random.normal(jax.random.key(0), dot.lhs, dtype)
    rhs = jax.random.normal(jax.random.key(1), dot.rhs, dtype)
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dot.dims))
    for _ in range(2):
        fn(lhs, rhs).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(lhs, rhs).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_floor(m: dict[str, Any], mode: str, batch: int, seq: int, rank: int, reps: int,
                 dtype: str = "float32") -> dict[str, Any]:
    """{"floor_s": sum of count x time alone, "flops": matmul FLOPs of the step, "dots": per dot figures}; the
    dots in `dtype` (the step's compute dtype; LoRA's float32 adapters are cast to it too)."""
    rows = []
    for dot in step_dots(m, mode, batch, seq, rank):
        seconds = time_dot(dot, reps, dtype)
        rows.append({"name": dot.name, "lhs": dot.lhs, "rhs": dot.rhs, "count": dot.count, "seconds": seconds,
                     "flops": dot.flops(), "gflops": dot.flops() / seconds / 1e9})
    return {"mode": mode, "floor_s": sum(r["seconds"] * r["count"] for r in rows),
            "flops": sum(r["flops"] * r["count"] for r in rows), "dots": rows}
