"""Experiment d: hyperparameter search. A Hydra grid and an Optuna TPE sweep over the same space (LoRA learning
rate x rank) with the same budget (9 runs of 150 steps each): which finds the better configuration, at what cost.

    python experiments/search/run.py

runs the two sweeps (conf/experiment/lora_grid.yaml, conf/experiment/lora_tpe.yaml):
    sftjax-train -m method=lora experiment=lora_grid
    sftjax-train -m method=lora experiment=lora_tpe
Both minimise the task loss on the validation splits (trainer.best_metric = eval/loss, what sftjax-train returns to
the sweeper); the tables also give each run's exact match on the test splits (reported, never used to choose).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, pct, pyplot, report, sweep, table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
SWEEPS = {"grid": "lora_grid", "TPE": "lora_tpe"}


def trials(jobs: list[Path]) -> list[dict]:
    """A sweep's runs (results/ copies, in the order they ran): lr, rank, validation loss, test exact match, seconds."""
    out = []
    for i, job in enumerate(jobs):
        config = json.loads((job / "config.json").read_text())
        final = json.loads((job / "final_metrics.json").read_text())
        r = report(job)
        out.append({"job": i, "lr": config["optim"]["lr"], "rank": config["method"]["lora"]["rank"],
                    "eval_loss": final["eval/loss"], "mean": r["mean"],
                    "seconds": sum(r["numbers"]["seconds"].values()), "dir": job})
    return out


def main() -> None:
    found, text = {}, []
    for label, experiment in SWEEPS.items():
        runs = trials(sweep(HERE / "results", experiment, "method=lora", f"experiment={experiment}"))
        found[label] = runs
        best = min(runs, key=lambda t: t["eval_loss"])
        text += [f"**{label}** (`sftjax-train -m method=lora experiment={experiment}`): {len(runs)} runs, "
                 f"{sum(t['seconds'] for t in runs) / 60:.1f} min in all; best: lr {best['lr']:.2e}, rank "
                 f"{best['rank']}, validation loss {best['eval_loss']:.4f}, test exact match {pct(best['mean'])} "
                 f"(run {best['job'] + 1}).", "",
                 table(["run", "lr", "rank", "validation loss", "mean test exact match", "seconds"],
                       [[t["job"] + 1, f"{t['lr']:.2e}", t["rank"], f"{t['eval_loss']:.4f}", pct(t["mean"]),
                         f"{t['seconds']:.0f}"] for t in runs]), ""]
    first = found["grid"][0]["dir"]
    text = [f"Measured {machine(first)}; `python experiments/search/run.py`.", "", *text, "![best so far](search.png)"]
    if not write_results(HERE, "\n".join(text)):
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, runs) in enumerate(found.items()):
        best = [min(t["eval_loss"] for t in runs[:k + 1]) for k in range(len(runs))]
        axes[0].plot(range(1, len(runs) + 1), best, marker="o", color=f"C{i}", label=label)
        axes[1].scatter([t["lr"] for t in runs], [t["eval_loss"] for t in runs], color=f"C{i}", label=label,
                        s=[12 + t["rank"] for t in runs], alpha=0.7)
    axes[0].set_xlabel("runs so far")
    axes[0].set_ylabel("best validation loss so far")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("learning rate (marker size: rank)")
    axes[1].set_ylabel("validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "search.png", dpi=110)


if __name__ == "__main__":
    main()
