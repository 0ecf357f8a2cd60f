"""Experiment g: `module` as a classification head vs as generated text, on the trunk it shares with the other two
tasks.

    python experiments/task_heads/run.py

The experiments' recipe (full fine-tuning, 300 steps, lr 3e-3) on the three built-in tasks, three data orders:
text = the main job as is (`module` answered by generating the module's name); head = `objective=heads
builtin.heads=[module]` (a 5-class head on the last prompt token, the other two tasks still generated).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import curve, machine, pct, pyplot, report, table, train, write_results

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
VARIANTS = {
    "text": (),
    "head": ("objective=heads", "builtin.heads=[module]"),
}
KEY = "module/accuracy"  # eval lines: the head's accuracy (head) / token accuracy on module's answer (text)


def module_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, values = curve(run_dir, "eval", KEY)
    if not steps:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'}: no eval line with {KEY}")
    return steps, values


def steps_to_95(run_dir: Path) -> int:
    """The first eval step at which module's validation metric reached 95% of its final (last eval) value."""
    steps, values = module_curve(run_dir)
    return next(s for s, v in zip(steps, values) if v >= 0.95 * values[-1])


def seconds(r: dict) -> float:
    return r["numbers"]["seconds"]["fine_tuning"]


def mean_sd(values: list[float]) -> str:
    """Mean ± standard deviation (over the data orders)."""
    return f"{pct(statistics.mean(values))} ± {pct(statistics.stdev(values))}"


def main() -> None:
    dirs = {v: [train(HERE / "results", f"{v}_s{s}", *overrides, f"data.seed={s}") for s in SEEDS]
            for v, overrides in VARIANTS.items()}
    reports = {v: [report(d) for d in ds] for v, ds in dirs.items()}
    tasks = reports["text"][0]["tasks"]
    others = [t for t in tasks if t != "module"]
    names = {"text": "text (generated name, exact match)", "head": "head (5-class, accuracy)"}
    rows = []
    for v, rs in reports.items():
        rows.append([names[v], mean_sd([r["fine_tuned"]["module"] for r in rs]),
                     *(pct(statistics.mean(r["fine_tuned"][t] for r in rs)) for t in others),
                     f"**{mean_sd([r['mean'] for r in rs])}**", f"{statistics.mean(r['forgetting'] for r in rs):+.3f}",
                     f"{statistics.mean(seconds(r) for r in rs):.0f}",
                     " / ".join(str(steps_to_95(d)) for d in dirs[v])])
    header = ["module as", "module", *others, "mean", "forgetting", "fine-tuning seconds",
              "steps to 95% of final validation module accuracy (order 0 / 1 / 2)"]
    every = json.loads((dirs["text"][0] / "config.json").read_text())["trainer"]["eval_every"]
    per_order = "; ".join(f"{v}: " + " / ".join(pct(r["fine_tuned"]["module"]) for r in rs)
                          for v, rs in reports.items())
    text = "\n".join([
        f"Measured {machine(dirs['head'][0])}; `python experiments/task_heads/run.py`.", "",
        table(header, rows), "",
        ("Held-out (test) figures, mean over data orders 0, 1, 2 (± the standard deviation over them); `module` per "
         f"order (0 / 1 / 2): {per_order}. Forgetting: rise of the held-out corpus loss (nats / token). Steps: from "
         f"the validation split's `{KEY}` at each evaluation (every {every} steps): the head's accuracy for the head, "
         "the token accuracy on module's answer tokens for text."), "",
        "![validation module accuracy](task_heads.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (v, ds) in enumerate(dirs.items()):
        for j, (s, d) in enumerate(zip(SEEDS, ds)):
            steps, values = module_curve(d)
            ax.plot(steps, [100 * x for x in values], color=f"C{i}", linestyle=("-", "--", ":")[j % 3], marker="o",
                    markersize=3, label=f"{v}, order {s}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {KEY} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "task_heads.png", dpi=110)


if __name__ == "__main__":
    main()
