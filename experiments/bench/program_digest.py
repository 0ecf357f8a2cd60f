"""Digests of the compiled train step, to show that a refactor changed no program (so no speed and no value).

    python experiments/bench/program_digest.py                  # full, lora, qlora on tiny-llama and bench-llama

Before and after a change: run it in a `git worktree` of the earlier commit (with PYTHONPATH set to that tree and
this script copied in, if the earlier commit lacks it or its helpers differ), then here, and compare the tables.

For each model and method, the trainer's own step (`jax_side.Runner`, the pmap step, float32) is compiled for one
batch of 4 x 64 tokens; its optimized HLO, with the source-location tables and metadata stripped (they name
Python files, lines and functions, which a move between modules changes), is hashed with SHA-256. Two commits that
print the same digest run the same XLA program: an A/B of their speed would measure noise. The first two losses
and a SHA-256 checksum of the logits of a forward pass with adapter dropout on (rng fixed, adapters' B random)
are printed too, so a change of values shows even where the program text legitimately changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_side  # noqa: E402
import workers  # noqa: E402
from sftjax.model.config import PRESETS  # noqa: E402
from sftjax.model.transformer import forward  # noqa: E402
from sftjax.peft import lora as lora_lib  # noqa: E402
from sftjax.train.state import merge_params  # noqa: E402


def program_text(hlo: str) -> str:
    """The optimized HLO without what names Python sources: the tables before the first computation, metadata
    and stack-frame ids."""
    if "StackFrames" in hlo:
        hlo = hlo[hlo.index("\n\n", hlo.index("StackFrames")):]
    hlo = re.sub(r",? ?metadata=\{[^}]*\}", "", hlo)
    return re.sub(r",? ?stack_frame_id=\d+", "", hlo)


def random_b(adapters):
    """The adapter tree with every lora_b drawn from N(0, 0.02^2) (seeded)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        0.02 * jax.random.normal(k, v.shape, v.dtype) if path[-1].key == "lora_b" else v
        for k, (path, v) in zip(keys, leaves)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-llama,bench-llama", help="bench-llama runs with 2 of its layers")
    ap.add_argument("--modes", default="full,lora,qlora")
    args = ap.parse_args(argv)
    print("| model | method | program sha256 | losses 1, 2 | logit checksum (adapter dropout 0.1) |")
    print("| --- | --- | --- | --- | --- |")
    for preset in args.presets.split(","):
        model_cfg = dataclasses.replace(PRESETS[preset], dtype="float32", param_dtype="float32")
        if preset == "bench-llama":
            model_cfg = dataclasses.replace(model_cfg, num_layers=2)
        for mode in args.modes.split(","):
            cfg = jax_side.train_config("unused", mode, 16, 32.0, 1e-4)
            model = jax_side.random_model(cfg, model_cfg)
            batch = jax_side.sftjax_batch(*workers.batches(1, 4, 64, model_cfg.vocab_size, 0)[0])
            runner = jax_side.Runner(cfg, model)
            runner.compile(batch)
            digest = hashlib.sha256(program_text(runner._run.as_text()).encode()).hexdigest()[:16]
            losses = [runner.step(batch) for _ in range(2)]
            run_cfg, trainable = model.cfg, model.trainable
            if mode != "full":  # B random (it starts at 0), so that the adapters' dropout masks show in the logits
                run_cfg = lora_lib.model_config(model_cfg, dataclasses.replace(model.lora, dropout=0.1))
                trainable = random_b(trainable)
            logits = forward(run_cfg, merge_params(model.frozen, trainable), jnp.asarray(batch["tokens"][0, 0]),
                             dropout_rng=jax.random.key(3))
            checksum = hashlib.sha256(np.asarray(logits).tobytes()).hexdigest()[:16]
            print(f"| {preset} | {mode} | {digest} | {losses[0]:.7f}, {losses[1]:.7f} | {checksum} |", flush=True)


if __name__ == "__main__":
    main()
