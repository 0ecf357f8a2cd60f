"""Experiment h: comparative ranking. SFT, then DPO on the built-in tasks' preference pairs, against SFT alone;
a beta sweep; the loss types side by side; the adapters-off reference against a copied one.

    python experiments/preference/run.py

SFT: the experiments' recipe (common.RECIPE: full fine-tuning, 300 steps), data orders 0, 1, 2 (the runs other
experiments share). Each is exported (`sftjax-export`) and becomes model.path of a DPO run of the main job on the
preference versions of the built-in tasks (`objective=dpo`: chosen = the right answer, rejected = a plausible wrong
one; `sftjax/data/builtin/preference.py`), with the main job's LoRA (rank 64, embed_tokens and norm trained too) and
DPO_RECIPE below; the same data order. The main job's report then gives held-out exact match before (the SFT model)
and after DPO, on the same test examples. Pairwise accuracy: `sftjax-eval` on the test pairs (objective=dpo), the
share of pairs whose chosen answer the model gives the higher log-probability (logps/accuracies); for SFT alone the
same on the SFT model.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import OFFLINE, RUNS, machine, pct, pyplot, report, run_dir_of, table, train, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = (0, 1, 2)
DPO_RECIPE = ("objective=dpo", "method=lora", "data.seq_len=320", "trainer.batch_size=16", "trainer.max_steps=150",
              "optim.lr=2e-4", "optim.warmup_steps=10", "trainer.eval_every=50", "trainer.save_every=150",
              "builtin.upsample.add=1.0")
BETAS = (0.05, 0.5)  # besides TRL's default 0.1
LOSSES = (("ipo", ()), ("hinge", ()), ("robust", ("objective.label_smoothing=0.1",)), ("simpo", ()), ("orpo", ()))
EXTRA = (("sigmoid + chosen NLL (sft_weight 1)", ("objective.sft_weight=1.0",)),)
NLL = ("objective.sft_weight=1.0",)
# The control: the SFT model trained on for as many steps with the same LoRA and lr, on the SFT tasks (plain SFT).
MORE_SFT = ("method=lora", "trainer.batch_size=16", "trainer.max_steps=150", "optim.lr=2e-4", "optim.warmup_steps=10",
            "trainer.eval_every=50", "trainer.save_every=150", "builtin.upsample.add=1.0")


def sft_export(seed: int) -> Path:
    """The SFT run of data order `seed`, exported as an HF directory (model.path of the DPO runs)."""
    out = RUNS / "sft_exports" / f"s{seed}"
    if not OFFLINE and not (out / "model.safetensors").is_file():
        subprocess.run(["sftjax-export", "--run", str(run_dir_of(f"data.seed={seed}")), "--out", str(out),
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return out


def test_pairs() -> list[str]:
    """The built-in preference tasks' test files (written by the first DPO run of the main job)."""
    cfg = json.loads((RESULTS / "dpo_s0" / "config.json").read_text())
    return [d["path"].replace("_pairs_train", "_pairs_test") for d in cfg["data"]["train"]]


def pairwise(results: Path, *source: str) -> dict:
    """sftjax-eval of `source` (--run DIR or --model DIR objective=dpo) on the test pairs, kept in results/."""
    out = results / "test_pairs.json"
    if not out.is_file() and not OFFLINE:
        data = [arg for path in test_pairs() for arg in ("--data", path)]
        done = subprocess.run(["sftjax-eval", *source, *data, "--max-new-tokens", "0", "--json"], check=True,
                              capture_output=True, text=True)
        out.write_text(done.stdout)
    return json.loads(out.read_text())["overall"]


def mean_sd(values, fmt=pct) -> str:
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def main() -> None:
    sft, dpo, dpo_nll, more_sft = [], [], [], []
    for s in SEEDS:
        sft.append(train(RESULTS, f"sft_s{s}", f"data.seed={s}"))
        dpo.append(train(RESULTS, f"dpo_s{s}", f"model.path={sft_export(s)}", *DPO_RECIPE, f"data.seed={s}"))
    for s in SEEDS:  # added after the first results: DPO + the chosen answers' NLL, and its control
        dpo_nll.append(train(RESULTS, f"dpo_nll_s{s}", f"model.path={sft_export(s)}", *DPO_RECIPE, *NLL,
                             f"data.seed={s}"))
        more_sft.append(train(RESULTS, f"more_sft_s{s}", f"model.path={sft_export(s)}", *MORE_SFT, f"data.seed={s}"))
    sft_pairs = []
    for s, d in zip(SEEDS, sft):
        sft_pairs.append(pairwise(d, "--model", str(sft_export(s)), "objective=dpo"))
    dpo_pairs = [pairwise(d, "--run", str(run_dir_of(f"model.path={sft_export(s)}", *DPO_RECIPE, f"data.seed={s}")))
                 for s, d in zip(SEEDS, dpo)]
    nll_pairs = [pairwise(d, "--run", str(run_dir_of(f"model.path={sft_export(s)}", *DPO_RECIPE, *NLL,
                                                     f"data.seed={s}")))
                 for s, d in zip(SEEDS, dpo_nll)]
    more_pairs = [pairwise(d, "--run", str(run_dir_of(f"model.path={sft_export(s)}", *MORE_SFT, f"data.seed={s}")),
                           "objective.name=dpo")
                  for s, d in zip(SEEDS, more_sft)]
    sweep = {}
    for name, extra in ([(f"beta {b}", (f"objective.beta={b}",)) for b in BETAS]
                        + [(f"{loss}", (f"objective.loss_type={loss}", *more)) for loss, more in LOSSES]
                        + list(EXTRA)
                        + [("copied reference", (f"objective.reference={sft_export(0)}",))]):
        key = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        overrides = (f"model.path={sft_export(0)}", *DPO_RECIPE, "data.seed=0", *extra)
        folder = train(RESULTS, key, *overrides)
        sweep[name] = (folder, pairwise(folder, "--run", str(run_dir_of(*overrides))))

    reports_sft = [report(d) for d in sft]
    reports_dpo = [report(d) for d in dpo]
    tasks = reports_dpo[0]["tasks"]
    rows = []
    for name, rs, ps in (("SFT alone", reports_sft, sft_pairs),
                         ("SFT, then 150 more SFT steps (LoRA, as DPO)", [report(d) for d in more_sft], more_pairs),
                         ("SFT, then DPO (sigmoid, beta 0.1)", reports_dpo, dpo_pairs),
                         ("SFT, then DPO + the chosen answers' NLL (sft_weight 1)", [report(d) for d in dpo_nll],
                          nll_pairs)):
        rows.append([name, *(pct(statistics.mean(r["fine_tuned"][t] for r in rs)) for t in tasks),
                     f"**{mean_sd([r['mean'] for r in rs])}**",
                     f"**{mean_sd([p['logps/accuracies'] for p in ps])}**",
                     " / ".join(pct(r["mean"]) for r in rs)])
    header = ["model", *tasks, "mean exact match", "test pairs ranked right", "exact match per order (0 / 1 / 2)"]

    def final_eval(folder: Path) -> dict:
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [x for x in lines if x["split"] == "eval"][-1]

    d0 = report(dpo[0])
    rows_b = [["sigmoid, beta 0.1 (order 0)", pct(d0["mean"]), pct(dpo_pairs[0]["logps/accuracies"]),
               pct(final_eval(dpo[0])["rewards/accuracies"]), f"{final_eval(dpo[0])['rewards/margins']:.3f}"]]
    for name, (folder, pairs) in sweep.items():
        r, e = report(folder), final_eval(folder)
        rows_b.append([name, pct(r["mean"]), pct(pairs["logps/accuracies"]), pct(e["rewards/accuracies"]),
                       f"{e['rewards/margins']:.3f}"])
    header_b = ["DPO variant (order 0)", "mean exact match", "test pairs ranked right",
                "validation reward accuracy", "validation reward margin"]
    text = "\n".join([
        f"Measured {machine(dpo[0])}; `python experiments/preference/run.py`.", "",
        ("**SFT then DPO against SFT alone** (held-out test exact match of the generated answer, mean over data "
         "orders 0, 1, 2 ± the standard deviation; test pairs ranked right: the model gives the chosen answer the "
         "higher log-probability):"), "",
        table(header, rows), "",
        ("**Variants** (data order 0; the reward accuracy and margin are DPO's implicit rewards against the "
         "reference, on the validation pairs at the end):"), "",
        table(header_b, rows_b), "",
        "![preference](preference.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, folder in enumerate(dpo):
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        train_lines = [x for x in lines if x["split"] == "train"]
        ax.plot([x["step"] for x in train_lines], [x["rewards/accuracies"] for x in train_lines], color=f"C{i}",
                alpha=0.7, label=f"order {i}")
    ax.set_xlabel("DPO step")
    ax.set_ylabel("train reward accuracy (batch)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "preference.png", dpi=110)


if __name__ == "__main__":
    main()
