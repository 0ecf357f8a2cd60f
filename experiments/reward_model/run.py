"""Experiment i: a reward model's pairwise accuracy against the number of training pairs.

    python experiments/reward_model/run.py

The reward model: the SFT model of data order 0 (the experiments' recipe, exported; experiments/preference) with a
scalar head on the last token of each sequence (`objective=reward`, Bradley-Terry, centering 0.01), trained with
the main job's LoRA (rank 64, embed_tokens and norm trained too) for REWARD_RECIPE's 150 steps of 16 rows on the
preference versions of the built-in tasks, their training split capped at N examples per task
(`builtin.train_examples=N`; nested: a smaller cap keeps a subset), data orders 0, 1, 2. Every run sees the same
number of pairs (150 steps); a small N repeats its pairs. Pairwise accuracy: the share of the held-out test pairs
(`sftjax-eval` on the test files; 200 per task but first_param's about 160) whose chosen answer gets the higher
reward; chance is 50%.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import OFFLINE, RUNS, machine, pct, pyplot, run_dir_of, table, train, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = (0, 1, 2)
SIZES = (25, 100, 400, 8000)  # builtin.train_examples: training examples per task, at most
REWARD_RECIPE = ("objective=reward", "objective.center_rewards_coefficient=0.01", "method=lora",
                 "data.seq_len=320", "trainer.batch_size=16", "trainer.max_steps=150", "optim.lr=1e-3",
                 "optim.warmup_steps=10", "trainer.eval_every=50", "trainer.save_every=150",
                 "builtin.upsample.add=1.0", "trainer.num_samples=0")
SFT_MODEL = RUNS / "sft_exports" / "s0"  # written by experiments/preference/run.py


def test_accuracy(results: Path, run_dir: Path) -> dict:
    """sftjax-eval of a reward run on its tasks' test pairs (kept in results/)."""
    out = results / "test_pairs.json"
    if not out.is_file() and not OFFLINE:
        cfg = json.loads((results / "config.json").read_text())
        files = [d["path"].replace("_pairs_train", "_pairs_test") for d in cfg["data"]["train"]]
        data = [arg for path in files for arg in ("--data", path)]
        done = subprocess.run(["sftjax-eval", "--run", str(run_dir), *data, "--max-new-tokens", "0", "--json"],
                              check=True, capture_output=True, text=True)
        out.write_text(done.stdout)
    return json.loads(out.read_text())


def main() -> None:
    if not OFFLINE and not (SFT_MODEL / "model.safetensors").is_file():
        raise SystemExit(f"{SFT_MODEL}: run experiments/preference/run.py first (it exports the SFT model)")
    runs = {}
    for n in SIZES:
        for s in SEEDS:
            overrides = (f"model.path={SFT_MODEL}", *REWARD_RECIPE, f"builtin.train_examples={n}", f"data.seed={s}")
            folder = train(RESULTS, f"n{n}_s{s}", *overrides, done="final_metrics.json")
            runs[(n, s)] = (folder, test_accuracy(folder, run_dir_of(*overrides)))

    def pairs_of(folder: Path) -> int:
        return sum(json.loads((folder / "train_sizes.json").read_text()).values())

    tasks = list(runs[(SIZES[0], 0)][1]["tasks"])
    rows = []
    for n in SIZES:
        got = [runs[(n, s)] for s in SEEDS]
        acc = [r["overall"]["accuracy"] for _, r in got]
        per_task = [statistics.mean(r["tasks"][t]["accuracy"] for _, r in got) for t in tasks]
        rows.append([n, f"{pairs_of(got[0][0]):,}", *(pct(a) for a in per_task),
                     f"**{pct(statistics.mean(acc))} ± {pct(statistics.stdev(acc))}**",
                     " / ".join(pct(a) for a in acc)])
    names = [t.replace("_pairs_test", "") for t in tasks]
    header = ["examples per task (cap)", "training pairs", *names, "test pairs ranked right",
              "per data order (0 / 1 / 2)"]
    text = "\n".join([
        f"Measured {machine(runs[(SIZES[-1], 0)][0])}; `python experiments/reward_model/run.py`.", "",
        ("**Pairwise accuracy of the reward model on the held-out test pairs** (mean over data orders 0, 1, 2 ± the "
         "standard deviation; per task: the mean; chance 50%; 150 steps of 16 rows in every run):"), "",
        table(header, rows), "",
        "![reward model](reward_model.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [pairs_of(runs[(n, 0)][0]) for n in SIZES]
    for i, t in enumerate(tasks):
        ax.plot(xs, [100 * statistics.mean(runs[(n, s)][1]["tasks"][t]["accuracy"] for s in SEEDS) for n in SIZES],
                marker="o", color=f"C{i}", label=names[i])
    ax.plot(xs, [100 * statistics.mean(runs[(n, s)][1]["overall"]["accuracy"] for s in SEEDS) for n in SIZES],
            marker="s", color="k", label="all test pairs")
    ax.set_xscale("log")
    ax.set_xlabel("training pairs")
    ax.set_ylabel("test pairs ranked right (%)")
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "reward_model.png", dpi=110)


if __name__ == "__main__":
    main()
