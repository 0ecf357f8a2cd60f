"""The training loop: setup -> (resume) -> steps, evaluation, early stopping, checkpoints -> final metric.

    run_training(cfg) -> {"metric": trainer.best_metric at the end (when measured), ...final metrics}

Exact resume: a checkpoint holds the train state (trainable weights, optimizer state, step, RNG) and, as JSON,
the data iterator state, the early-stopping state, the resolved config and the fingerprint of the base weights.
Batches depend only on the iterator state and the step's randomness only on (rng, step), so a run killed at any
moment and resumed from its latest checkpoint computes exactly the steps the uninterrupted run computes.

RL objectives (grpo, ppo) draw their batches from rollouts (`train/rollout.py`) instead of the data iterator and
are evaluated by generation on held-out prompts (`train/rl_eval.py`); their checkpoints fall between rollouts (a
save that falls due inside one waits for its end), so they resume exactly too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from sftjax.config import TrainConfig, validate
from sftjax.data.augment import with_prompt_noise
from sftjax.data.pipeline import DataIterator
from sftjax.errors import UserError
from sftjax.objectives import base as objectives
from sftjax.objectives.base import Objective
from sftjax.train import evaluate
from sftjax.train.checkpoint import Checkpointer, check_base, check_references
from sftjax.train.metrics import MetricsWriter, NullWriter, Progress
from sftjax.train.optim import make_optimizer, schedule
from sftjax.train.setup import (build_data, build_model, build_objective, build_prompts, build_references,
                                build_tokenizer, check_data, describe_model, run_trainable, with_labels)
from sftjax.train.parallel import build_parallel, local_groups
from sftjax.train.state import init_state, merge_params

log = logging.getLogger("sftjax")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run stops; the last checkpoint stays the last good state."""


@dataclasses.dataclass
class EarlyStopping:
    """Stop after `patience` evaluations without an improvement of at least `min_delta`."""

    mode: str
    patience: int
    min_delta: float
    best: float | None = None
    bad_evals: int = 0

    def update(self, value: float) -> bool:
        """Record an evaluation; True when training should stop."""
        better = self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience


def _next_batch(iterator: Iterator[dict[str, np.ndarray]], accum: int,
                objective: Objective) -> tuple[dict[str, np.ndarray], int]:
    """[devices, accum, b, T] arrays from `accum` consecutive batches (plus what the objective prepares, e.g. SFT's
    label_index [devices, accum, K]), and their non-padding token count."""
    parts = [next(iterator) for _ in range(accum)]
    batch = {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}
    return objective.prepare(batch), int((batch["segment_ids"] > 0).sum())


class _Batches:
    """The SFT batch source: the data pipeline's batches (augmented, `data/augment.py`) and the objective's host
    preparation."""

    at_boundary = True
    metrics: dict[str, float] = {}

    def __init__(self, iterator: DataIterator, cfg: TrainConfig, objective: Objective):
        self.iterator = with_prompt_noise(iterator, [d.prompt_noise for d in cfg.data.train], cfg.trainer.seed)
        self.cfg, self.objective = cfg, objective

    def state(self) -> dict[str, Any]:
        return self.iterator.state()

    def next(self, state, frozen, refs, step: int) -> tuple[dict[str, np.ndarray], int]:
        return _next_batch(self.iterator, self.cfg.trainer.grad_accum, self.objective)


def _rl_source(cfg: TrainConfig, objective, model_cfg, tokenizer, devices: int):
    """(Rollouts, held-out prompts or None, rewards, a log line) of an RL run."""
    from sftjax.train.rewards import build_rewards
    from sftjax.train.rollout import Rollouts

    s, t = objective.settings, cfg.trainer
    if jax.process_count() > 1:
        raise UserError(f"objective={objective.name}: RL runs on one host (of {jax.process_count()} processes)")
    if t.parallelism != "data":
        raise UserError(f"trainer.parallelism={t.parallelism}: objective={objective.name} samples with the pmap step; "
                        "use trainer.parallelism=data")
    rows = t.batch_size * t.grad_accum * s.minibatches
    if rows % s.num_generations:
        raise UserError(f"objective.num_generations={s.num_generations}: a rollout of trainer.batch_size x "
                        f"trainer.grad_accum x objective.minibatches = {rows} completions must hold whole groups "
                        "(a multiple of num_generations)")
    if t.max_steps % s.steps_per_rollout:
        raise UserError(f"trainer.max_steps={t.max_steps}: must be a multiple of the {s.steps_per_rollout} optimizer "
                        "steps each rollout feeds (objective.epochs x objective.minibatches), so that the run ends "
                        "between rollouts")
    train, held, stats = build_prompts(cfg, tokenizer, s.max_new_tokens)
    rewards = build_rewards(s.rewards, s.weights, tokenizer, [p for task in train for p in task] + (held or []))
    weights = [d.weight for d in cfg.data.train]
    if any(w is None for w in weights) and not all(w is None for w in weights):
        raise UserError("data.train[*].weight: give a weight for every dataset or for none")
    source = Rollouts(objective, model_cfg, tokenizer, train, None if weights[0] is None else weights, rewards,
                      devices, t.batch_size, t.grad_accum, cfg.data.seed, t.seed)
    line = ", ".join(f"{st.name} {st.kept} prompts" + (f" ({st.truncated} truncated, {st.dropped} dropped)"
                                                       if st.truncated or st.dropped else "") for st in stats)
    line += f"; rollouts of {rows // s.num_generations} prompts x {s.num_generations} completions, rows of " \
            f"at most {source.T} tokens, {s.steps_per_rollout} step(s) each"
    return source, held, rewards, line


def run_training(cfg: TrainConfig, resolved_config: dict[str, Any] | None = None) -> dict[str, float]:
    """Train as `cfg` says; return the final metrics, with "metric" = trainer.best_metric (for sweeps)."""
    t, o = cfg.trainer, cfg.optim
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it renames at INFO
    if t.distributed and not jax.distributed.is_initialized():  # a sweep's second job finds them connected
        from sftjax.train.distributed import initialize

        initialize(t.coordinator, t.num_processes, t.process_id, t.init_timeout)
    validate(cfg, jax.local_device_count(), jax.process_count())
    lead = jax.process_index() == 0  # writes metrics, samples and the config; every process saves its shards
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(cfg)
    model_cfg, frozen, base_fingerprint = model.cfg, model.frozen, model.fingerprint
    tokenizer = build_tokenizer(cfg, model_cfg)
    rl = getattr(objectives.module(cfg.objective.get("name", "sft")), "ROLLOUTS", False)
    engine_groups = local_groups(t)  # this process's groups of rows in each batch
    if rl:
        objective = build_objective(cfg, model_cfg)
        train_data = eval_data = None
    else:
        train_data, eval_data = build_data(cfg, tokenizer, engine_groups)
        objective = build_objective(cfg, model_cfg, train_data.labels)
        check_data(objective, train_data)
    objective, refs, reference_fingerprints, (train_data, eval_data) = build_references(
        cfg, model, objective, tokenizer, [train_data, eval_data])
    trainable = run_trainable(model, objective, t.seed)
    optimizer = make_optimizer(o, t.max_steps)
    lr_schedule = schedule(o, t.max_steps)
    abstract = jax.eval_shape(lambda: init_state(trainable, optimizer, t.seed))
    engine = build_parallel(t, model_cfg, objective, optimizer, lr_schedule, abstract, frozen, refs)
    devices = engine.groups

    if rl:
        source, eval_prompts, rewards, data_line = _rl_source(cfg, objective, model_cfg, tokenizer, devices)
        if t.best_metric == "eval/loss":  # the default, which an RL run does not measure
            t = dataclasses.replace(t, best_metric="eval/reward", best_mode="max")
    has_eval = (eval_prompts is not None) if rl else eval_data is not None
    keep_best = t.keep_best if has_eval or not t.best_metric.startswith("eval/") else 0
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=t.keep_last, keep_best=keep_best,
                                best_metric=t.best_metric if keep_best else None, best_mode=t.best_mode)
    stopper = EarlyStopping(t.best_mode, t.patience, t.min_delta)
    data_state = None
    start = checkpointer.latest_step()
    if start is not None and t.resume == "never":
        raise UserError(f"trainer.resume=never: {run_dir / 'checkpoints'} already holds checkpoints (latest step "
                        f"{start}); use trainer.resume=auto to continue, or a new trainer.run_dir")
    if start is None:
        state = init_state(trainable, optimizer, t.seed)
    else:  # restore into the shapes of a fresh state without allocating one
        state, extras = checkpointer.restore(engine.restore_target(abstract), start)
        check_base(extras, base_fingerprint)
        check_references(extras, reference_fingerprints)
        data_state = extras["data_state"]
        stopper = EarlyStopping(**extras["early_stopping"])
        log.warning("resuming %s from step %d", run_dir, start)
    start = start or 0
    state = engine.place_state(state)
    frozen_r = engine.place_frozen(frozen)
    refs_r = engine.place_refs(refs)
    del refs  # the placed copies are the ones the steps read
    # The loaded trees move to the host (samples are generated from them): only the placed copies stay on devices.
    frozen, trainable = jax.device_get(frozen), jax.device_get(trainable)
    model = dataclasses.replace(model, frozen=frozen, trainable=jax.device_get(model.trainable))
    if rl:
        source.restore(data_state)
    else:
        data_line = ", ".join(f"{s.name} {s.kept}" + (" (chat masks: " + ", ".join(
            f"{rule} {n}" for rule, n in s.mask_rules.items()) + ")" if s.mask_rules else "") for s in train_data.stats)
        source = _Batches(DataIterator(train_data, devices=devices, process_index=jax.process_index(),
                                       process_count=jax.process_count(), state=data_state), cfg, objective)
    # drops lines a killed run wrote after `start`; other processes than the first write nothing
    metrics_writer = MetricsWriter(run_dir, resume_step=start) if lead else NullWriter()
    config_dump = with_labels(resolved_config or dataclasses.asdict(cfg), () if rl else train_data.labels)
    if lead:
        (run_dir / "config.json").write_text(json.dumps(config_dump, indent=2, default=str) + "\n")
    for line in describe_model(cfg, model):
        log.info("%s", line)
    extra = {k: v for k, v in trainable.items() if k not in model.trainable}
    log.info("objective %s%s", objective.name, f": {sum(x.size for x in jax.tree.leaves(extra)):,} parameters of its "
             f"own ({', '.join(extra)}), trained and saved with the model" if extra else "")
    log.info("data: %s; run dir %s", data_line, run_dir)

    def run_eval(step: int) -> dict[str, float]:
        if not has_eval:
            return {}
        if rl:
            return run_rl_eval(step)
        result = evaluate.teacher_forced(lambda batch: engine.eval_sums(state["trainable"], frozen_r, refs_r, batch),
                                         objective, eval_data, devices, t.eval_batches)
        if t.num_samples:
            params_now = merge_params(frozen, engine.params(state["trainable"]))  # objective parameters ignored
            samples = evaluate.generations(model_cfg, params_now, tokenizer,
                                           evaluate.sample_examples(eval_data, t.num_samples), t.sample_tokens)
            for i, s in enumerate(samples):
                metrics_writer.write_text(step, f"sample/{i}", json.dumps(s, ensure_ascii=False))
        metrics_writer.write(step, result, split="eval")
        return {f"eval/{k}": v for k, v in result.items()}

    def run_rl_eval(step: int) -> dict[str, float]:
        from sftjax.train.rl_eval import evaluate_prompts

        s = objective.settings
        params_now = merge_params(frozen, engine.params(state["trainable"]))
        result, samples = evaluate_prompts(model_cfg, params_now, tokenizer, eval_prompts, list(objective.tasks),
                                           rewards if s.eval_reward else None, s.max_new_tokens, t.num_samples)
        for i, sample in enumerate(samples):
            metrics_writer.write_text(step, f"sample/{i}", json.dumps(sample, ensure_ascii=False))
        metrics_writer.write(step, result, split="eval")
        return {f"eval/{k}": v for k, v in result.items()}

    def save(step: int, metrics: dict[str, float]) -> None:
        extras = {"data_state": source.state(), "early_stopping": dataclasses.asdict(stopper),
                  "config": config_dump, "base_fingerprint": base_fingerprint,
                  "reference_fingerprints": reference_fingerprints, "metrics": metrics}
        checkpointer.save(step, engine.to_save(state), extras, metrics)

    progress = Progress(t.max_steps, start, force=None if t.progress and lead else False)
    last: dict[str, float] = {}
    step, stop_early, save_due = start, False, False
    window_tokens, window_start = 0, time.perf_counter()
    try:
        while step < t.max_steps and not (stop_early and source.at_boundary):  # RL: the rollout is finished first
            batch, tokens = source.next(state, frozen_r, refs_r, step)
            state, step_metrics = engine.train(state, frozen_r, refs_r, batch)
            step += 1
            window_tokens += tokens
            is_eval = has_eval and t.eval_every and step % t.eval_every == 0
            save_due = save_due or bool(t.save_every and step % t.save_every == 0)
            is_save = save_due and source.at_boundary  # RL: never inside a rollout
            if step % t.log_every == 0 or is_eval or is_save or step == t.max_steps:
                host = engine.scalars(step_metrics)
                if not host.pop("finite"):
                    raise TrainingDiverged(f"non-finite loss or gradient at step {step} (loss {host['loss']}): "
                                           f"stopped; the last checkpoint in {run_dir / 'checkpoints'} is the "
                                           f"last good state (lower optim.lr or set optim.max_grad_norm)")
                elapsed = time.perf_counter() - window_start
                host["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                host.update(source.metrics)  # RL: the last rollout's rewards, lengths and timings
                window_tokens, window_start = 0, time.perf_counter()
                metrics_writer.write(step, host, split="train")
                progress.update(step, host["loss"], host["tokens_per_s"])
                last = {f"train/{k}": v for k, v in host.items()}
            if is_eval:
                last.update(run_eval(step))
                if t.patience and t.best_metric in last:
                    stop_early = stopper.update(last[t.best_metric])
                    if stop_early:
                        log.info("early stopping at step %d: %s did not improve for %d evaluations (best %.4f)",
                                 step, t.best_metric, t.patience, stopper.best)
            if is_save:
                save(step, last)
                save_due = False
        if has_eval and not (t.eval_every and step % t.eval_every == 0):
            last.update(run_eval(step))
        if checkpointer.latest_step() != step:
            save(step, last)
    finally:
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        metrics_writer.close()
    last["step"] = float(step)
    if t.best_metric in last:
        last["metric"] = last[t.best_metric]
    if lead:
        (run_dir / "final_metrics.json").write_text(json.dumps(last, indent=2, sort_keys=True) + "\n")
    return last
