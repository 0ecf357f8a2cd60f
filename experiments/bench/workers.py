"""The measurements, each run by bench.py in a fresh process: `python workers.py NAME JSON` prints `RESULT {...}`.

    prepare   random bench weights -> an HF directory both stacks load
    peak      matmul GFLOP/s (float32, or bfloat16 for --precision bf16) through jax and torch (alternating, medians)
    speed     one mode: sftjax step, peer step, sftjax step, ... on the same batches; medians after warm-up
    memory    one (stack, mode) alone: RSS after imports, peak RSS (ru_maxrss), parameter / optimizer bytes
    compile   sftjax step trace + lower and XLA compile seconds against depth, scan over layers on / off
    scaling   sftjax tokens/s against batch shape and remat; XLA's temp buffer bytes per setting
    floor     one mode: every matmul of the sftjax step timed alone (floor.py), summed

A separate process per speed mode and per memory (stack, mode) keeps peaks apart and every stack's first step cold.
Every payload names the platform ("cpu" | "gpu") and the precision ("float32" | "bf16"); on "gpu" each stack
checks that it really runs on a GPU and stops with one line if not. The payloads of the sections that run the
sftjax step (speed, memory, compile, scaling) name its parallelism: "data" (the pmap step) or "fsdp" (the sharded
step on a one-device mesh; jax_side.Runner).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

MiB = 2**20


def rss_mib() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(n: int, b: int, T: int, vocab: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n random (tokens, targets) pairs [b, T]: targets are the next tokens of one random row of T + 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(0, vocab, (b, T + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(seq[:, :-1]), np.ascontiguousarray(seq[:, 1:])))
    return out


def _torch_device(p: dict[str, Any]) -> str:
    """"cuda" on the gpu platform (checked), else "cpu"."""
    if p["platform"] != "gpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench: --platform gpu, but torch sees no CUDA device")
    return "cuda"


def _check_jax(p: dict[str, Any]) -> None:
    import jax

    if p["platform"] == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"bench: --platform gpu, but jax runs on {jax.default_backend()} (install jax[cuda12])")


def _dtype(p: dict[str, Any]) -> str:
    """The matmul dtype of the precision: bfloat16 for "bf16", else float32."""
    return "bfloat16" if p["precision"] == "bf16" else "float32"


def _model_cfg(p: dict[str, Any]):
    from sftjax.model.config import ModelConfig

    return ModelConfig(**{**p["model"], "eos_token_ids": tuple(p["model"]["eos_token_ids"])})


def prepare(p: dict[str, Any]) -> dict[str, Any]:
    """Write the preset (with overrides) as an HF directory; return its config as a dict for the other workers."""
    import dataclasses

    import jax

    from sftjax.model.config import PRESETS
    from sftjax.model.hf import save_pretrained
    from sftjax.model.transformer import init_params

    cfg = PRESETS[p["model"]["preset"]].replace(**p["model"]["overrides"])
    save_pretrained(p["hf_dir"], cfg, init_params(cfg, jax.random.key(p["seed"])))
    return {"model": dataclasses.asdict(cfg), "num_params": cfg.num_params()}


def peak(p: dict[str, Any]) -> dict[str, Any]:
    import jax_side
    import torch_side

    _check_jax(p)
    device, dtype = _torch_device(p), _dtype(p)
    jax_runs, torch_runs = [], []
    for _ in range(p["rounds"]):
        jax_runs.append(jax_side.matmul_peak(p["n"], p["reps"], dtype))
        torch_runs.append(torch_side.matmul_peak(p["n"], p["reps"], dtype, device))
    return {"n": p["n"], "dtype": dtype, "jax_gflops": statistics.median(jax_runs),
            "torch_gflops": statistics.median(torch_runs), "jax_runs": jax_runs, "torch_runs": torch_runs}


def _jax_model(p: dict[str, Any], mode: str, remat: str = "none"):
    import jax_side

    from sftjax.train.setup import build_model

    _check_jax(p)
    cfg = jax_side.train_config(p["hf_dir"], mode, p["rank"], p["alpha"], p["lr"], remat=remat,
                                precision=p["precision"])
    return cfg, build_model(cfg)


def speed(p: dict[str, Any]) -> dict[str, Any]:
    import jax_side
    import torch_side

    mode, b, T = p["mode"], p["batch"], p["seq"]
    cfg, model = _jax_model(p, mode)
    runner = jax_side.Runner(cfg, model, parallelism=p["parallelism"])
    peer, optimizer, facts = torch_side.build(p["hf_dir"], mode, p["rank"], p["alpha"], p["lr"], p["precision"],
                                              _torch_device(p))
    steps = {"sftjax": lambda tokens, targets: runner.step(jax_side.sftjax_batch(tokens, targets)),
             "peer": lambda tokens, targets: torch_side.step(peer, optimizer, tokens, targets, p["precision"])}
    turn = p["turn"]  # steps per stack per turn; a turn's first step is not measured (see bench.py)
    turns = p["warmup"] + -(-p["steps"] // (turn - 1))
    data = batches(turns * turn, b, T, p["model"]["vocab_size"], p["seed"])
    times: dict[str, list[float]] = {"sftjax": [], "peer": []}
    losses: dict[str, list[float]] = {"sftjax": [], "peer": []}
    for i in range(turns):  # sftjax turn, peer turn, sftjax turn, ...: each stack the same batches
        for stack, step in steps.items():
            for tokens, targets in data[i * turn:(i + 1) * turn]:
                start = time.perf_counter()
                losses[stack].append(step(tokens, targets))
                times[stack].append(time.perf_counter() - start)
    out: dict[str, Any] = {"mode": mode, "batch": b, "seq": T, "turn": turn, "peer_setup": facts}
    for stack in ("sftjax", "peer"):
        measured_turns = times[stack][p["warmup"] * turn:]
        steady = [t for j, t in enumerate(measured_turns) if j % turn]
        first = measured_turns[::turn]
        median = statistics.median(steady)
        out[stack] = {"step_s": median, "tokens_per_s": b * T / median, "steps_s": steady,
                      "turn_first_steps_s": first, "turn_first_step_s": statistics.median(first),
                      "first_step_s": times[stack][0], "losses": losses[stack]}
    return out


def memory(p: dict[str, Any]) -> dict[str, Any]:
    stack, mode, b, T = p["stack"], p["mode"], p["batch"], p["seq"]
    if stack == "sftjax":
        import jax_side

        from sftjax.train.setup import build_model  # noqa: F401  (imports before the RSS baseline)
    else:
        import peft  # noqa: F401
        import torch_side
        import transformers  # noqa: F401
    after_imports = rss_mib()
    data = batches(p["warmup"] + p["steps"], b, T, p["model"]["vocab_size"], p["seed"])
    extra: dict[str, Any] = {}
    if stack == "sftjax":
        cfg, model = _jax_model(p, mode)
        runner = jax_side.Runner(cfg, model, parallelism=p["parallelism"])
        extra["compile_s"] = sum(runner.compile(jax_side.sftjax_batch(*data[0])))
        extra["xla_temp_bytes"] = runner.temp_bytes

        def run(tokens, targets):
            runner.step(jax_side.sftjax_batch(tokens, targets))

        def sizes():
            return runner.memory()
    else:
        peer, optimizer, facts = torch_side.build(p["hf_dir"], mode, p["rank"], p["alpha"], p["lr"], p["precision"],
                                                  _torch_device(p))
        extra["peer_setup"] = facts

        def run(tokens, targets):
            torch_side.step(peer, optimizer, tokens, targets, p["precision"])

        def sizes():
            return torch_side.memory(peer, optimizer)
    times = []
    for tokens, targets in data:
        start = time.perf_counter()
        run(tokens, targets)
        times.append(time.perf_counter() - start)
    solo = statistics.median(times[p["warmup"]:])
    return {"stack": stack, "mode": mode, "rss_after_imports_mib": after_imports, "peak_rss_mib": peak_rss_mib(),
            "solo_tokens_per_s": b * T / solo, "torch_imported": "torch" in sys.modules, **sizes(), **extra}


def compile_sweep(p: dict[str, Any]) -> dict[str, Any]:
    import jax_side

    base = _model_cfg(p)
    tokens, targets = batches(1, p["batch"], p["seq"], base.vocab_size, p["seed"])[0]
    batch = jax_side.sftjax_batch(tokens, targets)
    _check_jax(p)
    # One-time costs (LLVM and XLA start-up) paid before the first measured compile.
    warm_cfg = jax_side.train_config("-", "full", p["rank"], p["alpha"], p["lr"], precision=p["precision"])
    jax_side.Runner(warm_cfg, jax_side.random_model(warm_cfg, base.replace(num_layers=1)),
                    parallelism=p["parallelism"]).compile(batch)
    rows = []
    for mode in p["modes"]:
        cfg = jax_side.train_config("-", mode, p["rank"], p["alpha"], p["lr"], precision=p["precision"])
        for layers in p["depths"]:
            for scan in (True, False):
                model = jax_side.random_model(cfg, base.replace(num_layers=layers, scan_layers=scan))
                lower_s, compile_s = jax_side.Runner(cfg, model, parallelism=p["parallelism"]).compile(batch)
                rows.append({"mode": mode, "layers": layers, "scan_layers": scan, "lower_s": lower_s,
                             "compile_s": compile_s})
                print(f"compile {mode} L={layers} scan={scan}: {lower_s:.1f} + {compile_s:.1f} s", file=sys.stderr)
                del model
    return {"rows": rows, "batch": p["batch"], "seq": p["seq"]}


def scaling(p: dict[str, Any]) -> dict[str, Any]:
    import jax_side

    rows = []
    for remat in p["remats"]:
        cfg, model = _jax_model(p, p["mode"], remat)
        for b, T in p["shapes"]:
            data = batches(p["warmup"] + p["steps"], b, T, p["model"]["vocab_size"], p["seed"])
            runner = jax_side.Runner(cfg, model, parallelism=p["parallelism"])
            lower_s, compile_s = runner.compile(jax_side.sftjax_batch(*data[0]))
            times = []
            for tokens, targets in data:
                start = time.perf_counter()
                runner.step(jax_side.sftjax_batch(tokens, targets))
                times.append(time.perf_counter() - start)
            step_s = statistics.median(times[p["warmup"]:])
            rows.append({"batch": b, "seq": T, "remat": remat, "step_s": step_s, "tokens_per_s": b * T / step_s,
                         "compile_s": lower_s + compile_s, "xla_temp_bytes": runner.temp_bytes})
            print(f"scaling b={b} T={T} remat={remat}: {b * T / step_s:.0f} tokens/s", file=sys.stderr)
            del runner
    return {"mode": p["mode"], "rows": rows}


def matmul_floor(p: dict[str, Any]) -> dict[str, Any]:
    import floor

    _check_jax(p)
    return floor.matmul_floor(p["model"], p["mode"], p["batch"], p["seq"], p["rank"], p["reps"], _dtype(p))


WORKERS = {"prepare": prepare, "peak": peak, "speed": speed, "memory": memory, "compile": compile_sweep,
           "scaling": scaling, "floor": matmul_floor}

if __name__ == "__main__":
    from sftjax.cli.malloc import use_huge_pages

    use_huge_pages()  # may re-run this process, as sftjax-train does (bench.run_worker says when it does not)
    result = WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
