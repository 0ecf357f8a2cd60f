"""Where the sftjax train step's time goes: XLA:CPU op time by kind, from a jax.profiler trace.

    python experiments/bench/op_profile.py                  # the bench config, full fine-tuning, 3 traced steps
    python experiments/bench/op_profile.py --mode lora --top 30
    python experiments/bench/op_profile.py --quick          # tiny config (tests/test_bench.py)
    python experiments/bench/op_profile.py --main-job --mode lora   # the main job's base, LoRA rank 64, 32 x 128
      (its 4 layers unrolled as the main job runs them; its adapters only, as ab.py's --preset builtin: the main
      job also trains the embeddings and the norms)
    python experiments/bench/op_profile.py --real-model --mode lora --by-source   # sft_real.py's sftjax step
      (SmolLM2-135M-Instruct's weights, its data file and settings: 4 packed rows of 512, completion-only loss)
    python experiments/bench/op_profile.py --real-model --mode lora --set model.scan_layers=false   # a setting

Builds the bench step as bench.py does (`jax_side.Runner`, random weights; --real-model: the real ones), runs a
few steps to warm up, traces --steps more with `jax.profiler.trace` (perfetto JSON), and sums the duration of
every XLA op event per step:

    ynn        YNNPACK fusions: the matmuls and the elementwise work XLA fused into them
    dot        matmuls XLA left to its own (Eigen) kernels
    copy       copies and transposes (layout changes)
    broadcast  broadcast fills (e.g. zero-initialised buffers of the layer scan)
    reduce     reductions XLA did not fuse elsewhere
    other      every other fusion: elementwise work (norms, softmax, RoPE, SiLU, the loss, AdamW)

Op events of the two cores can overlap, so these are shares of op time; the step's wall time is printed beside.
The executor's wrappers (ThunkExecutor, thread-pool waits, while / call bodies) are left out, so nothing is
counted twice.

--by-source adds where in the code that time is spent: every op of the compiled step (its optimized HLO) carries
the source line of the jax operation it came from; a fusion is charged to its root's line. Op time is summed per
line of sftjax/ (the model, the loss, the optimizer step) and, coarser, per function, each with its share in
matmul ops (ynn, dot) and, per line, the jax operations there (e.g. `dot_general`; `(backward)` marks those of the
backward pass).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
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


def hlo_sources(hlo: str) -> dict[str, tuple[str, str, str]]:
    """{op name: ("file:line", "file:function", jax op name)} of an optimized HLO module's text: an instruction's
    own metadata, a fusion's from the ROOT of the computation it calls. The source is the innermost frame of the
    op's stack (the module's StackFrames / FileLocations tables), or its source_file / source_line."""
    def table(title: str) -> dict[str, str]:
        block = re.search(rf"^{title}\n(.*?)\n\n", hlo, re.M | re.S)
        return dict(re.findall(r"^(\d+) (.*)$", block[1], re.M)) if block else {}

    files, functions = table("FileNames"), table("FunctionNames")
    locations, frames = table("FileLocations"), table("StackFrames")

    def field(text: str, key: str) -> str:
        found = re.search(rf"{key}=(\d+)", text)
        return found[1] if found else ""

    def source(metadata: str) -> tuple[str, str, str]:
        op = re.search(r'op_name="([^"]*)"', metadata)
        op_name = op[1] if op else ""
        frame = frames.get(field(metadata, "stack_frame_id"), "")
        location = locations.get(field(frame, "file_location_id"), "")
        if location:
            file = _short(files.get(field(location, "file_name_id"), '"?"').strip('"'))
            function = functions.get(field(location, "function_name_id"), '"?"').strip('"')
            return f"{file}:{field(location, 'line')}", f"{file}:{function}", op_name
        file, line = re.search(r'source_file="([^"]*)"', metadata), field(metadata, "source_line")
        where = _short(file[1]) if file else "?"
        return f"{where}:{line}" if line else where, where, op_name

    roots = {}  # computation name -> its ROOT's source
    for comp in re.finditer(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S):
        root = re.search(r"ROOT %[\w.\-]+ = [^\n]*?metadata=\{([^}]*)\}", comp[2])
        if root:
            roots[comp[1]] = source(root[1])
    out = {}
    for inst in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = [^\n]*$", hlo, re.M):
        called = re.search(r"calls=%([\w.\-]+)", inst[0])
        metadata = re.search(r"metadata=\{([^}]*)\}", inst[0])
        if called and called[1] in roots:
            out[inst[1]] = roots[called[1]]
        elif metadata:
            out[inst[1]] = source(metadata[1])
    return out


def _short(path: str) -> str:
    """sftjax/model/attention.py for a path inside the package; the file name otherwise."""
    parts = Path(path).parts
    return "/".join(parts[parts.index("sftjax"):]) if "sftjax" in parts else Path(path).name


def by_source(times: dict[str, float], sources: dict[str, tuple[str, str, str]]) -> tuple[list, list]:
    """(rows per source line: (ms, "file:line", share in matmul ops, the jax ops there, most time first),
    rows per function: (ms, "file:function", share in matmul ops)). Matmul ops: kinds ynn and dot."""
    lines: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    matmul: collections.Counter[str] = collections.Counter()  # per line and per function
    ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, ms in times.items():
        where, function, op = sources.get(name, ("?", "?", ""))
        lines[where] += ms
        functions[function] += ms
        if kind(name) in ("ynn", "dot"):
            matmul[where] += ms
            matmul[function] += ms
        last = op.rsplit("/", 1)[-1] or "?"  # "jit(step)/transpose(jvp(...))/dot_general" -> dot_general (backward)
        ops[where][f"{last} (backward)" if "transpose(" in op else last] += ms
    per_line = [(ms, where, matmul[where] / ms if ms else 0.0, ", ".join(k for k, _ in ops[where].most_common(3)))
                for where, ms in lines.most_common()]
    return per_line, [(ms, name, matmul[name] / ms if ms else 0.0) for name, ms in functions.most_common()]


def real_model_steps(mode: str, n: int, overrides: list[str]) -> tuple[jax_side.Runner, list[dict], str]:
    """(runner, n batches, description) of sft_real.py's sftjax side: SmolLM2-135M-Instruct's weights and
    tokenizer, its prompt/completion file, the settings of its sftjax-train command, batches from sftjax's own data
    pipeline with the objective's preparation (the completion positions' label_index), as sftjax-train runs them.
    overrides: more sftjax-train overrides after those (e.g. model.scan_layers=false)."""
    import numpy as np
    import sft_real

    from sftjax.objectives.sft import SFT
    from sftjax.train.setup import build_model

    model_dir = sft_real.real_model_dir()
    with tempfile.TemporaryDirectory(prefix="sftjax-profile-data-") as work:
        data = Path(work) / "data.jsonl"
        sft_real.write_data(data, model_dir, 400)
        cfg, rows = sft_real.sftjax_batches(model_dir, data, mode, n, tuple(overrides))
    model = build_model(cfg)
    objective = SFT(model.cfg, tuple(d.name for d in cfg.data.train))
    batches = [objective.prepare({k: np.asarray(v)[:, None] for k, v in b.items()}) for b in rows]
    trained = np.mean([float((b["loss_mask"] > 0).mean()) for b in batches])
    described = (f"SmolLM2-135M-Instruct ({model_dir}), batch {sft_real.ROWS} x {sft_real.SEQ}, "
                 f"{100 * trained:.0f}% of the slots trained")
    return jax_side.Runner(cfg, model, objective), batches, described


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=bench.MODES, default="full")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (after as many warm-up steps)")
    ap.add_argument("--top", type=int, default=15, help="op names listed, longest first")
    ap.add_argument("--quick", action="store_true", help="tiny config (tests)")
    ap.add_argument("--main-job", action="store_true",
                    help="the main job's shapes: its base (job/base.py), batch 32 x 128, LoRA rank 64, alpha 128")
    ap.add_argument("--real-model", action="store_true",
                    help="sft_real.py's sftjax step: SmolLM2-135M-Instruct, its data and settings (LoRA r 16)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="with --real-model: sftjax-train overrides on top of sft_real.py's (an A/B of a setting)")
    ap.add_argument("--by-source", action="store_true", help="also op time per source line and function of sftjax/")
    args = ap.parse_args(argv)
    if args.set and not args.real_model:
        ap.error("--set goes with --real-model")
    s = bench.SETTINGS["quick" if args.quick else "real"]
    model_cfg = PRESETS[s["preset"]].replace(**s["overrides"])
    rank, alpha = bench.LORA["rank"], bench.LORA["alpha"]
    if args.main_job:
        from sftjax.job.base import base_config

        model_cfg = base_config(4096).replace(dtype="float32", param_dtype="float32", scan_layers=False)
        rank, alpha = 64, 128.0
        s = {**s, "batch": 32, "seq": 128}
    if args.real_model:
        runner, data, described = real_model_steps(args.mode, 4 * args.steps, args.set)
        model_cfg = runner.model.cfg
    else:
        cfg = jax_side.train_config("-", args.mode, rank, alpha, bench.LORA["lr"])
        runner = jax_side.Runner(cfg, jax_side.random_model(cfg, model_cfg))
        data = [jax_side.sftjax_batch(*t) for t in
                workers.batches(2 * args.steps, s["batch"], s["seq"], model_cfg.vocab_size, bench.SEED)]
        described = f"batch {s['batch']} x {s['seq']}"
    shapes = {k: v.shape for k, v in data[0].items()}
    data = [b for b in data if {k: v.shape for k, v in b.items()} == shapes][:2 * args.steps]  # one program
    if len(data) < 2 * args.steps:
        raise SystemExit(f"op_profile: only {len(data)} batches of one shape, {2 * args.steps} needed")
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
    print(f"{args.mode}: {described}, {model_cfg.num_layers} layers; step wall {wall_ms:.0f} ms, "
          f"op time {total:.0f} ms per step ({args.steps} traced steps)")
    print("\n| kind | ms per step | share of op time |\n| --- | --- | --- |")
    for name, ms in by_kind.most_common():
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |")
    print("\n| op | ms per step |\n| --- | --- |")
    for name, ms in collections.Counter(times).most_common(args.top):
        print(f"| {name} | {ms:.1f} |")
    if args.by_source:
        per_line, per_function = by_source(times, hlo_sources(runner.hlo()))
        print("\n| function | ms per step | share | of it in matmul ops |\n| --- | --- | --- | --- |")
        for ms, name, mm in per_function[:args.top]:
            print(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% | {100 * mm:.0f}% |")
        print("\n| source line | ms per step | share | of it in matmul ops | jax ops there (most time first) |\n"
              "| --- | --- | --- | --- | --- |")
        for ms, where, mm, ops in per_line[:args.top]:
            print(f"| {where} | {ms:.1f} | {100 * ms / total:.0f}% | {100 * mm:.0f}% | {ops} |")


if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does
    main()
