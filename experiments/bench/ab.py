"""A/B of sftjax train-step variants in one process: compiled side by side, their steps alternating.

    python experiments/bench/ab.py                                   # current vs five reverted choices, full
    python experiments/bench/ab.py --mode lora --variants current,lora_scale_output
    python experiments/bench/ab.py --mode lora --variants current,autodiff_linear --steps 12
    python experiments/bench/ab.py --mode lora --variants current,unfused_projections --steps 12
    python experiments/bench/ab.py --mode qlora --variants current,pre_seam --steps 12  # the objective seam
    python experiments/bench/ab.py --main-job --variants current,factored_lora --steps 24  # the main job's step

On a shared or noisy machine two runs of the same step can differ by 10-20% (experiments/bench/README.md), more
than most single optimisations. Alternating the variants' steps on the same batches in one process puts both
under the same machine state, so their ratio is what changed. Every variant builds the trainer's own step
(`jax_side.Runner`) on the bench config; a variant is the current code with one choice reverted by swapping a
function before its step is traced:

    current             the code as committed
    autodiff_linear     linear layers differentiated by JAX (jnp.dot) instead of `layers.linear`'s hand-written VJP
    autodiff_glu        the GLU as act(gate) * up differentiated by JAX instead of `layers.gated_activation`
    autodiff_attention  attention as two einsums differentiated by JAX instead of the hand-written VJP of
                        `attention.dot_product_attention` (autodiff keeps the float32 probabilities of every layer;
                        still in causal blocks)
    no_causal_blocks    attention over all T x T query-key pairs instead of `attention.causal_attention`'s
                        blocks (of `model.attention_block` queries) that skip the masked upper triangle of blocks
    block_32            causal blocks of 32 queries instead of `model.attention_block` (default 128)
    select_mask         autodiff_attention, masked by a select per layer instead of the additive bias
    lora_scale_output   LoRA / QLoRA: the scale applied to the [..., out] product (PEFT's order) instead of the
                        rank-R intermediate (`adapted.lora_update`); the same as current under full fine-tuning
    saved_dequant       QLoRA: the dequantized 4-bit weight differentiated by JAX, which keeps every layer's
                        dequantized weights for the backward pass, instead of `adapted.qlinear`, which
                        dequantizes again there; the same as current under full fine-tuning and LoRA
    pair_lookup         QLoRA: dequantization gathers each byte's two values from a [256, 2] table instead of
                        looking up each 4-bit code in the 16-entry table (`quant._code_values`)
    argmax_correct      the accuracy metric from argmax over the vocabulary instead of `sft.token_nll`'s
                        target-logit >= max comparison
    factored_lora       LoRA: every adapter as x @ W + (x @ A * s) @ B, never through the merged weight
                        W + s A @ B where that costs fewer FLOPs (`adapted.lora_merge_pays`: large ranks, e.g.
                        `--preset builtin --rank 64`, the main job's LoRA; the bench config's rank 16 is factored)
    unfused_projections LoRA / QLoRA: the adapters of q, k, v (and of gate, up) each with its own x @ A instead of
                        `AdaptedLinear.apply`'s one x @ [A_q A_k A_v]; the same as current under full fine-tuning
    pre_seam            the train step as it was before objectives became plug-ins: SFT's sums called by name,
                        its three metrics only, instead of `step.train_step` asking the objective for sums and
                        metrics (the same program up to the metrics it returns)
    select_guard        the finite guard as jnp.where(finite, new, old) over the state instead of
                        `step.apply_sums`'s lax.cond (a select keeps both states among the temporaries)
    scan_layers         the layers under lax.scan (`model.scan_layers=true`) whatever the run's setting
    unrolled_layers     the layers unrolled (`model.scan_layers=false`) whatever the run's setting

--main-job builds the main job's step (conf/experiment/main.yaml): the built-in base's architecture (random
weights; its 4 layers unrolled, as conf/model/builtin.yaml runs them), LoRA rank 64 (alpha 128) on every linear
with the tied embedding and the norms trained too, batch 32 x 128, and packed rows as its tasks give them
(`main_job_batches`: segments of 8-26 tokens, the last fifth of each trained, so the SFT objective computes the
logits at ~900 labeled positions of 4096: `sft.label_index`).

Prints per variant: median step seconds and tokens/s over the steps after --warmup, the loss of the first and
last step (variants compute the same thing: the losses agree to float32 rounding), and XLA's temp buffer size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_side  # noqa: E402
import workers  # noqa: E402
from sftjax.job.base import base_config  # noqa: E402
from sftjax.model import attention, layers, transformer  # noqa: E402
from sftjax.model.config import PRESETS  # noqa: E402
from sftjax.objectives import sft  # noqa: E402
from sftjax.peft import adapted, quant  # noqa: E402
from sftjax.train import step  # noqa: E402
from sftjax.train.state import merge_params  # noqa: E402


def _autodiff_attention(q, k, v, bias, select=False):
    """dot_product_attention as it was before its hand-written VJP: two einsums in [B, K, G, T, S], autodiff.
    select=True: masked by where(bias == 0, logits, float32 min), as before the additive bias."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    logits = (jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * (H**-0.5)).astype(jnp.float32)
    if select:
        logits = jnp.where((bias == 0)[:, None, None], logits, jnp.finfo(jnp.float32).min)
    else:
        logits = logits + bias[:, None, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)


def _pair_lookup_values(q, n):
    """quant._code_values as it was before the 16-entry lookup: each byte's two values gathered from a [256, 2]
    table."""
    pair_index = np.stack([np.arange(256) >> 4, np.arange(256) & 15], axis=-1)  # byte -> its (high, low) codes
    pairs = jnp.asarray(q["table"], jnp.float32)[pair_index]  # [256, 2]
    return pairs[q["codes"]].reshape(-1)[:n]


_token_nll = sft.token_nll  # the committed functions, kept before a variant patches them
_causal_attention = attention.causal_attention
_lora_update = adapted.lora_update


def _lora_scale_output(x, adapters, scale):
    """lora_update with the scale on each [..., out] product (PEFT's order) instead of the rank-R intermediate."""
    return [y * jnp.asarray(scale, x.dtype) for y in _lora_update(x, adapters, 1.0)]


def _argmax_token_nll(logits, targets):
    """token_nll as it was: correct from argmax over the vocabulary (a (value, index) reduction)."""
    nll, _ = _token_nll(logits, targets)
    return nll, jnp.argmax(logits, axis=-1) == targets


def _unfused_dense(x, ws, cfg):
    """layers.dense applied to one layer at a time: each adapter its own x @ A."""
    return [y for w in ws for y in layers.dense(x, [w], cfg)]


def _select_apply_sums(state, grads, sums, *, objective, optimizer, lr_schedule):
    """step.apply_sums with the finite guard as a select of the new state against the old (before the cond)."""
    import optax

    trainable = state["trainable"]
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = sums["loss"] / weight
    updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = {"step": state["step"] + 1, "trainable": jax.tree.map(keep, new_trainable, trainable),
                 "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]), "rng": state["rng"]}
    return new_state, {**objective.metrics(sums), "loss": loss, "grad_norm": optax.tree.norm(grads),
                       "lr": lr_schedule(state["step"]), "finite": finite.astype(jnp.float32)}


def _pre_seam_train_step(state, frozen, refs, batch, *, objective, optimizer, lr_schedule):
    """step.train_step before the objective seam: sft_sums by name, metrics loss / accuracy / tokens."""

    trainable = state["trainable"]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]),
                             jax.lax.axis_index(step.AXIS))

    def loss_fn(trainable, micro, rng):
        sums = sft.sft_sums(objective.cfg, merge_params(frozen, trainable), micro, rng, len(objective.tasks))
        return sums["loss"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
        index, micro = xs
        grads, sums = grad_fn(trainable, micro, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    sums_shape = jax.eval_shape(lambda: loss_fn(trainable, jax.tree.map(lambda x: x[0], batch), None)[1])
    init = (jax.tree.map(jnp.zeros_like, trainable), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(accumulate, init, (jnp.arange(batch["tokens"].shape[0]), batch))
    grads, sums = jax.lax.psum((grads, sums), step.AXIS)
    tokens = jnp.maximum(sums["weight"], 1.0)
    new_state, metrics = _select_apply_sums(state, grads, sums, objective=objective, optimizer=optimizer,
                                            lr_schedule=lr_schedule)
    return new_state, {"loss": metrics["loss"], "accuracy": sums["correct"] / tokens, "tokens": sums["weight"],
                       **{k: metrics[k] for k in ("grad_norm", "lr", "finite")}}


def main_job_batches(n: int, b: int, T: int, vocab: int, seed: int) -> list[dict[str, np.ndarray]]:
    """n step batches [1, 1, b, T] shaped like the main job's: rows packed with short examples (8-26 tokens, the
    last fifth of each, at least 2, trained; positions restart per example; three tasks), the SFT objective's
    label_index added (`sft.label_index`)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(3, vocab, (b, T + 1)).astype(np.int32)
        segment, position, mask, task = (np.zeros((b, T), np.int32) for _ in range(4))
        for row in range(b):
            start, number = 0, 1
            while start < T:
                length = min(int(rng.integers(8, 27)), T - start)
                end = start + length
                segment[row, start:end], task[row, start:end] = number, rng.integers(0, 3)
                position[row, start:end] = np.arange(length)
                mask[row, end - max(2, length // 5):end] = 1
                start, number = end, number + 1
        batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask.astype(np.float32),
                 "segment_ids": segment, "positions": position, "task_ids": task}
        batch = {k: v[None, None] for k, v in batch.items()}
        out.append(sft.with_label_index(batch))
    return out


# variant -> [(module, attribute, replacement)]
VARIANTS = {
    "current": [],
    "autodiff_linear": [(layers, "linear", jnp.dot), (transformer, "linear", jnp.dot)],
    "autodiff_glu": [(transformer, "gated_activation", lambda name, gate, up: layers.activation(name, gate) * up)],
    "autodiff_attention": [(attention, "dot_product_attention", _autodiff_attention)],
    "no_causal_blocks": [(attention, "causal_attention", lambda q, k, v, bias, block: attention.dot_product_attention(
        q, k, v, bias))],
    "block_32": [(attention, "causal_attention", lambda q, k, v, bias, block: _causal_attention(q, k, v, bias, 32))],
    "select_mask": [(attention, "dot_product_attention", functools.partial(_autodiff_attention, select=True))],
    "lora_scale_output": [(adapted, "lora_update", _lora_scale_output)],
    "saved_dequant": [(adapted, "qlinear", lambda x, q, out: layers.linear(x, adapted.dequantized(q, out, x).T))],
    "pair_lookup": [(quant, "_code_values", _pair_lookup_values)],
    "argmax_correct": [(sft, "token_nll", _argmax_token_nll)],
    "factored_lora": [(adapted, "lora_merge_pays", lambda *shape: False)],
    "unfused_projections": [(attention, "dense", _unfused_dense), (transformer, "dense", _unfused_dense)],
    "pre_seam": [(step, "train_step", _pre_seam_train_step)],
    "select_guard": [(step, "apply_sums", _select_apply_sums)],
}

# variant -> model config fields it changes (a policy, not a function)
CONFIG_VARIANTS = {
    "scan_layers": {"scan_layers": True},
    "unrolled_layers": {"scan_layers": False},
}


@contextlib.contextmanager
def patched(variant: str):
    swaps = VARIANTS.get(variant, [])
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, value in swaps:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="full", choices=["full", "lora", "qlora"])
    ap.add_argument("--variants", default="current,autodiff_linear,autodiff_glu,autodiff_attention,"
                                          "no_causal_blocks,select_mask")
    ap.add_argument("--preset", default="bench-llama", help="a model preset, or `builtin`: the main job's base")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default 8; --main-job: 32)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 256; --main-job: 128)")
    ap.add_argument("--steps", type=int, default=10, help="steps per variant, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--main-job", action="store_true", help="the main job's step (sets --mode, --preset, --rank; "
                    "see above)")
    args = ap.parse_args(argv)
    if args.main_job:
        args.mode, args.preset, args.rank = "lora", "builtin", 64
    args.batch = args.batch or (32 if args.main_job else 8)
    args.seq = args.seq or (128 if args.main_job else 256)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in CONFIG_VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted([*VARIANTS, *CONFIG_VARIANTS])}")
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    preset = base_config(4096) if args.preset == "builtin" else PRESETS[args.preset]
    model_cfg = dataclasses.replace(preset, dtype="float32", param_dtype="float32")
    cfg = jax_side.train_config("unused", args.mode, args.rank, 2.0 * args.rank, 1e-4)
    if args.main_job:
        model_cfg = dataclasses.replace(model_cfg, scan_layers=False)  # conf/model/builtin.yaml: 4 layers unrolled
        cfg.method.lora.trainable_modules = ("embed_tokens", "norm")
        batches = main_job_batches(3, args.batch, args.seq, model_cfg.vocab_size, 0)
    else:
        batches = [jax_side.sftjax_batch(*b) for b in workers.batches(3, args.batch, args.seq, model_cfg.vocab_size,
                                                                      0)]
    runners = {}
    for name in names:
        with patched(name):  # the step is traced and compiled here, with the variant's functions
            model = jax_side.random_model(cfg, dataclasses.replace(model_cfg, **CONFIG_VARIANTS.get(name, {})))
            objective = sft.SFT(model.cfg, ("module", "first_param", "add")) if args.main_job else None
            runner = jax_side.Runner(cfg, model, objective)
            runner.compile(batches[0])
        runners[name] = runner
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    for i in range(args.steps):
        for name in names:
            start = time.perf_counter()
            losses[name].append(runners[name].step(batches[i % len(batches)]))
            times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    print(f"{'main job: ' if args.main_job else ''}{args.mode} (rank {args.rank}), {args.preset}, "
          f"batch {args.batch} x {args.seq}; "
          f"medians of {args.steps - args.warmup} alternating steps after {args.warmup}")
    base = "current" if "current" in names else names[0]
    print(f"| variant | step s | tokens/s | speed vs {base} | loss first / last | XLA temp MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    ref = float(np.median(times[base][args.warmup:]))
    for name in names:
        t = float(np.median(times[name][args.warmup:]))
        print(f"| {name} | {t:.3f} | {tokens / t:.0f} | {ref / t:.2f}x | {losses[name][0]:.6f} / "
              f"{losses[name][-1]:.6f} | {runners[name].temp_bytes / 2**20:,.0f} |")


if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does
    main()
