"""Per-device memory of the sharded train step at scale, by simulation: nothing is allocated but the compile.

    python experiments/memory/simulate.py             # Llama 3.1 8B at 1 / 8 / 64 devices + the fit ladder (README)
    python experiments/memory/simulate.py --no-ladder # the 8B table alone

For each (model, method, devices, layout) the SFT train step of `sftjax/train/sharded.py` is lowered and compiled
(`compile_steps(...)[0].lower(*abstract args).compile()`) on a CPU mesh of forced host devices, with every argument
a `jax.ShapeDtypeStruct` carrying the sharding the trainer gives it (`state_shardings`, `tree_shardings`,
`batch_sharding`). No weight is ever created: the trees come from `jax.eval_shape` and from the 4-bit layout
arithmetic (`quant.qkernel_layout`), so a 405B model costs what a 1B one does.

Per device (one partition of the SPMD program):
    parameters   trainable + frozen bytes one device holds: the sum of its shards' sizes under the shardings
    optimizer    bytes of its shards of the AdamW state (mu, nu; the step counts)
    temporaries  XLA's temp_size_in_bytes: the step's working buffers (gathered weights, activations, gradients)
    total        argument + output - alias + temp bytes of `compiled.memory_analysis()`: everything the step
                 holds at once (the donated state's outputs alias its inputs, so they are counted once)

Layouts: data-parallel = mesh (data=N, fsdp=1, tensor=1), every array whole on every device (what the pmap step
holds); FSDP = mesh (data=1, fsdp=N, tensor=1). Methods as `train/setup.build_model` builds them: full (every
parameter trainable in float32), LoRA (frozen base in bfloat16, r=16 adapters on all decoder linears in float32),
QLoRA (the LoRA base with its decoder linears NF4 + double quantization). Compute in bfloat16, remat "full", one
row of SEQ_LEN tokens per group (pmap device) per micro-batch, no accumulation, AdamW with clipping (the trainer's
defaults), SFT with the logits of every position (no `label_index`: the case of a batch trained everywhere).

XLA:CPU's temporaries are an estimate of XLA:GPU's (other fusion, bfloat16 dots done in float32); parameters
and optimizer state are exact.
"""

from __future__ import annotations

import os
import sys

DEVICES = 64  # forced host devices: the largest mesh
if __name__ == "__main__":  # before jax is imported; a smaller mesh uses the first N devices
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"--xla_force_host_platform_device_count={DEVICES}").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from sftjax.config import OptimSection  # noqa: E402
from sftjax.model.config import PRESETS, ModelConfig  # noqa: E402
from sftjax.model.transformer import param_shapes  # noqa: E402
from sftjax.objectives.sft import SFT  # noqa: E402
from sftjax.peft import lora, quant  # noqa: E402
from sftjax.train import sharded  # noqa: E402
from sftjax.train.optim import make_optimizer, schedule  # noqa: E402
from sftjax.train.state import init_state  # noqa: E402

HERE = Path(__file__).resolve().parent
SEQ_LEN = 2048  # T: the pipeline's default data.seq_len
BUDGET = 80e9  # bytes of an 80 GB device
GB = 1e9
METHODS = ("full", "lora", "qlora")
LORA = lora.LoraSpec(rank=16, alpha=32.0, target_modules="all-linear")
ROW_KEYS = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
            "positions": jnp.int32, "task_ids": jnp.int32, "class_ids": jnp.int32}  # data/packing.py's rows

_LLAMA3 = dict(vocab_size=128256, head_dim=128, num_kv_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
               rope_theta=500000.0, rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_position_embeddings=8192, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))
# The Llama 3 family by size (HF config.json of each); 3.2 ties its embeddings and scales RoPE by 32, 3.1 by 8.
LADDER: dict[str, ModelConfig] = {
    "1B": PRESETS["llama-3.2-1b"],
    "3B": ModelConfig(hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, tie_word_embeddings=True,
                      rope_factor=32.0, **_LLAMA3),
    "8B": ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, rope_factor=8.0,
                      **_LLAMA3),
    "70B": ModelConfig(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, rope_factor=8.0,
                       **_LLAMA3),
    "405B": ModelConfig(hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128, rope_factor=8.0,
                        **_LLAMA3),
}


# ----------------------------------------------------------------------------------------------------------------
# Abstract trees


def abstract_quantize(params: Any) -> Any:
    """The tree `quant.quantize_params(params, "nf4", double_quant=True)` returns, as ShapeDtypeStructs: each
    decoder linear kernel [L, in, out] becomes its qkernel layout (quantization itself is not traceable)."""
    def visit(node: dict, path: tuple[str, ...]) -> dict:
        new = {k: visit(v, (*path, k)) if isinstance(v, dict) else v for k, v in node.items()}
        if "kernel" in new and quant.decoder_linears(path):
            layers, d_in, d_out = new.pop("kernel").shape
            new["qkernel"] = quant.qkernel_layout((d_out, d_in), True, layers)
        return new

    return visit(params, ())


def abstract_model(cfg: ModelConfig, method: str) -> tuple[ModelConfig, Any, Any]:
    """(model settings, frozen, trainable) of `method` as ShapeDtypeStructs, as `setup.build_model` splits them."""
    cfg = cfg.replace(dtype="bfloat16", remat="full", scan_layers=True, dropout_rate=0.0)
    if method == "full":
        return cfg, {}, param_shapes(cfg.replace(param_dtype="float32"))
    base = param_shapes(cfg.replace(param_dtype="bfloat16"))
    adapters = jax.eval_shape(lambda: lora.init_adapters(cfg, LORA, jax.random.key(0)))
    frozen, trainable = lora.split(base, LORA, adapters)
    if method == "qlora":
        frozen = abstract_quantize(frozen)
    return lora.model_config(cfg, LORA), frozen, trainable


def first_devices(devices: int, data: int, fsdp: int) -> Mesh:
    """`sharded.make_mesh(data, fsdp, 1)` over the first `devices` devices (the process forces more)."""
    ordered = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:devices]
    return Mesh(np.asarray(ordered).reshape(data, fsdp, 1), sharded.AXES)


def placed(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a placed tree (every shard of a leaf has the same shape: `leaf_spec` splits only
    axes its mesh axis divides)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------------
# One measurement


def measure(cfg: ModelConfig, method: str, devices: int, layout: str, seq_len: int = SEQ_LEN) -> dict[str, Any]:
    """Per-device bytes of the sharded SFT step for `method` on `devices` devices laid out as "data" or "fsdp".

    Returns parameters / optimizer / batch (from the shardings), XLA's argument / output / alias / temp bytes,
    total = argument + output - alias + temp, and the seconds lowering and compiling took.
    """
    data, fsdp = (devices, 1) if layout == "data" else (1, devices)
    mesh = first_devices(devices, data, fsdp)
    model_cfg, frozen, trainable = abstract_model(cfg, method)
    optim = OptimSection()  # AdamW, clipping at 1.0: the trainer's defaults
    optimizer = make_optimizer(optim, total_steps=1000)
    state = jax.eval_shape(lambda t: init_state(t, optimizer, 0), trainable)
    state = placed(state, sharded.state_shardings(state, mesh))
    frozen = placed(frozen, sharded.tree_shardings(frozen, mesh))
    batch = {k: jax.ShapeDtypeStruct((devices, 1, 1, seq_len), dtype, sharding=sharded.batch_sharding(mesh))
             for k, dtype in ROW_KEYS.items()}  # [G, A, b, T]: one row per group, one micro-batch
    train, _ = sharded.compile_steps(SFT(model_cfg, ("sft",)), optimizer, schedule(optim, 1000), mesh,
                                     jax.tree.map(lambda x: x.sharding, state),
                                     jax.tree.map(lambda x: x.sharding, frozen), {})
    start = time.perf_counter()
    compiled = train.lower(state, frozen, {}, batch).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    out = {
        "parameters": device_bytes(state["trainable"]) + device_bytes(frozen),
        "trainable": device_bytes(state["trainable"]),
        "frozen": device_bytes(frozen),
        "optimizer": device_bytes(state["opt_state"]),
        "batch": device_bytes(batch),
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "compile_s": seconds,
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temporaries"]
    return out


def static_bytes(cfg: ModelConfig, method: str, devices: int, layout: str) -> int:
    """Parameters + optimizer state per device from the shardings alone (no compile): a lower bound of the total."""
    data, fsdp = (devices, 1) if layout == "data" else (1, devices)
    mesh = first_devices(devices, data, fsdp)
    _, frozen, trainable = abstract_model(cfg, method)
    state = jax.eval_shape(lambda t: init_state(t, make_optimizer(OptimSection(), 1000), 0), trainable)
    return (device_bytes(placed(state, sharded.state_shardings(state, mesh)))
            + device_bytes(placed(frozen, sharded.tree_shardings(frozen, mesh))))


# ----------------------------------------------------------------------------------------------------------------
# The tables


def cells(ladder: bool, log) -> dict[tuple[str, str, int, str], dict[str, Any]]:
    """Every measured (model, method, devices, layout). The 8B at 1 / 8 / 64 devices; with `ladder`, per method,
    layout and device count the ladder from the smallest model up to the first that does not fit (a model whose
    parameters and optimizer state alone exceed the budget is not compiled)."""
    results: dict[tuple[str, str, int, str], dict[str, Any]] = {}

    def run(model, method, devices, layout):
        key = (model, method, devices, layout)
        if key not in results:
            floor = static_bytes(LADDER[model], method, devices, layout)
            results[key] = ({"static_only": True, "parameters+optimizer": floor} if floor > BUDGET
                            else measure(LADDER[model], method, devices, layout))
            log(key, results[key])
        return results[key]

    for method in METHODS:
        run("8B", method, 1, "data")
        for devices in (8, 64):
            for layout in ("data", "fsdp"):
                run("8B", method, devices, layout)
    if ladder:
        for method in METHODS:
            for devices in (8, 64):
                for layout in ("data", "fsdp"):
                    for model in LADDER:
                        if not fits(run(model, method, devices, layout)):
                            break
    return results


def fits(cell: dict[str, Any]) -> bool:
    return not cell.get("static_only") and cell["total"] <= BUDGET


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def table_8b(results) -> str:
    lines = ["| method | devices | layout | parameters | optimizer state | temporaries | total |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        for devices, layouts in ((1, ("data",)), (8, ("data", "fsdp")), (64, ("data", "fsdp"))):
            for layout in layouts:
                c = results[("8B", method, devices, layout)]
                name = "one device" if devices == 1 else {"data": "data-parallel", "fsdp": "FSDP"}[layout]
                if c.get("static_only"):
                    lines.append(f"| {method} | {devices} | {name} | {gb(c['parameters+optimizer'])} "
                                 "(with optimizer) | | (not compiled) | > 80 |")
                    continue
                lines.append(f"| {method} | {devices} | {name} | {gb(c['parameters'])} | {gb(c['optimizer'])} | "
                             f"{gb(c['temporaries'])} | {gb(c['total'])} |")
    return "\n".join(lines)


def table_fit(results) -> str:
    columns = [(8, "data"), (8, "fsdp"), (64, "data"), (64, "fsdp")]
    head = " | ".join(f"{'data-parallel' if layout == 'data' else 'FSDP'} x{n}" for n, layout in columns)
    lines = [f"| method | {head} |", "| --- |" + " --- |" * len(columns)]
    for method in METHODS:
        row = []
        for n, layout in columns:
            measured = [(m, results[(m, method, n, layout)]) for m in LADDER if (m, method, n, layout) in results]
            fitting = [(m, c) for m, c in measured if fits(c)]
            best = f"{fitting[-1][0]} ({gb(fitting[-1][1]['total'])} GB)" if fitting else "none"
            beyond = [(m, c) for m, c in measured if not fits(c)]
            if beyond:
                m, c = beyond[0]
                need = c["parameters+optimizer"] if c.get("static_only") else c["total"]
                best += f"; {m}: {gb(need)}{'+' if c.get('static_only') else ''}"
            else:
                best += "; the largest tried"
            row.append(best)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def table_ladder(results) -> str:
    lines = ["| model | method | devices | layout | parameters | optimizer | temporaries | total | compile s |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (model, method, devices, layout), c in results.items():
        if c.get("static_only"):
            lines.append(f"| {model} | {method} | {devices} | {layout} | {gb(c['parameters+optimizer'])} (with "
                         "optimizer) | | (not compiled) | > 80 | |")
        else:
            lines.append(f"| {model} | {method} | {devices} | {layout} | {gb(c['parameters'])} | "
                         f"{gb(c['optimizer'])} | {gb(c['temporaries'])} | {gb(c['total'])} | {c['compile_s']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main


def host() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    field = lambda key: (re.search(rf"^{key}:\s*(.+)$", lscpu, re.M) or [None, "?"])[1].strip()  # noqa: E731
    return f"{field('Model name')} family {field('CPU family')} model {field('Model')}, {os.cpu_count()} cores"


def write_readme(block: str) -> None:
    """Put `block` between the simulate markers of README.md (appended when they are missing)."""
    readme = HERE / "README.md"
    begin, end = "<!-- simulate.py: begin -->", "<!-- simulate.py: end -->"
    text = readme.read_text() if readme.exists() else ""
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + new + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + new + "\n"
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ladder", action="store_true", help="the 8B table only (no fit ladder)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave README.md and results/ alone")
    args = parser.parse_args()
    command = "python experiments/memory/simulate.py" + (" --no-ladder" if args.no_ladder else "")
    start = time.perf_counter()

    def log(key, cell):
        detail = (f"params+opt {gb(cell['parameters+optimizer'])} GB > 80: not compiled" if cell.get("static_only")
                  else f"total {gb(cell['total'])} GB, compile {cell['compile_s']:.0f} s")
        print(f"[{time.perf_counter() - start:6.0f} s] {' '.join(map(str, key))}: {detail}", flush=True)

    results = cells(not args.no_ladder, log)
    minutes = (time.perf_counter() - start) / 60
    date = datetime.date.today().isoformat()
    parts = [f"Made by `{command}` on {date} (jax {jax.__version__}, {host()}, {minutes:.0f} min; XLA:CPU with "
             f"{DEVICES} forced host devices). Sequence length {SEQ_LEN}, one row per group, bfloat16 compute, "
             "remat full. GB = 1e9 bytes, per device.",
             "### Llama 3.1 8B, per device (GB)", table_8b(results)]
    if not args.no_ladder:
        parts += ["### The largest Llama 3 model that fits an 80 GB device (total per device, GB; then the next "
                  "size up and what it would need, `+`: parameters and optimizer state alone)", table_fit(results),
                  "### Every measured cell (GB per device)", table_ladder(results)]
    block = "\n\n".join(parts)
    print(block)
    if not args.no_write:
        write_readme(block)
        out = HERE / "results" / f"simulate-{date}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"command": command, "date": date, "host": host(), "seq_len": SEQ_LEN,
                                   "cells": [{"model": k[0], "method": k[1], "devices": k[2], "layout": k[3], **v}
                                             for k, v in results.items()]}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
