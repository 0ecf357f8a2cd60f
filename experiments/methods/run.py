"""Experiment a: full fine-tuning vs LoRA (r = 4, 16, 64) vs QLoRA (NF4, int4) on the main job; adapters alone,
and with the tied embedding and the final norm trained too (the main job's method=lora / qlora).

    python experiments/methods/run.py

Each method runs the main job (`sftjax-train` defaults: 300 steps of 32 x 128 tokens on the three built-in tasks,
lr 3e-3) with one override; see README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, pct, pyplot, report, table, train, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
ADAPTERS_ONLY = ("method.lora.alpha=32", "method.lora.trainable_modules=[]")  # alpha 32, nothing else trained
WITH_EMBEDDING = ("method.lora.rank=64", "method.lora.alpha=128", "method.lora.trainable_modules=[embed_tokens,norm]")
RUNS = {
    "full": (),
    "LoRA r=4": ("method=lora", "method.lora.rank=4", *ADAPTERS_ONLY),
    "LoRA r=16": ("method=lora", "method.lora.rank=16", *ADAPTERS_ONLY),
    "LoRA r=64": ("method=lora", "method.lora.rank=64", *ADAPTERS_ONLY),
    "QLoRA NF4 r=16": ("method=qlora", "method.lora.rank=16", "method.quant.kind=nf4", *ADAPTERS_ONLY),
    "QLoRA int4 r=16": ("method=qlora", "method.lora.rank=16", "method.quant.kind=int4", *ADAPTERS_ONLY),
    # The main job's `method=lora` / `method=qlora` (conf/experiment/main.yaml): the tied embedding and the final
    # norm trained too (PEFT's modules_to_save), rank 64, scale 2.
    "LoRA r=64 + embedding": ("method=lora", *WITH_EMBEDDING),
    "QLoRA NF4 r=64 + embedding": ("method=qlora", "method.quant.kind=nf4", *WITH_EMBEDDING),
}


def main() -> None:
    reports, dirs = {}, {}
    for name, overrides in RUNS.items():
        dirs[name] = train(HERE / "results", name.replace(" ", "_").replace("=", ""), *overrides)
        reports[name] = report(dirs[name])
    tasks = next(iter(reports.values()))["tasks"]
    rows = []
    for name, r in reports.items():
        n = r["numbers"]
        rows.append([name, f"{n['trainable_params']:,}", f"{n['frozen_bytes'] / 2**20:.2f}",
                     f"{n['train_tokens_per_s']:,.0f}", *(pct(r["fine_tuned"][t]) for t in tasks),
                     f"**{pct(r['mean'])}**", f"{r['forgetting']:+.3f}"])
    header = ["method", "trainable params", "frozen weights (MiB)", "train tokens/s", *tasks, "mean",
              "forgetting (corpus loss increase)"]
    base = next(iter(reports.values()))
    text = "\n".join([
        f"Measured {machine(dirs['full'])}; `python experiments/methods/run.py`.", "",
        table(header, rows), "",
        f"Base before fine-tuning: held-out corpus loss {base['corpus_loss_base']:.3f}; mean exact match "
        f"{pct(sum(base['zero_shot'].values()) / len(tasks))} zero-shot, "
        f"{pct(sum(base['few_shot'].values()) / len(tasks))} {base['k']}-shot. Frozen weights: the bytes of the "
        "base held frozen in memory (full fine-tuning trains all of them: 0); tokens/s: median over the run's "
        "logged windows (non-padding tokens, first window with compilation left out).", "",
        "![accuracy vs forgetting](methods.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in reports.items():
        ax.scatter(r["forgetting"], 100 * r["mean"], s=40, label=name)
    ax.set_xlabel("forgetting: increase of held-out corpus loss (nats / token)")
    ax.set_ylabel("mean held-out exact match (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "methods.png", dpi=110)


if __name__ == "__main__":
    main()
