"""Per-device memory of the sharded train step at scale, by simulation: nothing is allocated but the compile.

    python experiments/memory/simulate.py             # Llama 3.1 8B at 1 / 8 / 64 devices + the fit ladder (README)
    python experiments/memory/simulate.py --no-ladder # the 8B table alone
    python experiments/memory/simulate.py --no-ladder --cpu-licm --no-write   # XLA:CPU's own pass pipeline

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
# XLA:CPU computes bfloat16 dots in float32, and its loop-invariant code motion then converts whole stacked
# bfloat16 arrays to float32 once, before the layer loop: for the 8B LoRA on one device a float32 copy of the
# frozen base, +28 GB of temporaries that a GPU, with native bfloat16 dots, never makes. The pass is off by
# default (the 8B table both ways: README.md); --cpu-licm turns it back on.
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
if __name__ == "__main__":  # before jax is imported; a smaller mesh uses the first N devices
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                        f"--xla_force_host_platform_device_count={DEVICES}",
                                        *([] if "--cpu-licm" in sys.argv else [NO_LICM])]).strip()

import argparse  # noqa: E402
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
# The rows of data/packing.py that SFT reads (class_ids it does not: jit drops an unused argument anyway).
ROW_KEYS = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
            "positions": jnp.int32, "task_ids": jnp.int32}

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
    gather, gather_shape = largest_gather(compiled.as_text())
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
        "largest_gather": gather,  # bytes of the largest all-gather result in the per-device program
        "largest_gather_shape": gather_shape,
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temporaries"]
    return out


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
              "s64": 8, "u64": 8, "f64": 8}


def largest_gather(hlo: str) -> tuple[int, str]:
    """(bytes, "f32[64,1,2048,14336]") of the largest all-gather in a compiled module's text: what one device
    gathers at once (a layer's weight under FSDP; activations of every group where the partitioner gathers those
    instead)."""
    best = (0, "")
    for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(", hlo):
        size = math.prod(int(d) for d in dims.split(",") if d) * _HLO_BYTES.get(dtype, 4)
        best = max(best, (size, f"{dtype}[{dims}]"))
    return best


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
    """Every measured (model, method, devices, layout). The 8B at 1 / 8 / 64 devices, all compiled; with `ladder`,
    per method, layout and device count the ladder from the smallest model up to the first that does not fit (one
    whose parameters and optimizer state alone exceed the budget is not compiled: nothing else could make it fit)."""
    results: dict[tuple[str, str, int, str], dict[str, Any]] = {}

    def run(model, method, devices, layout, prune):
        key = (model, method, devices, layout)
        if key not in results:
            held = static_bytes(LADDER[model], method, devices, layout) if prune else 0
            results[key] = ({"static_only": True, "parameters+optimizer": held} if held > BUDGET
                            else measure(LADDER[model], method, devices, layout))
            log(key, results[key])
        return results[key]

    for method in METHODS:
        for devices, layout in LAYOUTS_8B:
            run("8B", method, devices, layout, prune=False)
    if ladder:
        for method in METHODS:
            for devices, layout in FIT_COLUMNS:
                for model in LADDER:
                    if not fits(run(model, method, devices, layout, prune=True)):
                        break
    return results


LAYOUTS_8B = ((1, "data"), (8, "data"), (8, "fsdp"), (64, "data"), (64, "fsdp"))
FIT_COLUMNS = ((8, "data"), (8, "fsdp"), (64, "data"), (64, "fsdp"))
LAYOUT_NAMES = {"data": "data-parallel", "fsdp": "FSDP"}


def fits(cell: dict[str, Any]) -> bool:
    return not cell.get("static_only") and cell["total"] <= BUDGET


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def table_8b(results) -> str:
    lines = ["| method | devices | layout | parameters | optimizer state | temporaries | total |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        for devices, layout in LAYOUTS_8B:
            c = results[("8B", method, devices, layout)]
            name = "one device" if devices == 1 else LAYOUT_NAMES[layout]
            lines.append(f"| {method} | {devices} | {name} | {gb(c['parameters'])} | {gb(c['optimizer'])} | "
                         f"{gb(c['temporaries'])} | **{gb(c['total'])}** |")
    return "\n".join(lines)


def table_fit(results) -> str:
    """Per method and layout: the largest model that fits (its total), then the next size up and what it needs."""
    head = " | ".join(f"{LAYOUT_NAMES[layout]} x{n}" for n, layout in FIT_COLUMNS)
    lines = [f"| method | {head} |", "| --- |" + " --- |" * len(FIT_COLUMNS)]
    for method in METHODS:
        row = []
        for n, layout in FIT_COLUMNS:
            measured = [(m, results[(m, method, n, layout)]) for m in LADDER if (m, method, n, layout) in results]
            fitting = [(m, c) for m, c in measured if fits(c)]
            text = f"**{fitting[-1][0]}** ({gb(fitting[-1][1]['total'])})" if fitting else "none"
            beyond = [(m, c) for m, c in measured if not fits(c)]
            if beyond:
                m, c = beyond[0]
                text += (f"; {m} > {gb(c['parameters+optimizer'])}" if c.get("static_only")
                         else f"; {m} {gb(c['total'])}")
            else:
                text += "; the largest tried"
            row.append(text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def table_ladder(results) -> str:
    lines = ["| model | method | devices | layout | parameters | optimizer | temporaries | total | largest all-gather "
             "| compile s |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    order = sorted(results, key=lambda k: (METHODS.index(k[1]), list(LADDER).index(k[0]), k[2], k[3]))
    for key in order:
        model, method, devices, layout = key
        c = results[key]
        if c.get("static_only"):
            lines.append(f"| {model} | {method} | {devices} | {layout} | > {gb(c['parameters+optimizer'])} with the "
                         "optimizer state | | (not compiled) | > 80 | | |")
        else:
            gather = f"{c['largest_gather_shape']} {gb(c['largest_gather'])}" if c["largest_gather"] else "none"
            lines.append(f"| {model} | {method} | {devices} | {layout} | {gb(c['parameters'])} | {gb(c['optimizer'])} "
                         f"| {gb(c['temporaries'])} | {gb(c['total'])} | {gather} | {c['compile_s']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main


def host() -> str:
    """"AMD EPYC family 26 model 2, 2 cores": lscpu's model name, family and model (a cloud VM's name alone does
    not tell hosts apart)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    field = lambda key: (re.search(rf"^{key}:\s*(.+)$", lscpu, re.M) or [None, "?"])[1].strip()  # noqa: E731
    return f"{field('Model name')} family {field('CPU family')} model {field('Model')}, {os.cpu_count()} cores"


def write_readme(block: str) -> None:
    """Put `block` between the simulate.py markers of README.md (appended when they are missing); the rest of the
    README is written by hand."""
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
    parser.add_argument("--cpu-licm", action="store_true", help="keep XLA:CPU's loop-invariant code motion on")
    parser.add_argument("--no-write", action="store_true", help="print only; leave README.md and results/ alone")
    args = parser.parse_args()
    command = " ".join(["python experiments/memory/simulate.py", *(a for a in sys.argv[1:] if a != "--no-write")])
    start = time.perf_counter()

    def log(key, cell):
        detail = (f"params+opt {gb(cell['parameters+optimizer'])} GB > 80: not compiled" if cell.get("static_only")
                  else f"total {gb(cell['total'])} GB, compile {cell['compile_s']:.0f} s")
        print(f"[{time.perf_counter() - start:4.0f} s] {' '.join(map(str, key))}: {detail}", flush=True)

    results = cells(not args.no_ladder, log)
    minutes = (time.perf_counter() - start) / 60
    date = datetime.date.today().isoformat()
    licm = "on" if args.cpu_licm else "off"
    parts = [f"Made by `{command}` on {date}: jax {jax.__version__}, {host()}, {minutes:.0f} min; XLA:CPU with "
             f"{DEVICES} forced host devices, loop-invariant code motion {licm}. Sequence length {SEQ_LEN}, one row "
             "per group (per device) and micro-batch, bfloat16 compute, remat full, AdamW. GB = 1e9 bytes, per "
             "device; total = arguments + outputs - donated aliases + temporaries.",
             "#### Llama 3.1 8B, per device (GB)", table_8b(results)]
    if not args.no_ladder:
        parts += ["#### The largest Llama 3 model that fits an 80 GB device",
                  "Each cell: the largest of 1B / 3B / 8B / 70B / 405B whose total per device is at most 80 GB "
                  "(that total), then the next size up and its total (`>`: its parameters and optimizer state "
                  "alone, not compiled).", table_fit(results),
                  "#### Every measured cell (GB per device)", table_ladder(results)]
    block = "\n\n".join(parts)
    print(block)
    if not args.no_write:
        write_readme(block)
        out = HERE / "results" / f"simulate-{date}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"command": command, "date": date, "host": host(), "jax": jax.__version__,
                                   "seq_len": SEQ_LEN, "cpu_licm": args.cpu_licm,
                                   "cells": [{"model": k[0], "method": k[1], "devices": k[2], "layout": k[3], **v}
                                             for k, v in results.items()]}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
