"""The markdown report of a bench.py result dict (one table per section present)."""

from __future__ import annotations

from typing import Any

MiB = 2**20
STEPS = {  # --parallelism: which sftjax train step the speed, memory, compile and scaling sections ran
    "data": "parallelism data, the pmap step (`train/step.py`), one device",
    "fsdp": ("parallelism fsdp, the sharded jit step (`train/sharded.py`) on a one-device mesh (data 1, fsdp 1, "
             "tensor 1): nothing is split on one device"),
}


def _f(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def header(r: dict[str, Any]) -> list[str]:
    m, host, v = r["model"], r["machine"], r["versions"]
    s = r["settings"]
    on_gpu = s.get("platform") == "gpu"
    precision = {"float32": "float32", "bf16": "bf16 mixed precision (bfloat16 compute; float32 master weights "
                 "for full fine-tuning, bfloat16 frozen base + float32 adapters for LoRA / QLoRA)"}[
        s.get("precision", "float32")]
    lines = [
        f"# sftjax vs transformers + PEFT: train step on {'GPU' if on_gpu else 'CPU'}"
        + (" (--quick: tiny config, not a measurement)" if r["quick"] else ""),
        "",
        f"- date {r['date']}; machine: {host['cpu']}"
        + (f" ({host['cpu_id']})" if host.get("cpu_id") else "") + f", {host['cores']} cores"
        + (f"; GPU {host.get('gpu')}" if on_gpu else "") + f"; Python {host['python']}",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- command: `{r['command']}`",
        (f"- load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in r['load_before'])}, after "
         f"{'/'.join(f'{x:.2f}' for x in r['load_after'])}; wall time {r['wall_s']:.0f} s"),
        (f"- model: {m['family']}, vocab {m['vocab_size']}, width {m['hidden_size']}, {m['num_layers']} layers, "
         f"{m['num_heads']} q / {m['num_kv_heads']} kv heads of {m['head_dim']}, FFN {m['intermediate_size']}, "
         f"{'tied' if m['tie_word_embeddings'] else 'untied'}, {m['num_params'] / 1e6:.2f}M parameters, {precision}; "
         f"batch {s['batch']} x seq {s['seq']}; LoRA r={s['lora']['rank']} alpha={s['lora']['alpha']:g} on "
         "q,k,v,o,gate,up,down; AdamW; QLoRA NF4 + double quant"),
        (f"- speed: the stacks take turns of {s['turn']} steps; medians of {s['steps']} steady steps (a turn's "
         f"first step not counted) after {s['warmup']} warm-up turn{'s' if s['warmup'] != 1 else ''} each"),
        f"- sftjax step: {STEPS[s.get('parallelism', 'data')]}",
    ]
    return lines


def peak(r: dict[str, Any]) -> list[str]:
    p = r["peak"]
    return ["", f"## Matmul peak ({p.get('dtype', 'float32')})", "",
            (f"jax (jit, [{p['n']}, {p['n']}] @ [{p['n']}, {p['n']}]): **{p['jax_gflops']:.1f} GFLOP/s**; torch: "
             f"{p['torch_gflops']:.1f} GFLOP/s (medians of {len(p['jax_runs'])} rounds). MFU below is against the "
             "jax figure for both stacks.")]


def speed(r: dict[str, Any]) -> list[str]:
    rows = []
    for mode, x in r["speed"].items():
        a, b = x["sftjax"], x["peer"]
        rows.append([mode, _f(a["tokens_per_s"]), _f(b["tokens_per_s"]), f"**{x['ratio']:.2f}x**",
                     _f(x["flops_per_token"] / 1e6, 1), _pct(a.get("mfu")), _pct(b.get("mfu")),
                     f"{a['losses'][0]:.4f} / {b['losses'][0]:.4f}", _f(a["first_step_s"], 1)])
    facts = next(iter(r["speed"].values()))["peer_setup"]
    return ["", "## Train-step throughput", "",
            *_table(["mode", "sftjax tokens/s", "peer tokens/s", "sftjax / peer", "MFLOP/token", "sftjax MFU",
                     "peer MFU", "loss of step 1 (sftjax / peer)", "first sftjax step s (compiles)"], rows),
            "", (f"Peer: torch on {facts.get('device', 'cpu')} ({facts['threads']} CPU threads), attention "
                 f"`{facts['attn_implementation']}`, "
                 f"{facts['optimizer']}; QLoRA layers `{_qlora_class(r)}`."),
            *_turn_first_steps(r)]


def _turn_first_steps(r: dict[str, Any]) -> list[str]:
    """The first step of each turn (after the other stack's turn), not counted above, against the steady step."""
    parts = [f"{mode} {x['sftjax']['turn_first_step_s']:.3f} vs {x['sftjax']['step_s']:.3f} s (peer "
             f"{x['peer']['turn_first_step_s']:.3f} vs {x['peer']['step_s']:.3f})" for mode, x in r["speed"].items()]
    return ["", "First step of a turn against the steady step, medians, sftjax: " + "; ".join(parts) + "."]


def _qlora_class(r: dict[str, Any]) -> str:
    q = r.get("speed", {}).get("qlora") or r.get("memory", {}).get("qlora", {}).get("peer")
    return (q or {}).get("peer_setup", {}).get("q_proj_class", "-")


def memory(r: dict[str, Any]) -> list[str]:
    rows = []
    device = any(x.get("device_peak_bytes") is not None for stacks in r["memory"].values() for x in stacks.values())
    for mode, stacks in r["memory"].items():
        for stack, x in stacks.items():
            rows.append([mode, stack, *([_mib(x.get("device_peak_bytes"))] if device else []),
                         _f(x["peak_rss_mib"]), _f(x["rss_after_imports_mib"]),
                         _mib(x["trainable_bytes"]), _mib(x["frozen_bytes"]), _mib(x["opt_state_bytes"]),
                         _mib(x.get("xla_temp_bytes")), _f(x["solo_tokens_per_s"])])
    return ["", "## Memory (each stack and mode alone in its own process)", "",
            *_table(["mode", "stack", *(["peak device memory MiB"] if device else []), "peak RSS MiB",
                     "RSS after imports MiB", "trainable params MiB", "frozen params MiB", "optimizer state MiB",
                     "XLA temp buffers MiB", "tokens/s alone"], rows),
            "", ("Frozen params under QLoRA: 4-bit codes + quantization constants + the float parts (embeddings, "
                 "norms, lm_head). XLA temp buffers: activations, gradients and scratch of the compiled sftjax step.")]


def compile_time(r: dict[str, Any]) -> list[str]:
    c = r["compile"]
    cell = {(x["mode"], x["layers"], x["scan_layers"]): x for x in c["rows"]}
    rows = []
    for mode, layers in dict.fromkeys((x["mode"], x["layers"]) for x in c["rows"]):
        row = [mode, str(layers)]
        for scan in (True, False):
            x = cell[(mode, layers, scan)]
            row.append(f"{x['lower_s']:.1f} + {x['compile_s']:.1f} = **{x['lower_s'] + x['compile_s']:.1f}**")
        rows.append(row)
    return ["", f"## Compile time of the first sftjax step (batch {c['batch']} x {c['seq']})", "",
            *_table(["mode", "layers", "scan_layers=True: trace+lower + compile s",
                     "scan_layers=False (unrolled)"], rows)]


def scaling(r: dict[str, Any]) -> list[str]:
    sc = r["scaling"]
    cell = {(x["batch"], x["seq"], x["remat"]): x for x in sc["rows"]}
    b0, t0 = sc["seq_sweep"][0]

    def table(shapes: list[list[int]]) -> list[str]:
        rows = []
        for b, T in shapes:
            row = [str(b), str(T), str(b * T)]
            for remat in ("none", "full"):
                x = cell.get((b, T, remat))
                row += ["-"] * 3 if x is None else [_f(x["tokens_per_s"]), _pct(x.get("mfu")),
                                                    _mib(x["xla_temp_bytes"])]
            rows.append(row)
        return _table(["batch", "seq", "tokens/batch", "tokens/s", "MFU", "XLA temp MiB", "tokens/s remat=full",
                       "MFU", "XLA temp MiB"], rows)

    return ["", f"## Scaling of the sftjax step ({sc['mode']})", "",
            f"Sequence length at fixed tokens per batch ({b0 * t0}):", "", *table(sc["seq_sweep"]), "",
            f"Batch size at seq {sc['batch_sweep'][0][1]}:", "", *table(sc["batch_sweep"]), "",
            "MFU here counts attention FLOPs at each row's sequence length (12 L T N H per token)."]


def floor(r: dict[str, Any]) -> list[str]:
    rows = []
    for mode, f in r["floor"].items():
        rows.append([mode, _f(f["flops"] / 1e9, 1), f"{f['floor_s']:.3f}", _f(f["gflops_per_s"]),
                     _f(f["tokens_per_s"]), f"**{f['vs_peer']:.2f}x**" if "vs_peer" in f else "-",
                     _pct(f.get("share_of_step")), f"{f['peer_x125_step_s']:.3f}" if "peer_x125_step_s" in f else "-"])
    return ["", "## Matmul floor of the sftjax step", "",
            ("Every matmul of the step (forward, backward, attention's recomputation; experiments/bench/floor.py) "
             "timed alone through jax and summed: the fastest the step could run if nothing else took time."), "",
            *_table(["mode", "matmul GFLOP per step", "floor s", "GFLOP/s at the floor", "tokens/s at the floor",
                     "floor / peer tokens/s", "floor / sftjax step", "step s for 1.25x the peer"], rows)]


def markdown(r: dict[str, Any]) -> str:
    lines = header(r)
    for key, fn in (("peak", peak), ("speed", speed), ("memory", memory), ("compile", compile_time),
                    ("scaling", scaling), ("floor", floor)):
        if key in r:
            lines += fn(r)
    return "\n".join(lines) + "\n"
