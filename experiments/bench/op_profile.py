"""Where the sftjax train step's time goes: XLA:CPU op time by kind, from a jax.profiler trace.

    python experiments/bench/op_profile.py                  # the bench config, full fine-tuning, 3 traced steps
    python experiments/bench/op_profile.py --mode lora --top 30
    python experiments/bench/op_profile.py --quick          # tiny config (tests/test_bench.py)
    python experiments/bench/op_profile.py --main-job --mode lora   # the main job's base, LoRA rank 64, 32 x 128
      (its adapters only, as ab.py's --preset builtin: the main job also trains the embeddings and the norms)

Builds the bench step as bench.py does (`jax_side.Runner`, random weights), runs a few steps to warm up, traces
--steps more with `jax.profiler.trace` (perfetto JSON), and sums the duration of every XLA op event per step:

    ynn        YNNPACK fusions: the matmuls and the elementwise work XLA fused into them
    dot        matmuls XLA left to its own (Eigen) kernels
    copy       copies and transposes (layout changes)
    broadcast  broadcast fills (e.g. zero-initialised buffers of the layer scan)
    reduce     reductions XLA did not fuse elsewhere
    other      every other fusion: elementwise work (norms, softmax, RoPE, SiLU, the loss, AdamW)

Op events of the two cores can overlap, so these are shares of op time; the step's wall time is printed beside.
The executor's wrappers (ThunkExecutor, thread-pool waits, while / call bodies) are left out, so nothing is
counted twice.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402

import bench  # noqa: E402
import jax_side  # noqa: E402
import workers  # noqa: E402
from sftjax.model.config import PRESETS  # noqa: E402

WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "XlaModule", "PjitFunction", "while.", "conditional", "call", "$")


def kind(name: str) -> str:
    """The op-kind bucket of an XLA op event's name (see the module docstring)."""
    if name.startswith("ynn"):
        return "ynn"
    for key, bucket in (("dot", "dot"), ("copy", "copy"), ("transpose", "copy"), ("broadcast", "broadcast"),
                        ("reduce", "reduce")):
        if key in name:
            return bucket
    return "other"


def op_times(trace: dict, steps: int) -> dict[str, float]:
    """Milliseconds per step of every op name in a perfetto trace, wrappers left out."""
    out: collections.Counter[str] = collections.Counter()
    for event in trace["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(WRAPPERS) or "Execute" in name or "wait" in name.lower():
            continue
        out[name] += event.get("dur", 0) / 1e3 / steps
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=bench.MODES, default="full")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after as many warm-up steps)")
    ap.add_argument("--top", type=int, default=15, help="op names listed, longest first")
    ap.add_argument("--quick", action="store_true", help="tiny config (tests)")
    ap.add_argument("--main-job", action="store_true",
                    help="the main job's shapes: its base (job/base.py), batch 32 x 128, LoRA rank 64, alpha 128")
    args = ap.parse_args(argv)
    s = bench.SETTINGS["quick" if args.quick else "real"]
    model_cfg = PRESETS[s["preset"]].replace(**s["overrides"])
    rank, alpha = bench.LORA["rank"], bench.LORA["alpha"]
    if args.main_job:
        from sftjax.job.base import base_config

        model_cfg, rank, alpha = base_config(4096).replace(dtype="float32", param_dtype="float32"), 64, 128.0
        s = {**s, "batch": 32, "seq": 128}
    cfg = jax_side.train_config("-", args.mode, rank, alpha, bench.LORA["lr"])
    runner = jax_side.Runner(cfg, jax_side.random_model(cfg, model_cfg))
    data = [jax_side.sftjax_batch(*t) for t in
            workers.batches(2 * args.steps, s["batch"], s["seq"], model_cfg.vocab_size, bench.SEED)]
    runner.compile(data[0])
    for batch in data[:args.steps]:
        runner.step(batch)
    with tempfile.TemporaryDirectory(prefix="sftjax-profile-") as out:
        with jax.profiler.trace(out, create_perfetto_trace=True):
            start = time.perf_counter()
            for batch in data[args.steps:]:
                runner.step(batch)
            wall_ms = (time.perf_counter() - start) / args.steps * 1e3
        [path] = Path(out).rglob("*.trace.json.gz")
        times = op_times(json.loads(gzip.decompress(path.read_bytes())), args.steps)
    by_kind: collections.Counter[str] = collections.Counter()
    for name, ms in times.items():
        by_kind[kind(name)] += ms
    total = sum(by_kind.values())
    print(f"{args.mode}: batch {s['batch']} x {s['seq']}, {model_cfg.num_layers} layers; step wall {wall_ms:.0f} ms, "
          f"op time {total:.0f} ms per step ({args.steps} traced steps)")
    print("\n| kind | ms per step | share of op time |\n| --- | --- | --- |")
    for name, ms in by_kind.most_common():
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |")
    print("\n| op | ms per step |\n| --- | --- |")
    for name, ms in collections.Counter(times).most_common(args.top):
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does
    main()
