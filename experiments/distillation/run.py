"""Experiment f: knowledge distillation. (a) a 2-layer student distilled from the main job's 4-layer full
fine-tuned model against the same student trained on labels alone; (b) a distillation term toward the pre-trained
base itself as an anchor against forgetting.

    python experiments/distillation/run.py

(a) The teacher: the main job's `method=full` model (800 steps at lr 2e-3, `add` drawn twice). The students:
the same recipe on a 2-layer base pre-trained on the same corpus (`builtin.base_layers=2`), on labels alone or with
`objective=distill` toward the teacher's run directory (alpha 0.5, T 2; and alpha 0.2, T 1), three data orders each.
(b) The experiments' recipe (full fine-tuning, 300 steps) plain against the same with
`objective=distill objective.teacher=builtin objective.positions=all` (alpha 0.5, T 1: the pre-trained base,
frozen, at every token, prompts included; and alpha 0.1), three data orders each.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, pct, pyplot, report, run_dir_of, table, train, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = (0, 1, 2)
# (a) The main job's method=full settings (after common.RECIPE, which they override).
MAIN_FULL = ("method=full", "optim.lr=2e-3", "trainer.max_steps=800", "builtin.upsample.add=2.0")
STUDENT = MAIN_FULL + ("builtin.base_layers=2",)
KD = ("objective=distill", "objective.alpha=0.5", "objective.temperature=2.0")  # + objective.teacher=<run dir>
KD_LIGHT = ("objective=distill", "objective.alpha=0.2", "objective.temperature=1.0")  # less weight, no softening
# (b) A distillation term toward the pre-trained base, at every token.
ANCHOR = ("objective=distill", "objective.teacher=builtin", "objective.positions=all", "objective.alpha=0.5",
          "objective.temperature=1.0")
ANCHOR_LIGHT = ANCHOR[:3] + ("objective.alpha=0.1", "objective.temperature=1.0")


def mean_sd(values: list[float], fmt=pct) -> str:
    """Mean ± standard deviation (over the data orders)."""
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def loss(x: float) -> str:
    return f"{x:.3f}"


def seconds(r: dict) -> float:
    return r["numbers"]["seconds"]["fine_tuning"]


def tokens_s(r: dict) -> float:
    return r["numbers"]["train_tokens_per_s"]


def main() -> None:
    teacher = report(train(RESULTS, "teacher", *MAIN_FULL))
    # The teacher's run directory (experiments/runs/<key>/, absolute: its checkpoints), not its results/ copy.
    teacher_dir = (f"objective.teacher={run_dir_of(*MAIN_FULL)}",)
    dirs = {"label": [], "distilled": [], "distilled_light": [], "plain": [], "anchored": [], "anchored_light": []}
    for s in SEEDS:
        seed = f"data.seed={s}"
        dirs["label"].append(train(RESULTS, f"label_s{s}", *STUDENT, seed))
        dirs["distilled"].append(train(RESULTS, f"distilled_s{s}", *STUDENT, *KD, *teacher_dir, seed))
        dirs["plain"].append(train(RESULTS, f"plain_s{s}", seed))
        dirs["anchored"].append(train(RESULTS, f"anchored_s{s}", *ANCHOR, seed))
    for s in SEEDS:  # a second setting of each, added after the first results
        seed = f"data.seed={s}"
        dirs["distilled_light"].append(train(RESULTS, f"distilled_light_s{s}", *STUDENT, *KD_LIGHT, *teacher_dir,
                                             seed))
        dirs["anchored_light"].append(train(RESULTS, f"anchored_light_s{s}", *ANCHOR_LIGHT, seed))
    reports = {k: [report(d) for d in v] for k, v in dirs.items()}
    tasks = teacher["tasks"]

    # (a) teacher vs students
    rows = [["teacher (4 layers, one run)", *(pct(teacher["fine_tuned"][t]) for t in tasks),
             f"**{pct(teacher['mean'])}**", f"{teacher['corpus_loss_tuned']:.3f}", f"{seconds(teacher):.0f}",
             f"{tokens_s(teacher):,.0f}"]]
    for key, name in (("label", "student (2 layers), labels alone"),
                      ("distilled", "student (2 layers), distilled: alpha 0.5, T 2"),
                      ("distilled_light", "student (2 layers), distilled: alpha 0.2, T 1")):
        rs = reports[key]
        rows.append([name, *(pct(statistics.mean(r["fine_tuned"][t] for r in rs)) for t in tasks),
                     f"**{mean_sd([r['mean'] for r in rs])}**",
                     mean_sd([r["corpus_loss_tuned"] for r in rs], loss),
                     f"{statistics.mean(seconds(r) for r in rs):.0f}",
                     f"{statistics.mean(tokens_s(r) for r in rs):,.0f}"])
    header_a = ["model", *tasks, "mean", "held-out corpus loss", "fine-tuning seconds", "train tokens/s"]
    per_order = "; ".join(f"{k}: " + " / ".join(pct(r["mean"]) for r in reports[k])
                          for k in ("label", "distilled", "distilled_light"))
    base_loss = reports["label"][0]["corpus_loss_base"]

    # (b) plain vs anchored
    rows_b = []
    for key, name in (("plain", "plain fine-tuning"), ("anchored", "+ distillation toward the base, alpha 0.5"),
                      ("anchored_light", "+ distillation toward the base, alpha 0.1")):
        rs = reports[key]
        rows_b.append([name, f"**{pct(statistics.mean(r['mean'] for r in rs))}**",
                       f"**{statistics.mean(r['forgetting'] for r in rs):+.3f}**",
                       *(f"{pct(r['mean'])} / {r['forgetting']:+.3f}" for r in rs),
                       f"{statistics.mean(seconds(r) for r in rs):.0f}"])
    header_b = ["fine-tuning", "mean exact match", "forgetting",
                *(f"order {s}: exact match / forgetting" for s in SEEDS), "fine-tuning seconds"]

    text = "\n".join([
        f"Measured {machine(dirs['distilled'][0])}; `python experiments/distillation/run.py`.", "",
        ("**(a) Distilled student vs labels alone** (held-out exact match; students: mean over data orders 0, 1, 2, "
         "the mean column ± the standard deviation over them):"), "",
        table(header_a, rows), "",
        (f"Mean exact match per data order (0 / 1 / 2): {per_order}. Held-out corpus loss after fine-tuning (nats / "
         f"token; the 2-layer base before it: {base_loss:.3f}, the 4-layer base: {teacher['corpus_loss_base']:.3f}); "
         "tokens/s: the student's tokens (the distilled student's steps also run the teacher forward)."), "",
        ("**(b) Distillation toward the pre-trained base against forgetting** (the recipe: full fine-tuning, "
         "300 steps; forgetting: rise of the held-out corpus loss):"), "",
        table(header_b, rows_b), "",
        "![distillation](distillation.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    bars = [("teacher", [teacher]), ("labels alone", reports["label"]), ("distilled\n0.5, T 2", reports["distilled"]),
            ("distilled\n0.2, T 1", reports["distilled_light"])]
    for i, (name, rs) in enumerate(bars):
        ax.bar(i, 100 * statistics.mean(r["mean"] for r in rs), width=0.6, color=f"C{i}", alpha=0.6)
        ax.scatter([i] * len(rs), [100 * r["mean"] for r in rs], color="k", s=18, zorder=3)
    ax.set_xticks(range(len(bars)), [name for name, _ in bars])
    ax.set_ylabel("mean held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("(a) 2-layer students (points: data orders)")
    ax = axes[1]
    for i, (key, name) in enumerate((("plain", "plain"), ("anchored", "+ distillation toward the base, alpha 0.5"),
                                     ("anchored_light", "+ distillation toward the base, alpha 0.1"))):
        rs = reports[key]
        ax.scatter([r["forgetting"] for r in rs], [100 * r["mean"] for r in rs], color=f"C{i}", s=40, label=name)
    ax.set_xlabel("forgetting: increase of held-out corpus loss (nats / token)")
    ax.set_ylabel("mean held-out exact match (%)")
    ax.set_title("(b) one point per data order")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "distillation.png", dpi=110)


if __name__ == "__main__":
    main()
