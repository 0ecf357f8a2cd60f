"""The main job, end to end: build or reuse the built-in base -> fine-tune on the built-in tasks -> compare.

`sftjax-train` with no dataset runs it (with conf/experiment/main.yaml's settings). Two config values switch the
built-in parts on, independently:
    model.path == "builtin"   the cached pre-trained base (built on first use: sftjax.job.base)
    data.train == []          the built-in tasks (their held-out splits as data.eval), and the before / after
                              report (sftjax.job.report) once training ends
so `sftjax-train model=path/to/hf_dir` fine-tunes your model on the built-in tasks and reports, and
`sftjax-train data=mine.jsonl` fine-tunes the built-in base on your data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from sftjax.config import DatasetSection, TrainConfig
from sftjax.job import report as report_lib
from sftjax.job.base import ensure_builtin
from sftjax.peft.lora import count
from sftjax.train.loop import run_training
from sftjax.train.setup import build_model, build_tokenizer, restore_checkpoint
from sftjax.train.state import merge_params

log = logging.getLogger("sftjax")


def uses_builtin(cfg: TrainConfig) -> bool:
    return cfg.model.path == "builtin" or not cfg.data.train


def run_job(cfg: TrainConfig, resolved: dict[str, Any] | None = None) -> dict[str, float]:
    """Run training with the built-in base and / or tasks filled in; report when the tasks are the built-in ones."""
    start = time.perf_counter()
    built = ensure_builtin(cfg)
    built_at = time.perf_counter()
    tasks = not cfg.data.train
    if cfg.model.path == "builtin":
        cfg.model = dataclasses.replace(cfg.model, path=str(built.base_dir))
    if tasks:
        cfg.data = dataclasses.replace(
            cfg.data, train=[DatasetSection(path=str(t.train_path), name=n) for n, t in built.tasks.items()],
            eval=[DatasetSection(path=str(t.eval_path), name=n) for n, t in built.tasks.items()], eval_fraction=0.0)
    if resolved is not None:  # the config.json of the run names what was actually used
        resolved = {**resolved, "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data)}
    result = run_training(cfg, resolved)
    trained_at = time.perf_counter()
    if not tasks:
        return result

    run_dir = Path(cfg.trainer.run_dir)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only
    tuned = build_model(cfg)  # the model before fine-tuning (fresh adapters: B = 0), then restored after it
    before = merge_params(tuned.frozen, tuned.trainable)
    trainable, step = restore_checkpoint(cfg, run_dir / "checkpoints", tuned)
    tokenizer = build_tokenizer(cfg, tuned.cfg)
    comparison = report_lib.compare(cfg, built.tasks, built.corpus.heldout_path, tokenizer, (tuned.cfg, before),
                                    (tuned.cfg, merge_params(tuned.frozen, trainable)), run_dir)
    done = time.perf_counter()
    context = {
        "base": f"{cfg.model.path} ({tuned.cfg.num_params() / 1e6:.2f}M parameters)",
        "method": f"{cfg.method.name}, {count(tuned.trainable) / 1e6:.3f}M trainable parameters, {step} steps",
        "corpus": f"Python {built.corpus.python_version} standard library docstrings and comments, fingerprint "
                  f"{built.corpus.fingerprint}",
        "time": f"base {built_at - start:.0f} s (0 when cached), fine-tuning {trained_at - built_at:.0f} s, "
                f"evaluation {done - trained_at:.0f} s, total {done - start:.0f} s",
    }
    images = report_lib.plots(run_dir, built.pretrain_dir, comparison)
    path = report_lib.write_report(run_dir, comparison, context, images)
    print(report_lib.table(comparison))
    print(f"report: {path}")
    mean = sum(comparison.fine_tuned.values()) / len(comparison.tasks)
    return {**result, "tasks/exact_match": mean, "forgetting": comparison.corpus_loss_tuned
            - comparison.corpus_loss_base}

