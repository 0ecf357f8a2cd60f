"""Experiment b: data efficiency. Held-out accuracy against the number of labeled training examples per task.

    python experiments/data_efficiency/run.py

The main job (full fine-tuning, 300 steps) with builtin.train_examples = N per task (capped by what the task has:
module 1,050, first_param 5,383, add 8,000 at N = 8000). Same steps for every N: small N means more epochs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, pct, pyplot, report, table, train, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = (32, 128, 512, 2048, 8000)


def main() -> None:
    reports, used = {}, {}
    for n in SIZES:
        overrides = () if n == 8000 else (f"builtin.train_examples={n}",)  # 8000: the main job's default
        run_dir = train(HERE / "results", f"n{n}", *overrides)
        reports[n] = report(run_dir)
        used[n] = json.loads((run_dir / "train_sizes.json").read_text())
    tasks = reports[SIZES[0]]["tasks"]
    rows = [[n, ", ".join(f"{used[n][t]:,}" for t in tasks), *(pct(reports[n]["fine_tuned"][t]) for t in tasks),
             f"**{pct(reports[n]['mean'])}**", f"{reports[n]['forgetting']:+.3f}"] for n in SIZES]
    header = ["N asked", f"examples used ({', '.join(tasks)})", *tasks, "mean", "forgetting"]
    zero = reports[SIZES[0]]
    text = "\n".join([
        f"Measured {machine(HERE / 'results' / 'n8000')}; `python experiments/data_efficiency/run.py`.", "",
        table(header, rows), "",
        f"Base without fine-tuning: {pct(sum(zero['zero_shot'].values()) / len(tasks))} zero-shot, "
        f"{pct(sum(zero['few_shot'].values()) / len(tasks))} {zero['k']}-shot (mean exact match).", "",
        "![accuracy vs examples](data_efficiency.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for t in tasks:
        ax.plot(SIZES, [100 * reports[n]["fine_tuned"][t] for n in SIZES], marker="o", label=t)
    ax.plot(SIZES, [100 * reports[n]["mean"] for n in SIZES], marker="s", color="black", label="mean")
    ax.set_xscale("log")
    ax.set_xlabel("labeled training examples per task (asked; capped by the task's size)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "data_efficiency.png", dpi=110)


if __name__ == "__main__":
    main()
