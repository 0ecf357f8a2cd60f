"""The main job, end to end: build or reuse the built-in base -> fine-tune on the built-in tasks -> compare.

`sftjax-train` with no dataset runs it (with conf/experiment/main.yaml's settings). Two config values switch the
built-in parts on, independently:
    model.path == "builtin"   the cached pre-trained base (built on first use: sftjax.job.base)
    data.train == []          the built-in tasks (their validation splits as data.eval: eval loss, early
                              stopping, the sweep metric), and the before / after report (sftjax.job.report,
                              on the test splits) once training ends
so `sftjax-train model=path/to/hf_dir` fine-tunes your model on the built-in tasks and reports, and
`sftjax-train data=mine.jsonl` fine-tunes the built-in base on your data.

With an RL objective (objective=grpo | ppo) the rollouts sample answers to the built-in tasks' prompts, rewarded by
exact match with the reference answer (`objective.rewards=[exact_match]`, the default), at most
builtin.max_new_tokens new tokens each; the report compares the model before and after as for SFT.

With an objective that trains on preference pairs (objective=dpo | reward) the built-in tasks are their preference
versions (`data/builtin/preference.py`: the right answer chosen, a plausible wrong one rejected; the same splits).
A DPO run reports as an SFT run does (exact match on the test splits before and after: e.g. an SFT model given as
model.path, then the same after DPO); a reward run has no generation to report and ends with its evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from sftjax.config import TrainConfig, check
from sftjax.data.builtin.preference import build_preference_tasks
from sftjax.data.builtin.tasks import TASK_NAMES, TaskFiles
from sftjax.data.pipeline import DatasetSpec
from sftjax.job import report as report_lib
from sftjax.job.base import Builtin, ensure_builtin
from sftjax.job.config import BuiltinSection, JobConfig
from sftjax.objectives import base as objectives
from sftjax.peft.lora import count
from sftjax.peft.quant import tree_bytes
from sftjax.train.loop import run_training
from sftjax.train.setup import build_model, build_tokenizer, restore_checkpoint
from sftjax.train.state import merge_params

log = logging.getLogger("sftjax")


def uses_builtin(cfg: TrainConfig) -> bool:
    return cfg.model.path == "builtin" or not cfg.data.train


def check_tasks(b: BuiltinSection) -> None:
    """One clear line for an unknown or repeated name in builtin.tasks or a bad factor, before anything is built."""
    known = ", ".join(TASK_NAMES)
    check(bool(b.tasks) and len(set(b.tasks)) == len(b.tasks), "builtin.tasks", b.tasks,
          f"must name one or more distinct tasks of: {known}")
    check(b.report_split in ("test", "valid"), "builtin.report_split", b.report_split, "must be test or valid")
    for name in b.tasks:
        check(name in TASK_NAMES, "builtin.tasks", name, f"unknown task (the built-in tasks: {known})")
    for name in b.heads:
        check(name in b.tasks, "builtin.heads", name, f"not among builtin.tasks ({', '.join(b.tasks)})")
    check(b.base_layers >= 1, "builtin.base_layers", b.base_layers, "must be >= 1")
    for name in TASK_NAMES:
        check(getattr(b.upsample, name) > 0, f"builtin.upsample.{name}", getattr(b.upsample, name), "must be > 0")
        check(0.0 <= getattr(b.prompt_noise, name) < 1.0, f"builtin.prompt_noise.{name}",
              getattr(b.prompt_noise, name), "must be in [0, 1)")


def task_datasets(b: BuiltinSection, tasks: dict[str, TaskFiles]) -> list[DatasetSpec]:
    """data.train for the built-in tasks. Mixture weights: proportional to size, times builtin.upsample.<task>
    (left out when every factor is 1: the same draws)."""
    factors = {n: getattr(b.upsample, n) for n in tasks}
    same = len(set(factors.values())) == 1
    return [DatasetSpec(path=str(t.train_path), name=n, weight=None if same else t.n_train * factors[n],
                        prompt_noise=getattr(b.prompt_noise, n), head=n in b.heads) for n, t in tasks.items()]


def pair_tasks(built: Builtin) -> dict[str, TaskFiles]:
    """The preference versions of the built-in tasks (written once beside them), as TaskFiles of pair files."""
    task_dir = next(iter(built.tasks.values())).train_path.parent
    out_dir = task_dir.parent / f"{task_dir.name}-pairs-v1"
    if not (out_dir / "preference.json").is_file():
        build_preference_tasks(task_dir, out_dir, tasks=TASK_NAMES)
    counts = json.loads((out_dir / "preference.json").read_text())["tasks"]
    return {n: dataclasses.replace(t, train_path=out_dir / f"{n}_pairs_train.jsonl",
                                   valid_path=out_dir / f"{n}_pairs_valid.jsonl",
                                   test_path=out_dir / f"{n}_pairs_test.jsonl",
                                   **{f"n_{s}": counts[n][s]["n_pairs"] for s in ("train", "valid", "test")})
            for n, t in built.tasks.items()}


def baseline_cache(cfg: JobConfig, built: Builtin) -> Path:
    """Where the built-in base's scores for these evaluation settings are kept (the base as this method holds it:
    quantized under qlora), so that every run of a sweep scores the same base once."""
    b, q = cfg.builtin, cfg.method.quant
    parts = [[str(t.train_path) for t in built.tasks.values()],
             [str(t.path(b.report_split)) for t in built.tasks.values()],
             b.eval_examples, b.few_shot, b.max_new_tokens, cfg.model.dtype,
             [q.kind, q.double_quant] if cfg.method.name == "qlora" else None]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
    (built.root / "baselines").mkdir(exist_ok=True)
    return built.root / "baselines" / f"{key}.json"


def run_job(cfg: JobConfig, resolved: dict[str, Any] | None = None) -> dict[str, float]:
    """Run training with the built-in base and / or tasks filled in; report when the tasks are the built-in ones."""
    start = time.perf_counter()
    tasks = not cfg.data.train
    if tasks:
        check_tasks(cfg.builtin)
        check(not cfg.builtin.heads or cfg.objective.get("name") == "heads", "builtin.heads", cfg.builtin.heads,
              "classification heads need objective=heads")
    built = ensure_builtin(cfg)
    if cfg.objective.get("teacher") == "builtin":  # distillation toward the pre-trained base itself
        cfg.objective = {**cfg.objective, "teacher": str(built.base_dir)}
    built_at = time.perf_counter()
    own_base = cfg.model.path == "builtin"
    if own_base:
        cfg.model = dataclasses.replace(cfg.model, path=str(built.base_dir))
    module = objectives.module(cfg.objective.get("name", "sft"))
    pairs = getattr(module, "PAIRS", False)
    if tasks and getattr(module, "ROLLOUTS", False):  # RL on the built-in tasks: their answers are a few tokens
        longest = cfg.builtin.max_new_tokens
        if cfg.objective.get("max_new_tokens", longest) > longest:
            log.info("built-in tasks: objective.max_new_tokens=%d (builtin.max_new_tokens: their answers are short)",
                     longest)
            cfg.objective = {**cfg.objective, "max_new_tokens": longest}
    if tasks:
        built.tasks = {name: built.tasks[name] for name in cfg.builtin.tasks}  # in that order
        files = {n: t for n, t in built.tasks.items()}
        if pairs:
            files = pair_tasks(built)
        cfg.data = dataclasses.replace(cfg.data, train=task_datasets(cfg.builtin, files),
                                       eval=[DatasetSpec(path=str(t.valid_path), name=n)
                                             for n, t in files.items()], eval_fraction=0.0)
    if resolved is not None:  # the config.json of the run names what was actually used
        resolved = {**resolved, "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
                    "objective": cfg.objective}
    result = run_training(cfg, resolved)
    trained_at = time.perf_counter()
    if not tasks or cfg.objective.get("name") == "reward":
        return result

    run_dir = Path(cfg.trainer.run_dir)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only
    saved = json.loads((run_dir / "config.json").read_text())["data"]["train"]  # with the heads' classes
    cfg.data = dataclasses.replace(cfg.data, train=[dataclasses.replace(s, labels=list(d.get("labels") or []))
                                                    for s, d in zip(cfg.data.train, saved)])
    heads = {s.name: tuple(s.labels) for s in cfg.data.train if s.head}
    tuned = build_model(cfg)  # the model before fine-tuning (fresh adapters: B = 0), then restored after it
    before = merge_params(tuned.frozen, tuned.trainable)
    # Early stopping ends a run `patience` evaluations after its best one: report the best checkpoint then.
    best = cfg.trainer.patience > 0 and cfg.trainer.keep_best > 0
    trainable, step = restore_checkpoint(cfg, run_dir / "checkpoints", tuned, best=best)
    tokenizer = build_tokenizer(cfg, tuned.cfg)
    comparison = report_lib.compare(cfg, built.tasks, built.corpus.heldout_path, tokenizer, (tuned.cfg, before),
                                    (tuned.cfg, merge_params(tuned.frozen, trainable)), run_dir,
                                    baseline_cache(cfg, built) if own_base else None, heads)
    done = time.perf_counter()
    context = {
        "base": f"{cfg.model.path} ({tuned.cfg.num_params() / 1e6:.2f}M parameters)",
        "method": f"{cfg.method.name}, {count(tuned.trainable) / 1e6:.3f}M trainable parameters, {step} steps",
        "corpus": f"Python {built.corpus.python_version} standard library docstrings and comments, fingerprint "
                  f"{built.corpus.fingerprint}",
        "time": f"base {built_at - start:.0f} s (0 when cached), fine-tuning {trained_at - built_at:.0f} s, "
                f"evaluation {done - trained_at:.0f} s, total {done - start:.0f} s",
    }
    numbers = {  # for experiment tables (report.json "numbers")
        "method": cfg.method.name, "steps": step, "best_checkpoint": best,
        "trainable_params": count(tuned.trainable), "trainable_bytes": tree_bytes(tuned.trainable),
        "frozen_bytes": tree_bytes(tuned.frozen),
        "train_tokens_per_s": report_lib.median_tokens_per_s(run_dir / "metrics.jsonl"),
        "seconds": {"base": built_at - start, "fine_tuning": trained_at - built_at, "evaluation": done - trained_at},
    }
    images = report_lib.plots(run_dir, built.pretrain_dir, comparison)
    path = report_lib.write_report(run_dir, comparison, context, images, numbers)
    print(report_lib.table(comparison))
    print(f"report: {path}")
    mean = sum(comparison.fine_tuned.values()) / len(comparison.tasks)
    return {**result, "tasks/exact_match": mean, "forgetting": comparison.corpus_loss_tuned
            - comparison.corpus_loss_base}

