r"""sftjax against transformers + PEFT (+ bitsandbytes): train-step speed, MFU, memory, compile time and scaling.

    python experiments/bench/bench.py                       # everything, bench config (8-13 min on 2 cores)
    python experiments/bench/bench.py --quick               # tiny config, 1 step each: checks that it runs
    python experiments/bench/bench.py --sections speed,memory --modes lora,qlora --steps 8 --turn 3
    python experiments/bench/bench.py --quick --parallelism fsdp   # the same with sftjax's sharded step
    # GPU (Llama 3.2 1B architecture, bf16 mixed precision): the pmap step, then the sharded step, same weights
    python experiments/bench/bench.py --platform gpu --model-dir /tmp/bench-1b
    python experiments/bench/bench.py --platform gpu --parallelism fsdp --sections speed,memory \
        --model-dir /tmp/bench-1b

Bench config (REFERENCE.md): Llama, vocab 8192, width 512, 8 layers, 8 query / 2 kv heads, FFN 1408, untied,
seq 256, batch 8, float32; LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down; AdamW (lr 1e-4, no weight decay,
no clipping, constant lr) in both stacks; QLoRA = NF4 + double quantization of every decoder linear in both.
Both stacks train the same weights (random, written once as an HF directory that each loads) on the same random
token batches, every target trained. The sftjax step is the trainer's own (`compile_steps`: the pmap step, or
the sharded one with --parallelism fsdp, below; the model built by `build_model` exactly as `sftjax-train` builds
it); the peer step is documented in torch_side.py.

Sections (--sections), each run in fresh processes by workers.py:
  peak     float32 matmul peak: median GFLOP/s of jitted [2048, 2048] @ [2048, 2048] dots (torch's for reference)
  speed    per mode one process, the stacks taking turns of --turn steps (sftjax turn, peer turn, ...: both see
           the same machine state); medians of --steps steady steps after --warmup turns (the first step
           compiles). A turn's first step is not counted: it follows the other stack's turn, and on this
           project's CPU machine a step that follows a pause of a second or two (the other stack's step) pays
           0.3-0.7 s more in the kernel (sys time) to map its buffers again: a host memory effect that a
           training run, whose steps follow each other, never sees (experiments/bench/README.md). Its median is
           reported beside the steady one
  memory   per (stack, mode) one process, 1 warm-up and 10 measured steps: peak RSS (ru_maxrss), RSS after
           imports, trainable / frozen / optimizer-state bytes; for sftjax also XLA's temp buffer bytes of the
           compiled step. sftjax runs with the malloc tunable of its entry points (sftjax/cli/malloc.py), the
           peer with glibc's defaults, each as its users run it. (In the other sections both stacks share a
           process, and the tunable.) Ten steps, not one: an allocator can grow its heap at a later step
  compile  trace + lower and XLA compile seconds of the first sftjax step at 8 / 16 / 32 layers, scan on / off
  scaling  sftjax tokens/s at fixed tokens per batch (b x T = 2048) for T = 256 .. 2048, and at fixed T = 256
           for b = 1 .. 16, each without and with remat="full"
  floor    per mode: the matmul floor (floor.py): every matmul of the sftjax step timed alone and summed, the
           fastest the step could be if nothing else took time; tokens/s there against the peer's measured figure

FLOPs per token (model FLOPs: matmuls only; norms, softmax, RoPE, the loss and the optimizer are not counted).
With L layers, width D, N query / K kv heads of width H, FFN F, vocabulary V, sequence length T, rank r:

    N_mm  = L (D*N*H + 2*D*K*H + N*H*D + 3*D*F) + D*V      matmul weights of the layers + lm_head (no embedding)
    attn  = 12 L T N H        q k^T and p v: forward 2 x 2 T N H per token and layer, backward twice that;
                              the full T x T product is counted (PaLM's convention: causality not halved)
    full  = 6 N_mm + attn     forward 2 N_mm, backward 4 N_mm (input and weight gradients)
    lora  = 4 N_mm + attn + 6 r sum(in + out)    the frozen base needs no weight gradient: forward 2 N_mm +
                              input gradient 2 N_mm; each adapter (in -> r -> out, over all targeted modules and
                              layers) forward 2 r (in + out), backward 4 r (in + out)
    qlora = lora              dequantization is not a matmul and is not counted

MFU = FLOPs per token x tokens/s / the jax matmul peak of the same machine (both stacks against the same peak).
For the bench config N_mm = 26.74M: full 173.0 MFLOP/token, lora / qlora 126.5 MFLOP/token.

On a GPU (--platform gpu): the `llama-3.2-1b` preset (the Llama 3.2 1B architecture, random weights; vocab
128256, width 2048, 16 layers, 32 query / 8 kv heads, FFN 8192, tied), batch 4 x seq 1024, --precision bf16 (the
default there: what the HF Trainer's bf16=True does, see jax_side.py / torch_side.py), the bfloat16 matmul peak
([8192, 8192] @ [8192, 8192]), and in the memory section each stack's peak device memory (jax: the allocator's
peak_bytes_in_use; torch: max_memory_allocated). Sections peak, speed and memory by default. `--model-dir DIR`
keeps the random HF directory (5 GB at 1B in float32) for the next invocation, so the sections can run as separate
commands. --precision bf16 also runs on CPU (tests/test_bench.py checks the bf16 path of both stacks there).
The two GPU commands at the top are the GPU checklist of experiments/bench/README.md: the pmap step against the
peer, then the sharded step against it on the same weights.

--parallelism (trainer.parallelism) picks the sftjax step of the speed, memory, compile and scaling sections:
"data" (default) the pmap step (`train.step.compile_steps`), "fsdp" the sharded jit step
(`train.sharded.compile_steps`) on a one-device mesh (data 1, fsdp 1, tensor 1), state placed by its shardings and
each batch as a global array (jax_side.Runner). On one device nothing is split: it measures the sharded program
against the pmap one, not a memory saving. The floor section times matmuls alone and is the same for both. The
result is named -fsdp and its header says which step ran.

Results: a markdown table on stdout, and results/<date>-<HHMM>-<machine>.md + .json (or --results-dir); a result
never replaces another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import report

HERE = Path(__file__).resolve().parent
MODES = ("full", "lora", "qlora")
SECTIONS = ("peak", "speed", "memory", "compile", "scaling", "floor")
GPU_SECTIONS = ("peak", "speed", "memory")  # the default with --platform gpu
PRECISIONS = ("float32", "bf16")
STACKS = ("sftjax", "peer")
PARALLELISMS = ("data", "fsdp")  # the sftjax step: pmap, or the sharded jit step on a one-device mesh
LORA = {"rank": 16, "alpha": 32.0, "lr": 1e-4}
SEED = 0

# The real run: the bench config. Quick: tiny-llama at 2 layers, a few tokens, one step (the test).
SETTINGS = {
    "real": {
        "preset": "bench-llama", "overrides": {}, "batch": 8, "seq": 256, "steps": 6, "warmup": 1, "turn": 3,
        "memory_steps": 10, "peak": {"n": 2048, "reps": 10, "rounds": 3},
        "depths": [8, 16, 32], "compile_modes": ["full", "qlora"],
        "seq_sweep": [(8, 256), (4, 512), (2, 1024), (1, 2048)],
        "batch_sweep": [(1, 256), (2, 256), (4, 256), (8, 256), (16, 256)],
        "scaling_steps": 2, "scaling_warmup": 1, "floor_reps": 5,
    },
    "quick": {
        "preset": "tiny-llama", "overrides": {"num_layers": 2}, "batch": 2, "seq": 32, "steps": 1, "warmup": 1,
        "turn": 2,
        "memory_steps": 1, "peak": {"n": 256, "reps": 3, "rounds": 1},
        "depths": [1], "compile_modes": ["full"],
        "seq_sweep": [(2, 16), (1, 32)],
        "batch_sweep": [(1, 32)],
        "scaling_steps": 1, "scaling_warmup": 1, "floor_reps": 1,
    },
    # --platform gpu: the Llama 3.2 1B architecture (random weights), bf16 by default.
    "gpu": {
        "preset": "llama-3.2-1b", "overrides": {}, "batch": 4, "seq": 1024, "steps": 10, "warmup": 1, "turn": 6,
        "memory_steps": 5, "peak": {"n": 8192, "reps": 20, "rounds": 3},
        "depths": [4, 8, 16], "compile_modes": ["full", "qlora"],
        "seq_sweep": [(8, 512), (4, 1024), (2, 2048), (1, 4096)],
        "batch_sweep": [(1, 1024), (2, 1024), (4, 1024), (8, 1024)],
        "scaling_steps": 5, "scaling_warmup": 2, "floor_reps": 10,
    },
}


def flops_per_token(m: dict[str, Any], mode: str, seq: int, rank: int) -> float:
    """Model FLOPs per trained token of one train step (the formula of the module docstring)."""
    L, D, N, K, H, F, V = (m[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                          "intermediate_size", "vocab_size"))
    n_mm = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V
    attn = 12 * L * seq * N * H
    if mode == "full":
        return 6 * n_mm + attn
    adapter_dims = (D + N * H) + 2 * (D + K * H) + (N * H + D) + 3 * (D + F)  # q, k, v, o, gate, up, down
    return 4 * n_mm + attn + 6 * rank * L * adapter_dims


def cpu_id(lscpu: str) -> str:
    """Family, model and widest vector extension from lscpu's output, e.g. "family 26 model 2, AVX-512": a model
    name alone ("AMD EPYC" on a cloud VM) does not tell hosts apart whose matmul peaks differ 2x."""
    fields = {key: re.search(rf"^{key}:\s*(.+)$", lscpu, re.M) for key in ("CPU family", "Model", "Flags")}
    flags = set(fields["Flags"][1].split()) if fields["Flags"] else set()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "?"
    family, model = (fields[k][1].strip() if fields[k] else "?" for k in ("CPU family", "Model"))
    return f"family {family} model {model}, {isa}"


def machine(on_gpu: bool = False) -> dict[str, Any]:
    """CPU model and cores; with on_gpu, the GPU's name and memory (nvidia-smi), which then names the results."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)[1].strip()
    except (OSError, subprocess.CalledProcessError, TypeError):
        lscpu, model = "", platform.processor() or "unknown CPU"
    cores = os.cpu_count() or 0
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") + f"-{cores}core"
    host = {"cpu": model, "cores": cores, "slug": slug, "python": platform.python_version(), "gpu": None,
            "cpu_id": cpu_id(lscpu)}
    if on_gpu:
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=True).stdout.splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            smi = "unknown GPU"
        host["gpu"] = smi.strip()
        host["slug"] = re.sub(r"[^a-z0-9]+", "-", smi.split(",")[0].lower()).strip("-")
    return host


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def run_worker(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run workers.py NAME in a fresh process; its stderr streams through, its RESULT line is returned."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    if name == "memory" and payload.get("stack") == "peer":
        env["SFTJAX_MALLOC"] = "system"  # the peer's memory as its users run it: glibc's defaults (no tunable)
    if payload.get("platform") == "gpu":
        # jax takes GPU memory as it needs it instead of 75% up front, so the peer in the same process (speed)
        # has room, and jax's peak device memory is what the step used.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "workers.py"), name, json.dumps(payload)],
                          stdout=subprocess.PIPE, text=True, env=env, cwd=HERE, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"bench: worker {name} {payload.get('mode', '')} failed (exit {proc.returncode})")
    print(f"bench: {name} {payload.get('stack', '')} {payload.get('mode', '')} done in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, one step each (for tests)")
    ap.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                    help="cpu: the bench config; gpu: the 1B config in bf16 (both stacks on the GPU)")
    ap.add_argument("--precision", choices=PRECISIONS, help="float32 (default on cpu) or bf16 (default on gpu)")
    ap.add_argument("--parallelism", choices=PARALLELISMS, default="data",
                    help="the sftjax step: data (pmap, default) or fsdp (the sharded step on a one-device mesh)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of full,lora,qlora")
    ap.add_argument("--sections", help="comma-separated subset of " + ",".join(SECTIONS) + " (default: all on cpu, "
                    + ",".join(GPU_SECTIONS) + " on gpu)")
    ap.add_argument("--model-dir", type=Path, help="write the random HF model directory here and keep it; reused "
                    "when it holds the same preset and seed (default: a temporary directory)")
    ap.add_argument("--steps", type=int, help="measured steps per stack and mode (speed)")
    ap.add_argument("--warmup", type=int, help="warm-up turns before measuring (speed; the first step compiles)")
    ap.add_argument("--turn", type=int, help="steps per stack per turn (speed, >= 2; the first is not measured)")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results", help="where the .md and .json go")
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.platform == "gpu" else "float32")
    args.sections = args.sections or ",".join(GPU_SECTIONS if args.platform == "gpu" else SECTIONS)
    for name, allowed in (("modes", MODES), ("sections", SECTIONS)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        bad = [x for x in chosen if x not in allowed]
        if bad or not chosen:
            ap.error(f"--{name}: {','.join(bad) or 'empty'} (choose from {','.join(allowed)})")
        setattr(args, name, chosen)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = dict(SETTINGS["quick" if args.quick else "gpu" if args.platform == "gpu" else "real"])
    s["steps"] = args.steps or s["steps"]
    s["warmup"] = s["warmup"] if args.warmup is None else args.warmup
    s["turn"] = args.turn or s["turn"]
    if s["turn"] < 2:
        raise SystemExit("bench: --turn must be at least 2 (a turn's first step is not measured)")
    s["platform"], s["precision"], s["parallelism"] = args.platform, args.precision, args.parallelism
    started = time.perf_counter()
    host = machine(args.platform == "gpu")
    results: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": host, "versions": versions(), "quick": args.quick,
        "command": " ".join(["python experiments/bench/bench.py", *(sys.argv[1:] if argv is None else argv)]),
        "load_before": os.getloadavg(), "settings": {**s, "lora": LORA, "modes": args.modes},
    }
    hf_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="sftjax-bench-"))
    try:
        base = {"hf_dir": str(hf_dir / "model"), "seed": SEED, "batch": s["batch"], "seq": s["seq"],
                "platform": args.platform, "precision": args.precision, "parallelism": args.parallelism, **LORA}
        prep = _prepare(base, _preset(s), hf_dir if args.model_dir else None)
        base["model"] = prep["model"]
        results["model"] = {**prep["model"], "num_params": prep["num_params"]}
        if "peak" in args.sections:
            results["peak"] = run_worker("peak", {**s["peak"], "platform": args.platform,
                                                  "precision": args.precision})
        if "speed" in args.sections:
            results["speed"] = {m: run_worker("speed", {**base, "mode": m, "steps": s["steps"],
                                                        "warmup": s["warmup"], "turn": s["turn"]})
                                for m in args.modes}
        if "memory" in args.sections:
            results["memory"] = {m: {stack: run_worker("memory", {**base, "mode": m, "stack": stack,
                                                                  "steps": s["memory_steps"], "warmup": 1})
                                     for stack in STACKS} for m in args.modes}
        if "compile" in args.sections:
            modes = [m for m in s["compile_modes"] if m in args.modes] or args.modes[:1]
            results["compile"] = run_worker("compile", {**base, "modes": modes, "depths": s["depths"]})
        if "scaling" in args.sections:
            shapes = list(dict.fromkeys(map(tuple, s["seq_sweep"] + s["batch_sweep"])))
            results["scaling"] = run_worker("scaling", {**base, "mode": args.modes[0], "shapes": shapes,
                                                        "remats": ["none", "full"], "steps": s["scaling_steps"],
                                                        "warmup": s["scaling_warmup"]})
        if "floor" in args.sections:
            results["floor"] = {m: run_worker("floor", {**base, "mode": m, "reps": s["floor_reps"]})
                                for m in args.modes}
    finally:
        if not args.model_dir:
            shutil.rmtree(hf_dir, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    add_flops(results, s)
    text = report.markdown(results)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(args.results_dir, f"{results['date'][:10]}-{results['date'][11:].replace(':', '')}-"
                      f"{host['slug']}" + (f"-{args.precision}" if args.precision != "float32" else "")
                      + (f"-{args.parallelism}" if args.parallelism != "data" else "")
                      + ("-quick" if args.quick else ""))
    (args.results_dir / f"{stem}.md").write_text(text)
    (args.results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {args.results_dir / stem}.md and .json ({results['wall_s']:.0f} s)", file=sys.stderr)


def _preset(s: dict[str, Any]) -> dict[str, Any]:
    return {"preset": s["preset"], "overrides": s["overrides"]}


def _prepare(base: dict[str, Any], preset: dict[str, Any], keep: Path | None) -> dict[str, Any]:
    """The prepare worker's result: the random HF directory written now, or (keep: --model-dir) the one an earlier
    run kept there for the same preset and seed. Another model in --model-dir is refused, never replaced."""
    if keep is None:
        return run_worker("prepare", {**base, "model": preset})
    marker = keep / "bench_model.json"
    wanted = {"model": preset, "seed": base["seed"]}
    if marker.is_file():
        kept = json.loads(marker.read_text())
        if {"model": kept["model"], "seed": kept["seed"]} != wanted:
            raise SystemExit(f"bench: --model-dir {keep} holds {kept['model']} seed {kept['seed']}, not "
                             f"{preset} seed {base['seed']}: choose another directory")
        print(f"bench: reusing the model in {keep}", file=sys.stderr)
        return kept["prepared"]
    if keep.exists() and any(keep.iterdir()):
        raise SystemExit(f"bench: --model-dir {keep} is not empty and holds no bench_model.json: choose another")
    keep.mkdir(parents=True, exist_ok=True)
    prep = run_worker("prepare", {**base, "model": preset})
    marker.write_text(json.dumps({**wanted, "prepared": prep}) + "\n")
    return prep


def _free_stem(folder: Path, stem: str) -> str:
    """`stem`, or stem-2, stem-3, ... : the first whose .md and .json do not exist yet."""
    candidate, n = stem, 1
    while (folder / f"{candidate}.md").exists() or (folder / f"{candidate}.json").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def add_flops(results: dict[str, Any], s: dict[str, Any]) -> None:
    """FLOPs per token and MFU (against the jax matmul peak) wherever there is a tokens/s."""
    m, rank = results["model"], LORA["rank"]
    peak = results.get("peak", {}).get("jax_gflops")

    def mfu(flops: float, tokens_per_s: float) -> float | None:
        return None if not peak else flops * tokens_per_s / (peak * 1e9)

    for mode, r in results.get("speed", {}).items():
        r["flops_per_token"] = flops_per_token(m, mode, r["seq"], rank)
        r["ratio"] = r["sftjax"]["tokens_per_s"] / r["peer"]["tokens_per_s"]
        for stack in STACKS:
            r[stack]["mfu"] = mfu(r["flops_per_token"], r[stack]["tokens_per_s"])
    for mode, f in results.get("floor", {}).items():
        f["tokens_per_s"] = s["batch"] * s["seq"] / f["floor_s"]
        f["gflops_per_s"] = f["flops"] / f["floor_s"] / 1e9
        measured = results.get("speed", {}).get(mode)
        if measured:
            f["vs_peer"] = f["tokens_per_s"] / measured["peer"]["tokens_per_s"]
            f["share_of_step"] = f["floor_s"] / measured["sftjax"]["step_s"]
            f["peer_x125_step_s"] = s["batch"] * s["seq"] / (1.25 * measured["peer"]["tokens_per_s"])
    scaling = results.get("scaling")
    if scaling:
        for row in scaling["rows"]:
            row["flops_per_token"] = flops_per_token(m, scaling["mode"], row["seq"], rank)
            row["mfu"] = mfu(row["flops_per_token"], row["tokens_per_s"])
        scaling["seq_sweep"] = [list(x) for x in s["seq_sweep"]]
        scaling["batch_sweep"] = [list(x) for x in s["batch_sweep"]]


if __name__ == "__main__":
    main()
