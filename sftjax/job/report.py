"""Step 3 of the main job: the base against the fine-tuned model, on held-out data, as a table and a report.

"The base" is the model before fine-tuning as the run holds it (under qlora: the quantized base; adapters start at
B = 0, so they do not change it). For each task: exact-match accuracy of greedy answers (on the test split, or on
the validation split with builtin.report_split=valid, for choosing settings without looking at the test) of
    base, zero-shot     the task prompt alone
    base, k-shot        k solved training examples in front of the prompt (the few-shot baseline)
    fine-tuned          the task prompt alone
and, for both models, the loss on the held-out corpus (modules the base never saw): its increase after
fine-tuning is the catastrophic forgetting. Written into the run directory: report.md, report.json,
loss_curves.png (pre-training and fine-tuning curves) and accuracy.png.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from sftjax.data.builtin.tasks import TaskFiles, few_shot_prompt
from sftjax.data.pipeline import DataConfig, DatasetSpec, Prepared, prepare
from sftjax.data.tokenizer import Tokenizer
from sftjax.job.config import JobConfig
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import Params
from sftjax.train import evaluate
from sftjax.objectives import heads as heads_objective
from sftjax.objectives import sft


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def few_shot_file(task: TaskFiles, split: str, k: int, limit: int, out: Path, seed: int = 0) -> Path:
    """The prompts of `split` with k solved training examples in front (fixed per task: the same k shots)."""
    train, held = _read_jsonl(task.train_path), _read_jsonl(task.path(split))[:limit]
    rng = np.random.default_rng(seed)
    shots = [train[i] for i in rng.choice(len(train), size=k, replace=False)]
    records = [{"prompt": few_shot_prompt(shots, q), "completion": q["completion"]} for q in held]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _prepared(paths: list[tuple[str, Path]], tokenizer: Tokenizer, seq_len: int, fmt: str = "auto",
              mask: str = "completion", limit: int = 0, heads: dict[str, tuple[str, ...]] | None = None) -> Prepared:
    """heads: task -> classes of the tasks read as classification examples (prompt + label)."""
    heads = heads or {}
    specs = [DatasetSpec(str(p), format=fmt, name=name, head=name in heads, labels=tuple(heads.get(name, ())))
             for name, p in paths]
    data = prepare(DataConfig(datasets=specs, seq_len=seq_len, mask=mask, per_device_batch=8, num_epochs=1,
                              over_long="truncate"), tokenizer)  # a long few-shot prompt loses its first shots
    return evaluate.one_pass(data, limit)


def head_accuracy(cfg: ModelConfig, params: Params, data: Prepared) -> dict[str, float]:
    """task -> accuracy of its classification head (params["heads"]) on the head tasks of `data` (one device)."""
    tasks = tuple(evaluate.task_names(data))
    objective = heads_objective.Heads(cfg, tasks, data.labels, heads_objective.Settings())
    result = evaluate.on_one_device(objective, params, data)
    return {t: result[f"{t}/accuracy"] for t, classes in zip(tasks, data.labels) if classes is not None}


def corpus_loss(cfg: ModelConfig, params: Params, data: Prepared, max_batches: int) -> float:
    """Mean next-token loss of `params` on the held-out corpus (teacher forced, one device)."""
    return evaluate.on_one_device(sft.SFT(cfg, tuple(evaluate.task_names(data))), params, data,
                                  max_batches=max_batches)["loss"]


@dataclasses.dataclass
class Comparison:
    tasks: list[str]
    split: str  # the split scored: test | valid
    zero_shot: dict[str, float]  # task -> exact match of the base, prompt alone
    few_shot: dict[str, float]  # task -> exact match of the base, k shots in front
    fine_tuned: dict[str, float]  # task -> exact match of the fine-tuned model
    corpus_loss_base: float
    corpus_loss_tuned: float
    k: int
    examples: dict[str, int]


def compare(cfg: JobConfig, tasks: dict[str, TaskFiles], corpus_heldout: Path, tokenizer: Tokenizer,
            base: tuple[ModelConfig, Params], tuned: tuple[ModelConfig, Params], work: Path,
            baseline_cache: Path | None = None, heads: dict[str, tuple[str, ...]] | None = None) -> Comparison:
    """Score the base and the fine-tuned model. baseline_cache: a JSON file holding the base's scores for exactly
    these settings (read when present, written otherwise), so runs of a sweep score the same base once.
    heads: task -> classes of the tasks the fine-tuned model answers with a classification head (objective=heads):
    its score there is the head's accuracy on the same examples (the base answers them as text)."""
    b = cfg.builtin
    limit, names, split = b.eval_examples, list(tasks), b.report_split
    paths = [(n, tasks[n].path(split)) for n in names]
    held = _prepared(paths, tokenizer, seq_len=512, limit=limit)
    corpus = _prepared([("corpus", corpus_heldout)], tokenizer, seq_len=256, fmt="text", mask="all")

    def accuracy(model, data):
        acc = evaluate.generation_accuracy(model[0], model[1], tokenizer, data, b.max_new_tokens)
        scores = {n: acc[f"{n}/exact_match"] for n in names if f"{n}/exact_match" in acc}
        return {**scores, **(head_accuracy(*model, data) if any(data.labels) else {})}

    scores = json.loads(baseline_cache.read_text()) if baseline_cache and baseline_cache.is_file() else None
    if scores is None:
        shots = _prepared([(n, few_shot_file(tasks[n], split, b.few_shot, limit,
                                             work / f"{n}_{split}_{b.few_shot}shot.jsonl"))
                           for n in names], tokenizer, seq_len=1024, limit=limit)
        scores = {"zero_shot": accuracy(base, held), "few_shot": accuracy(base, shots),
                  "corpus_loss": corpus_loss(*base, corpus, 16)}
        if baseline_cache is not None:
            tmp = baseline_cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
            tmp.replace(baseline_cache)
    tuned_held = _prepared(paths, tokenizer, seq_len=512, limit=limit, heads=heads) if heads else held
    return Comparison(names, split, scores["zero_shot"], scores["few_shot"], accuracy(tuned, tuned_held),
                      scores["corpus_loss"], corpus_loss(*tuned, corpus, 16), b.few_shot,
                      {n: len(d) for n, d in zip(names, held.datasets)})


def table(c: Comparison) -> str:
    """The before / after table (markdown)."""
    rows = [f"| task | {c.split} examples | base, zero-shot | base, {c.k}-shot | fine-tuned |",
            "| --- | --- | --- | --- | --- |"]
    for n in c.tasks:
        rows.append(f"| {n} | {c.examples[n]} | {c.zero_shot[n]:.1%} | {c.few_shot[n]:.1%} | {c.fine_tuned[n]:.1%} |")
    mean = lambda d: float(np.mean([d[n] for n in c.tasks]))  # noqa: E731
    rows.append(f"| **mean** | | {mean(c.zero_shot):.1%} | {mean(c.few_shot):.1%} | **{mean(c.fine_tuned):.1%}** |")
    rows.append("")
    rows.append(f"Held-out corpus loss (forgetting): base {c.corpus_loss_base:.3f}, fine-tuned "
                f"{c.corpus_loss_tuned:.3f} ({c.corpus_loss_tuned - c.corpus_loss_base:+.3f})")
    return "\n".join(rows)


def _curves(metrics: Path) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    if not metrics.is_file():
        return out
    for line in _read_jsonl(metrics):
        if "loss" in line and line.get("loss") is not None:
            steps, values = out.setdefault(line["split"], ([], []))
            steps.append(line["step"])
            values.append(line["loss"])
    return out


def median_tokens_per_s(metrics: Path) -> float:
    """Median train throughput (non-padding tokens / s) of a run's logged windows, the first (compilation) left
    out."""
    rates = [d["tokens_per_s"] for d in _read_jsonl(metrics) if d.get("split") == "train" and "tokens_per_s" in d]
    return float(np.median(rates[1:] or rates)) if rates else 0.0


def plots(run_dir: Path, pretrain_dir: Path, c: Comparison) -> list[str]:
    """loss_curves.png and accuracy.png in run_dir; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (title, metrics) in zip(axes, (("pre-training (built-in corpus)", pretrain_dir / "metrics.jsonl"),
                                           ("fine-tuning (task mixture)", run_dir / "metrics.jsonl"))):
        for split, (steps, values) in sorted(_curves(metrics).items()):
            ax.plot(steps, values, marker="o" if split == "eval" else None, markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = np.arange(len(c.tasks))
    for i, (label, values) in enumerate((("base, zero-shot", c.zero_shot), (f"base, {c.k}-shot", c.few_shot),
                                         ("fine-tuned", c.fine_tuned))):
        ax.bar(x + (i - 1) * 0.27, [100 * values[n] for n in c.tasks], width=0.27, label=label)
    ax.set_xticks(x, c.tasks)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy.png", dpi=110)
    plt.close(fig)
    return ["loss_curves.png", "accuracy.png"]


def write_report(run_dir: Path, c: Comparison, context: dict[str, Any], images: list[str],
                 numbers: dict[str, Any] | None = None) -> Path:
    lines = ["# sftjax main job: base vs fine-tuned", "", table(c), ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += [""] + [f"![{name}]({name})" for name in images] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    record = {**dataclasses.asdict(c), "context": context, "numbers": numbers or {}}
    (run_dir / "report.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
