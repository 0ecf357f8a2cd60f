"""`sftjax-eval`: loss, perplexity, accuracy and exact match of a base model or a run's checkpoint, per task.

    sftjax-eval --model path/to/hf_dir --data test.jsonl --data other.jsonl data.seq_len=1024
    sftjax-eval --run runs/2026-11-24/12-00-00 --best --json               # on the run's own eval split
    sftjax-eval --run RUN_DIR --step 200 --data test.jsonl --output eval.json

A task is one dataset, named by its file stem. Teacher-forced metrics are the run's objective's (SFT: means over the
trained tokens, the loss mask of training; a head task: its head's loss and accuracy per example; distillation also
the divergence from the teacher), every example counted once; exact match compares the greedy continuation of each
example's prompt (its tokens before the first trained one), cut at EOS, with the trained tokens, both decoded and
stripped (text tasks only). An RL run (objective=grpo | ppo) is evaluated as it evaluates itself in training: the
greedy completion (objective.max_new_tokens) of each held-out prompt, its exact match with the prompt's answer
where it has one, and the run's reward (`objective.rewards`) of it, per task.

The settings come from the training configuration: with --model, the one `sftjax-train model=<MODEL>` would use;
with --run, RUN_DIR/config.json, and the weights from RUN_DIR/checkpoints (the latest, --step N or --best),
refused if the run was trained on another base than model.path holds now. Trailing key=value arguments override
it as they would sftjax-train's (data.seq_len=1024 data.mask=all data.chat_template=chatml model.dtype=bfloat16
trainer.batch_size=16). A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from sftjax.cli.common import add_checkpoint_choice, compose_config, fail, one_line, run_config, version_line
from sftjax.cli.malloc import use_huge_pages
from sftjax.config import TrainConfig
from sftjax.data.pipeline import DatasetSpec, Prepared
from sftjax.data.tokenizer import Tokenizer
from sftjax.errors import UserError
from sftjax.model.config import PRESETS
from sftjax.train import evaluate
from sftjax.objectives import base as objectives
from sftjax.train.setup import (build_data, build_model, build_objective, build_prompts, build_references,
                                build_tokenizer, check_data, restore_checkpoint, task_names)
from sftjax.train.state import merge_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sftjax-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="base model: local HF directory or preset name (as sftjax-train model=)")
    source.add_argument("--run", help="training run directory (config.json, checkpoints/)")
    add_checkpoint_choice(p)
    p.add_argument("--version", action="version", version=version_line("sftjax-eval"))
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="dataset to evaluate on, one task each (repeat); default with --run: the run's eval split")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (sets model.tokenizer)")
    p.add_argument("--format", default="auto", help="format of the --data files: auto | chat | prompt_completion | "
                                                     "alpaca | text")
    p.add_argument("--as-chat", action="store_true", help="render --data prompt/completion and Alpaca as chats")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length for exact match (0: skip it)")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate the first N examples of each task (0: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE (must not exist)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides (data.*, model.dtype, "
                                                                     "trainer.batch_size, ...)")
    return p.parse_intermixed_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """What can be refused before loading anything."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"{bad[0]!r}: expected a key=value override of the training config (e.g. data.seq_len=1024)")
    if args.model and (args.step is not None or args.best):
        raise UserError("--step / --best choose a checkpoint of --run; a --model has none")
    if args.model and not args.data:
        raise UserError("--model needs --data (the datasets to evaluate on)")
    if args.max_new_tokens < 0 or args.max_examples < 0:
        raise UserError("--max-new-tokens and --max-examples must be >= 0")
    if args.output and Path(args.output).exists():
        raise UserError(f"--output {args.output}: already exists; not overwriting it")
    if args.output and not Path(args.output).absolute().parent.is_dir():
        raise UserError(f"--output {args.output}: no such directory")


def load_config(args: argparse.Namespace) -> TrainConfig:
    if args.model:
        if not Path(args.model).is_dir() and args.model not in PRESETS:
            raise UserError(f"--model {args.model}: no such model directory (nor a preset: {', '.join(PRESETS)})")
        cfg = compose_config([f"model={args.model}", *args.overrides])
    else:
        cfg = run_config(args.run, args.overrides)
    if args.tokenizer:
        cfg.model.tokenizer = args.tokenizer
    return cfg


def eval_data(cfg: TrainConfig, tokenizer: Tokenizer, args: argparse.Namespace) -> tuple[Prepared, TrainConfig]:
    """The --data files (under the run's data settings), or the run's eval split; every example once. And the
    config whose data.train names those tasks (the objective's tasks)."""
    if args.data:
        sections = [DatasetSpec(path=p, format=args.format, as_chat=args.as_chat) for p in args.data]
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=sections, eval=[], eval_fraction=0))
        data = build_data(cfg, tokenizer, devices=1)[0]
    else:
        data = build_data(cfg, tokenizer, devices=1)[1]
        if data is None:
            raise UserError(f"--run {args.run}: the run has no eval split (data.eval or data.eval_fraction); "
                            "give --data")
    return evaluate.one_pass(data, args.max_examples), cfg  # task names are unique: build_data checks


def evaluate_rl(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """An RL run's (or a model's, objective=grpo|ppo) greedy completions of held-out prompts: exact match and
    reward per task (`train/rl_eval.py`)."""
    from sftjax.train.rewards import build_rewards
    from sftjax.train.rl_eval import evaluate_prompts

    if args.data:
        sections = [DatasetSpec(path=p, format=args.format, as_chat=args.as_chat) for p in args.data]
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=sections, eval=[], eval_fraction=0))
    model = build_model(cfg)
    tokenizer = build_tokenizer(cfg, model.cfg)
    s = objectives.settings(cfg.objective)[1]
    train, held, _ = build_prompts(cfg, tokenizer, s.max_new_tokens)
    prompts = [p for task in train for p in task] if args.data else held
    if prompts is None:
        raise UserError(f"--run {args.run}: the run has no held-out prompts (data.eval or data.eval_fraction); "
                        "give --data")
    if args.max_examples:
        prompts = [p for t in range(len(task_names(cfg))) for p in [q for q in prompts if q.task == t][
            :args.max_examples]]
    trainable, step = model.trainable, None
    if args.run:
        trainable, step = restore_checkpoint(cfg, Path(args.run) / "checkpoints", model, args.step, args.best)
    names = list(task_names(cfg))
    rewards = build_rewards(s.rewards, s.weights, tokenizer, prompts)
    result, _ = evaluate_prompts(model.cfg, merge_params(model.frozen, trainable), tokenizer, prompts, names, rewards,
                                 s.max_new_tokens)
    count = {n: sum(p.task == t for p in prompts) for t, n in enumerate(names)}
    metrics = lambda prefix, n: {"examples": n, "exact_match": result.get(f"{prefix}exact_match"),  # noqa: E731
                                 "reward": result.get(f"{prefix}reward")}
    return {"model": cfg.model.path, "run": args.run, "step": step,
            "tasks": {n: metrics(f"{n}/", count[n]) for n in names}, "overall": metrics("", len(prompts))}


def evaluate_all(args: argparse.Namespace) -> dict[str, Any]:
    """The result object: {model, run, step, tasks: {name: metrics}, overall: metrics}."""
    # Orbax logs every file it opens at INFO, and warns that a read-only directory is read-only.
    logging.getLogger("absl").setLevel(logging.ERROR)
    check_args(args)
    cfg = load_config(args)
    if getattr(objectives.module(cfg.objective.get("name", "sft")), "ROLLOUTS", False):
        return evaluate_rl(args, cfg)
    model = build_model(cfg)
    model_cfg, trainable, frozen = model.cfg, model.trainable, model.frozen
    tokenizer = build_tokenizer(cfg, model_cfg)
    data, data_cfg = eval_data(cfg, tokenizer, args)
    step = None
    if args.run:
        trainable, step = restore_checkpoint(cfg, Path(args.run) / "checkpoints", model, args.step, args.best)
    objective = build_objective(data_cfg, model_cfg, data.labels)
    names = task_names(data_cfg)  # the run's task names for its eval split (metrics are keyed by them), or --data's
    check_data(objective, data)
    objective, refs, _, (data,) = build_references(data_cfg, model, objective, tokenizer, [data])
    forced = evaluate.on_one_device(objective, trainable, data, frozen, refs)
    exact = {}
    if args.max_new_tokens:
        exact = evaluate.generation_accuracy(model_cfg, merge_params(frozen, trainable), tokenizer, data,
                                             args.max_new_tokens)

    def metrics(prefix: str, examples: int) -> dict[str, Any]:
        """The objective's metrics (SFT: tokens, loss, ppl, accuracy; a head task: loss, accuracy of its head)."""
        def mine(key: str) -> bool:  # the task's keys, or (prefix "") those of no task ("rewards/chosen" too)
            return key.startswith(prefix) if prefix else not any(key.startswith(f"{n}/") for n in names)

        out = {**{key[len(prefix):]: value for key, value in forced.items() if mine(key)}, "examples": examples}
        if "tokens" in out:
            out["tokens"] = int(out["tokens"])
        return {**out, "exact_match": exact.get(f"{prefix}exact_match")}

    return {"model": cfg.model.path, "run": args.run, "step": step,
            "tasks": {n: metrics(f"{n}/", len(d)) for n, d in zip(names, data.datasets)},
            "overall": metrics("", sum(map(len, data.datasets)))}


def print_table(result: dict[str, Any]) -> None:
    where = f" (run {result['run']}, step {result['step']})" if result["run"] else ""
    print(f"model {result['model']}{where}")
    rows = [*result["tasks"].items(), ("overall", result["overall"])]
    width = max(len(name) for name, _ in rows)
    print(f"{'task':<{width}}  {'examples':>8}  {'tokens':>8}  {'loss':>8}  {'ppl':>10}  {'accuracy':>9}  "
          f"{'exact match':>11}")
    show = lambda m, key, form: "-" if m.get(key) is None else format(m[key], form)  # noqa: E731
    for name, m in rows:
        print(f"{name:<{width}}  {m['examples']:>8}  {show(m, 'tokens', 'd'):>8}  {show(m, 'loss', '.4f'):>8}  "
              f"{show(m, 'ppl', '.4g'):>10}  {show(m, 'accuracy', '.2%'):>9}  {show(m, 'exact_match', '.2%'):>11}")
    if "reward" in result["overall"]:  # an RL run
        print(f"\n{'task':<{width}}  {'prompts':>8}  {'reward':>10}")
        for name, m in rows:
            print(f"{name:<{width}}  {m['examples']:>8}  {show(m, 'reward', '.4f'):>10}")
    if "pairs" in result["overall"]:  # a pair objective (dpo: implicit rewards; reward: the head's)
        dpo = "rewards/accuracies" in result["overall"]
        print(f"\n{'task':<{width}}  {'pairs':>8}  {'ranked right':>12}  {'margin':>8}")
        for name, m in rows:
            right = m.get(("rewards/accuracies" if name == "overall" else "accuracies") if dpo else "accuracy")
            margin = m.get("rewards/margins" if dpo else "margin")
            print(f"{name:<{width}}  {int(m.get('pairs') or 0):>8}  {show({'x': right}, 'x', '.2%'):>12}  "
                  f"{show({'x': margin}, 'x', '.4f'):>8}")


def write_output(path: str, result: dict[str, Any]) -> None:
    try:
        with open(path, "x") as f:  # "x": never overwrite, even if the file appeared while evaluating
            f.write(json.dumps(result, indent=2) + "\n")
    except FileExistsError:
        raise UserError(f"--output {path}: already exists; not overwriting it") from None
    except OSError as e:
        raise UserError(f"--output {path}: {e.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate_all(args)
        if args.output:
            write_output(args.output, result)
    except UserError as e:
        return fail("sftjax-eval", str(e))
    except (HydraException, OmegaConfBaseException) as e:
        return fail("sftjax-eval", one_line(e))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    use_huge_pages()  # as the console script does (sftjax/cli/launch.py)
    sys.exit(main())
