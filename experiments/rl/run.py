"""Experiment: RL on a verifiable reward after SFT. GRPO (and PPO) from the main job's SFT model on `add` and
`first_param`, rewarded by exact match, against SFT alone and against more SFT for a comparable cost.

    python experiments/rl/run.py

SFT: the experiments' recipe (common.RECIPE: full fine-tuning, 300 steps), data orders 0, 1, 2 (the runs the other
experiments share), exported as in experiments/preference (`sftjax-export`: experiments/runs/sft_exports/s<seed>).
Each export is model.path of a main-job run with `objective=grpo` (or `objective=ppo`) on builtin.tasks=[add,
first_param]: the rollouts sample answers to the tasks' train prompts and reward exact match with the reference
answer; the main job's report gives held-out test exact match before (the SFT model: its `zero_shot` column) and
after. The control (MORE_SFT): the same SFT model trained on with plain SFT on the same two tasks, with the same
LoRA, lr, steps and rows per step. The settings (GRPO below) were chosen on seed 0 with builtin.report_split=valid
(PROBES: the in-training evaluation on the whole validation splits), never on test.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import OFFLINE, machine, pct, pyplot, read_jsonl, report, table, train, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = (0, 1, 2)
TASKS = ("builtin.tasks=[add,first_param]",)
# The shared settings of the follow-up runs: the main job's LoRA (rank 64, alpha 128, embed_tokens and norm trained
# fully), 100 steps of 256 rows (GRPO: 32 prompts x 8 completions), lr 3e-4 after 10 warmup steps, cosine decay.
FOLLOW_UP = ("method=lora", "optim.lr=3e-4", "optim.warmup_steps=10", "trainer.batch_size=256",
             "trainer.max_steps=100", "trainer.eval_every=25", "trainer.save_every=100")
GRPO = ("objective=grpo", *FOLLOW_UP, "trainer.log_every=1")  # beta 0.04, G 8, temperature 1 (the defaults)
PPO = ("objective=ppo", *FOLLOW_UP, "trainer.log_every=1")  # TRL's defaults: 1 sample per prompt, 4 epochs, beta 0.05
MORE_SFT = FOLLOW_UP  # plain SFT (packed rows of 128 tokens) on the same two tasks
# The SFT model's greedy exact match on the whole validation splits (the RL runs evaluate there during training, from
# step 25 on): a GRPO run of 10 steps at lr 1e-9, which leaves the model as it is, evaluated at its end.
NO_UPDATE = ("objective=grpo", "method=lora", "optim.lr=1e-9", "optim.warmup_steps=0", "trainer.batch_size=32",
             "trainer.max_steps=10", "trainer.eval_every=10", "trainer.save_every=10", "builtin.report_split=valid")

# The probe (seed 0, reported on the validation split): what was tried before choosing GRPO above.
PROBE_BASE = ("builtin.tasks=[add,first_param]", "data.seed=0", "builtin.report_split=valid")
PROBES = (
    ("SFT model, no update (lr 1e-9)", ("objective=grpo", "method=lora", "optim.lr=1e-9", "optim.warmup_steps=0",
                                        "trainer.batch_size=64", "trainer.max_steps=200", "trainer.eval_every=200",
                                        "trainer.save_every=200", "trainer.log_every=1")),
    ("LoRA, lr 1e-4, 32 rows", ("objective=grpo", "method=lora", "optim.lr=1e-4", "optim.warmup_steps=0",
                                "trainer.batch_size=32", "trainer.max_steps=100", "trainer.eval_every=50",
                                "trainer.save_every=100")),
    ("LoRA, lr 3e-5, 64 rows", ("objective=grpo", "method=lora", "optim.lr=3e-5", "optim.warmup_steps=0",
                                "trainer.batch_size=64", "trainer.max_steps=100", "trainer.eval_every=50",
                                "trainer.save_every=100")),
    ("LoRA, lr 3e-4, 64 rows", ("objective=grpo", "method=lora", "optim.lr=3e-4", "optim.warmup_steps=0",
                                "trainer.batch_size=64", "trainer.max_steps=100", "trainer.eval_every=50",
                                "trainer.save_every=100")),
    ("full, lr 1e-4, 64 rows", ("objective=grpo", "method=full", "optim.lr=1e-4", "optim.warmup_steps=0",
                                "trainer.batch_size=64", "trainer.max_steps=100", "trainer.eval_every=50",
                                "trainer.save_every=100")),
    ("LoRA, lr 3e-4, 64 rows, 200 steps", ("objective=grpo", "method=lora", "optim.lr=3e-4", "optim.warmup_steps=0",
                                           "trainer.batch_size=64", "trainer.max_steps=200",
                                           "trainer.eval_every=200", "trainer.save_every=200",
                                           "trainer.log_every=1")),
    ("LoRA, lr 3e-4, 256 rows, warmup 10 (chosen)", ("objective=grpo", "method=lora", "optim.lr=3e-4",
                                                     "optim.warmup_steps=10", "trainer.batch_size=256",
                                                     "trainer.max_steps=100", "trainer.eval_every=50",
                                                     "trainer.save_every=100", "trainer.log_every=1")),
    ("LoRA, lr 1e-3, 256 rows, warmup 10", ("objective=grpo", "method=lora", "optim.lr=1e-3", "optim.warmup_steps=10",
                                            "trainer.batch_size=256", "trainer.max_steps=100",
                                            "trainer.eval_every=50", "trainer.save_every=100",
                                            "trainer.log_every=1")),
)
# Sanity check of the machinery: GRPO on 16 fixed `add` train prompts (train lines 100-115), seed 0's SFT model, the
# probe's chosen settings but 60 steps of 64 rows: every prompt is sampled ~30 times, so the train reward must rise.
FIXED = HERE / "add16.jsonl"
SANITY = ("objective=grpo", "method=lora", "method.lora.rank=64", "method.lora.alpha=128", "method.lora.dropout=0",
          "method.lora.trainable_modules=[embed_tokens,norm]", "optim.lr=3e-4", "trainer.batch_size=64",
          "trainer.max_steps=60", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
          "objective.max_new_tokens=8", "data.seq_len=64", "data.eval_fraction=0")


def sft_export(seed: int) -> Path:
    """experiments/preference/run.py's SFT export of data order `seed` (exported once, shared)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preference_run", HERE.parent / "preference" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sft_export(seed)


def fixed_prompts(train_file: Path) -> Path:
    if not FIXED.is_file():
        lines = train_file.read_text().splitlines()[99:115]
        FIXED.write_text("\n".join(lines) + "\n")
    return FIXED


def train_lines(folder: Path) -> list[dict]:
    return [d for d in read_jsonl(folder / "metrics.jsonl") if d["split"] == "train"]


def eval_lines(folder: Path) -> list[dict]:
    return [d for d in read_jsonl(folder / "metrics.jsonl") if d["split"] == "eval"]


def mean_sd(values, fmt=pct) -> str:
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def window(lines: list[dict], key: str, part: float, last: bool) -> float:
    """Mean of `key` over the first (or last) `part` of the train lines."""
    n = max(1, round(len(lines) * part))
    chosen = lines[-n:] if last else lines[:n]
    return statistics.mean(d[key] for d in chosen)


def speed(folders: list[Path]) -> dict[str, float]:
    """Per-rollout timings of RL runs logged every step: the wall time between consecutive train lines (intervals
    holding an evaluation left out) is split into generation, reward scoring, the scoring forward pass (reference /
    sampling-policy log-probabilities, PPO's values) and the rest (the train step(s) and the host's bookkeeping)."""
    total = {"time": 0.0, "generate": 0.0, "reward": 0.0, "score": 0.0}
    steps, tok_s, rollouts = [], [], 0
    for folder in folders:
        lines = read_jsonl(folder / "metrics.jsonl")
        evals = {d["step"] for d in lines if d["split"] == "eval"}
        trains = [d for d in lines if d["split"] == "train"]
        for prev, cur in zip(trains, trains[1:]):
            assert cur["step"] == prev["step"] + 1, "speed(): needs trainer.log_every=1"
            if prev["step"] in evals:
                continue  # the evaluation ran between these two lines
            dt = cur["time"] - prev["time"]
            steps.append(dt)
            total["time"] += dt
            key = (cur["rollout/generate_s"], cur["rollout/score_s"], cur["rollout/reward_s"])
            if key != (prev["rollout/generate_s"], prev["rollout/score_s"], prev["rollout/reward_s"]):
                rollouts += 1  # a new rollout was sampled before this step (PPO: every 4th step)
                total["generate"] += cur["rollout/generate_s"]
                total["reward"] += cur["rollout/reward_s"]
                total["score"] += cur["rollout/score_s"]
                tok_s.append(cur["rollout/generated_tokens_per_s"])
    t = total["time"]
    return {"tok_s": statistics.median(tok_s), "step_s": statistics.median(steps), "rollouts": rollouts,
            "steps": len(steps), "generate": total["generate"] / t, "reward": total["reward"] / t,
            "score": total["score"] / t, "train": 1 - (total["generate"] + total["reward"] + total["score"]) / t}


def main() -> None:
    sft, grpo, ppo, more = [], [], [], []
    for s in SEEDS:
        sft.append(train(RESULTS, f"sft_s{s}", f"data.seed={s}"))
    for s in SEEDS:
        base = (f"model.path={sft_export(s)}", *TASKS, f"data.seed={s}")
        grpo.append(train(RESULTS, f"grpo_s{s}", *base, *GRPO))
        ppo.append(train(RESULTS, f"ppo_s{s}", *base, *PPO))
        more.append(train(RESULTS, f"more_sft_s{s}", *base, *MORE_SFT))
    valid_before = [eval_lines(train(RESULTS, f"no_update_s{s}", f"model.path={sft_export(s)}", *TASKS,
                                     f"data.seed={s}", *NO_UPDATE))[-1] for s in SEEDS]
    probes = [(name, train(RESULTS, f"probe_{i}", f"model.path={sft_export(0)}", *PROBE_BASE, *extra))
              for i, (name, extra) in enumerate(PROBES)]
    add_train = None if OFFLINE else Path(json.loads((grpo[0] / "config.json").read_text())["data"]["train"][0]["path"])
    sanity = train(RESULTS, "sanity_fixed_prompts", f"model.path={sft_export(0)}",
                   f"data={fixed_prompts(add_train) if add_train else FIXED}", *SANITY, done="final_metrics.json")

    # -- the main table ----------------------------------------------------------------------------------------
    r_sft = [report(d) for d in sft]
    r_grpo, r_ppo, r_more = ([report(d) for d in runs] for runs in (grpo, ppo, more))
    tasks = r_grpo[0]["tasks"]
    before = [{"fine_tuned": r["zero_shot"], "mean": sum(r["zero_shot"].values()) / len(tasks)} for r in r_grpo]
    for group in (r_ppo, r_more):  # the same SFT model on the same test examples: the same "before"
        assert [r["zero_shot"] for r in group] == [b["fine_tuned"] for b in before]
    sft_s = [r["numbers"]["seconds"]["fine_tuning"] for r in r_sft]
    rows = []
    for name, rs, secs in (
            ("SFT alone (300 steps, full fine-tuning)", before, sft_s),
            ("SFT, then 100 more SFT steps (LoRA, as GRPO)", r_more, None),
            ("SFT, then GRPO (100 steps)", r_grpo, None),
            ("SFT, then PPO (100 steps)", r_ppo, None)):
        secs = secs or [r["numbers"]["seconds"]["fine_tuning"] for r in rs]
        rows.append([name, *(pct(statistics.mean(r["fine_tuned"][t] for r in rs)) for t in tasks),
                     f"**{mean_sd([r['mean'] for r in rs])}**", " / ".join(pct(r["mean"]) for r in rs),
                     f"{statistics.mean(secs):.0f}", f"{statistics.mean(secs) / statistics.mean(sft_s):.1f}x"])
    header = ["model", *tasks, "mean exact match", "per data order (0 / 1 / 2)", "time of the stage (s)",
              "x the SFT run"]

    # -- what the RL runs optimized -------------------------------------------------------------------------------
    rows_c = []
    for name, runs in (("GRPO", grpo), ("PPO", ppo)):
        for s, folder in zip(SEEDS, runs):
            lines, ev = train_lines(folder), eval_lines(folder)
            rows_c.append([f"{name}, order {s}",
                           f"{window(lines, 'reward', 0.2, False):.3f} -> {window(lines, 'reward', 0.2, True):.3f}",
                           f"{window(lines, 'kl', 0.2, True):.3f}",
                           f"{window(lines, 'entropy', 0.2, False):.2f} -> {window(lines, 'entropy', 0.2, True):.2f}",
                           f"{pct(valid_before[s]['exact_match'])} -> "
                           + " / ".join(pct(d["exact_match"]) for d in ev)])
    header_c = ["run", "train reward (first -> last 20 steps)", "KL per token (last 20 steps)",
                "entropy (first -> last 20 steps)",
                "validation exact match: the SFT model -> at steps 25 / 50 / 75 / 100"]

    # -- the probe -------------------------------------------------------------------------------------------
    rows_p = []
    for name, folder in probes:
        lines, ev, r = train_lines(folder), eval_lines(folder)[-1], report(folder)
        every_step = len(lines) == lines[-1]["step"]  # else 10 lines of one batch each: too noisy to show
        rows_p.append([name, lines[-1]["step"], pct(ev["add/exact_match"]), pct(ev["first_param/exact_match"]),
                       f"**{pct(ev['exact_match'])}**",
                       f"{window(lines, 'reward', 0.2, False):.3f} -> {window(lines, 'reward', 0.2, True):.3f}"
                       if every_step else "(logged every 10 steps)",
                       f"{window(lines, 'kl', 0.2, True):.3f}", f"{r['numbers']['seconds']['fine_tuning']:.0f}"])
    header_p = ["GRPO setting (order 0, G 8, beta 0.04)", "steps", "add", "first_param", "mean",
                "train reward (first -> last 20% of steps)", "KL (last 20% of lines)", "time (s)"]
    sane = train_lines(sanity)
    sanity_line = (f"Sanity check (16 fixed `add` prompts, 60 steps of 8 prompts x 8 samples): train reward "
                   f"{window(sane, 'reward', 1 / 6, False):.2f} over the first 10 steps -> "
                   f"{window(sane, 'reward', 1 / 6, True):.2f} over the last 10, entropy "
                   f"{window(sane, 'entropy', 1 / 6, False):.2f} -> {window(sane, 'entropy', 1 / 6, True):.2f}.")

    # -- speed ---------------------------------------------------------------------------------------------------
    rows_s = []
    for name, runs in (("GRPO (32 prompts x 8 samples, 1 step per rollout)", grpo),
                       ("PPO (256 prompts x 1 sample, 4 steps per rollout)", ppo)):
        sp = speed(runs)
        rows_s.append([name, f"{sp['tok_s']:.0f}", f"{sp['step_s']:.2f}", pct(sp["generate"]), pct(sp["reward"]),
                       pct(sp["score"]), pct(sp["train"]), f"{sp['rollouts']} / {sp['steps']}"])
    header_s = ["objective (3 runs)", "generated tokens/s (median rollout)", "step time (s, median)", "generation",
                "reward scoring", "scoring pass (ref / old logps, values)", "train step + rest",
                "rollouts / steps timed"]

    text = "\n".join([
        f"Measured {machine(grpo[0])}; `python experiments/rl/run.py`.", "",
        ("**RL after SFT against SFT alone and more SFT** (held-out test exact match of the greedy answer, 100 "
         "examples per task, mean over data orders 0, 1, 2 ± the standard deviation; time: the fine-tuning stage "
         "of the run, compilation and in-training evaluations included, mean over the orders; the follow-up rows "
         "come on top of the SFT run):"), "",
        table(header, rows), "",
        ("**What the RL runs optimized** (train reward: exact match of the sampled completions of the step's "
         "prompts, new prompts every step; KL: the k3 estimate to the SFT model per completion token; validation: "
         "greedy exact match on the whole validation splits, 200 examples per task):"), "",
        table(header_c, rows_c), "",
        ("**Probe** (data order 0, chosen on validation: the in-training evaluation of the last step on the whole "
         "validation splits, 200 examples per task; the first row is the SFT model itself):"), "",
        table(header_p, rows_p), "",
        sanity_line, "",
        ("**Where an RL step's time goes** (the three runs of each objective, logged every step; the intervals "
         "between consecutive train lines, those holding an evaluation left out):"), "",
        table(header_s, rows_s), "",
        "![rl](rl.png)"])
    if not write_results(HERE, text):
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))

    def smooth(xs, k=10, f=statistics.mean):
        return [f(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]

    for i, (g, p) in enumerate(zip(grpo, ppo)):
        for folder, style, name in ((g, "-", "GRPO"), (p, "--", "PPO")):
            lines = train_lines(folder)
            steps = [d["step"] for d in lines]
            axes[0].plot(steps, smooth([d["reward"] for d in lines]), style, color=f"C{i}", alpha=0.8,
                         label=f"{name}, order {i}")
            axes[1].plot(steps, smooth([d["kl"] for d in lines], f=statistics.median), style, color=f"C{i}",
                         alpha=0.8)
            ev = eval_lines(folder)
            axes[2].plot([d["step"] for d in ev], [d["exact_match"] for d in ev], style + "o", color=f"C{i}",
                         alpha=0.8)
    axes[0].set_ylabel("train reward (sampled, 10-step mean)")
    axes[1].set_ylabel("KL to the SFT model per token (10-step median)")
    axes[2].set_ylabel("validation exact match (greedy)")
    for i, level in enumerate(valid_before):
        axes[2].plot([0, 100], [level["exact_match"]] * 2, ":", color=f"C{i}", lw=1)
    axes[2].set_title("dotted: the SFT model before RL (same validation prompts)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "rl.png", dpi=110)


if __name__ == "__main__":
    main()
