"""Experiment e: multi-task vs single-task fine-tuning.

    python experiments/multitask/run.py

One model fine-tuned on the mixture of the three built-in tasks (the main job: 300 steps) against three models,
each fine-tuned on one task alone with the same settings and the same 300 steps (so three times the compute in
all). Every model is scored on every task's held-out split.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, pct, pyplot, report, table, train, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
TASKS = ("module", "first_param", "add")


def main() -> None:
    multi = train(HERE / "results", "multi")  # the main job's defaults: the mixture of all three tasks
    reports = {"multi-task (one model)": report(multi)}
    for t in TASKS:
        reports[f"single-task: {t}"] = report(train(HERE / "results", f"single_{t}", f"builtin.tasks=[{t}]"))
    m = reports["multi-task (one model)"]
    single = {t: reports[f"single-task: {t}"]["fine_tuned"][t] for t in TASKS}
    seconds = lambda r: r["numbers"]["seconds"]["fine_tuning"]  # noqa: E731
    rows = [["multi-task (one model, 300 steps)", *(pct(m["fine_tuned"][t]) for t in TASKS),
             f"**{pct(m['mean'])}**", f"{m['forgetting']:+.3f}", f"{seconds(m):.0f}"],
            ["single-task (three models, 300 steps each)", *(pct(single[t]) for t in TASKS),
             f"**{pct(sum(single.values()) / len(TASKS))}**",
             " / ".join(f"{reports[f'single-task: {t}']['forgetting']:+.3f}" for t in TASKS),
             f"{sum(seconds(reports[f'single-task: {t}']) for t in TASKS):.0f}"]]
    header = ["fine-tuning", *TASKS, "mean", "forgetting", "fine-tuning seconds"]
    text = "\n".join([f"Measured {machine(multi)}; `python experiments/multitask/run.py`.", "", table(header, rows), "",
                      "Each single-task model is scored on its own task (the table) and forgetting is given per "
                      "model (module / first_param / add).", "", "![multi vs single](multitask.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = range(len(TASKS))
    ax.bar([i - 0.2 for i in x], [100 * m["fine_tuned"][t] for t in TASKS], width=0.4, label="multi-task")
    ax.bar([i + 0.2 for i in x], [100 * single[t] for t in TASKS], width=0.4, label="single-task")
    ax.set_xticks(list(x), TASKS)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "multitask.png", dpi=110)


if __name__ == "__main__":
    main()
