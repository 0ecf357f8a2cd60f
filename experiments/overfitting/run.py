"""Experiment c: overfitting, and what curbs it: early stopping, dropout, prompt-noise augmentation.

    python experiments/overfitting/run.py

The `module` task alone (1,050 training texts since the validation split: it overfits), evaluated on its
validation split every 20 steps (the test split is scored once, at the end). Runs:
plain; early stopping (patience 3 evaluations on the validation loss, a checkpoint at every evaluation, the best
one scored); dropout 0.1 (on each residual branch: attention and MLP outputs); prompt noise (20% of prompt tokens
replaced at random in every batch: sftjax.data.augment); all three.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import curve, machine, pct, pyplot, report, table, train, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
TASK = ("builtin.tasks=[module]", "trainer.eval_every=20")
STOP = ("trainer.patience=3", "trainer.save_every=20")  # a checkpoint at every evaluation: the best one is kept
DROPOUT = ("model.dropout=0.1",)
NOISE = ("builtin.prompt_noise.module=0.2",)
RUNS = {
    "plain": TASK,
    "early stopping": TASK + STOP,
    "dropout 0.1": TASK + DROPOUT,
    "prompt noise 0.2": TASK + NOISE,
    "all three": TASK + STOP + DROPOUT + NOISE,
}


def main() -> None:
    rows, curves = [], {}
    for name, overrides in RUNS.items():
        run_dir = train(HERE / "results", name.replace(" ", "_"), *overrides)
        r = report(run_dir)
        train_steps, train_loss = curve(run_dir, "train")
        eval_steps, eval_loss = curve(run_dir, "eval")
        curves[name] = (train_steps, train_loss, eval_steps, eval_loss)
        best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
        rows.append([name, train_steps[-1], f"{train_loss[-1]:.3f}", f"{eval_loss[best]:.3f} (step {eval_steps[best]})",
                     f"{eval_loss[-1]:.3f}", r["numbers"]["steps"], f"**{pct(r['fine_tuned']['module'])}**",
                     f"{r['forgetting']:+.3f}"])
    header = ["run", "steps run", "final train loss", "best held-out loss", "final held-out loss",
              "checkpoint scored (step)", "held-out exact match", "forgetting"]
    text = "\n".join([f"Measured {machine(run_dir)}; `python experiments/overfitting/run.py`.", "",
                      table(header, rows), "",
                      "Losses are per answer token (nats). Held-out loss: module's validation split (74 texts); "
                      "exact match: its test split (195 texts of functions and classes never trained on, 100 of "
                      "them scored). Neither shares a function or class with training.", "",
                      "![train and held-out loss](overfitting.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, (ts, tl, es, el)) in enumerate(curves.items()):
        axes[0].plot(ts, tl, color=f"C{i}", alpha=0.8, label=name)
        axes[1].plot(es, el, color=f"C{i}", marker="o", markersize=3, label=name)
    for ax, title in zip(axes, ("train loss (logged batches)", "held-out loss (module validation split)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / answer token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(HERE / "overfitting.png", dpi=110)


if __name__ == "__main__":
    main()
