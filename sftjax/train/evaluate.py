"""Evaluation on held-out data: teacher-forced loss / perplexity / token accuracy, and generation exact match.

Both are reported overall and per task (the datasets of the mixture, in order). Teacher-forced metrics are the
objective's (SFT: loss, perplexity, token accuracy), from its sums through the pmapped eval step over packed
rows; generation takes each example's prompt (the tokens before its first trained token), decodes greedily, and
compares the text up to EOS with the example's trained tokens (the reference answer), both stripped of
surrounding whitespace.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np

from sftjax.data.masking import Tokenized
from sftjax.data.pipeline import DataIterator, Prepared
from sftjax.data.tokenizer import Tokenizer
from sftjax.model.config import ModelConfig
from sftjax.model.generate import generate
from sftjax.model.transformer import Params
from sftjax.objectives.base import Objective
from sftjax.train.state import device_mesh, replicate
from sftjax.train.step import compile_eval

_GENERATION_BATCH = 16  # prompts decoded together


def task_names(prepared: Prepared) -> list[str]:
    return [s.name for s in prepared.stats]


def text_tasks(prepared: Prepared) -> list[tuple[str, list[Tokenized]]]:
    """(name, examples) of the tasks answered as text: all but those with a classification head."""
    heads = prepared.labels or (None,) * len(prepared.datasets)
    return [(name, examples) for name, examples, classes in zip(task_names(prepared), prepared.datasets, heads)
            if classes is None]


def summarise(objective: Objective, totals: dict[str, np.ndarray]) -> dict[str, float]:
    """The objective's metrics of summed (float64) totals as floats; metrics with nothing to average are left out."""
    out = {}
    for key, value in objective.metrics(totals).items():
        value = float(value)
        if not math.isnan(value):
            out[key] = value
    return out


def teacher_forced(eval_sums: Callable, objective: Objective, data: Prepared, devices: int,
                   max_batches: int = 0) -> dict[str, float]:
    """The objective's metrics (SFT: loss, ppl, accuracy, tokens, overall and '<task>/...') over one pass of
    `data` (max_batches: 0 = all), its sums added up in float64.

    eval_sums(batch) -> the sums over one batch of this process's rows [devices, b, T] and every other process's,
    on the host (`parallel.DataParallel.eval_sums`, `parallel.Sharded.eval_sums`); each process reads its rows.
    """
    totals: dict[str, np.ndarray] | None = None
    rows = DataIterator(data, devices=devices, process_index=jax.process_index(), process_count=jax.process_count())
    for i, batch in enumerate(rows):
        if max_batches and i >= max_batches:
            break
        sums = eval_sums(objective.prepare(batch))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    if totals is None:
        return {}
    return summarise(objective, totals)


def on_one_device(objective: Objective, trainable: Any, data: Prepared, frozen: Any = None, refs: Any = None,
                  max_batches: int = 0) -> dict[str, float]:
    """`teacher_forced` of host trees (not replicated) on the first local device: sftjax-eval and the report."""
    mesh = device_mesh(1)
    p_eval = compile_eval(objective, 1)
    placed = [replicate(tree or {}, mesh) for tree in (trainable, frozen, refs)]
    return teacher_forced(lambda batch: {k: np.asarray(v[0], np.float64) for k, v in p_eval(*placed, batch).items()},
                          objective, data, 1, max_batches)


def split_prompt(example: Tokenized) -> tuple[list[int], list[int]]:
    """(prompt tokens, reference tokens): the reference is the trained part of the example (of a preference pair:
    its chosen completion)."""
    tokens, mask = example.tokens, example.mask
    if example.split:
        tokens, mask = tokens[:example.split], mask[:example.split]
    trained = np.flatnonzero(mask)
    first = int(trained[0]) if len(trained) else len(tokens)
    return tokens[:first].tolist(), tokens[first:].tolist()


def _text(tokenizer: Tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generations(model_cfg: ModelConfig, params: Params, tokenizer: Tokenizer, examples: list[Tokenized],
                max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy generations for examples: [{where, prompt, generated, reference, exact}].

    Every batch has _GENERATION_BATCH rows (the last one filled up with repeats) and prompts left-padded to the
    longest of `examples`: one compilation for all of them.
    """
    eos = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    split = [split_prompt(ex) for ex in examples]
    prompts = [p or [tokenizer.bos_id or 0] for p, _ in split]
    longest = max((len(p) for p in prompts), default=0)
    out = []
    for start in range(0, len(examples), _GENERATION_BATCH):
        chunk = list(range(start, min(start + _GENERATION_BATCH, len(examples))))
        rows = chunk + [chunk[0]] * (_GENERATION_BATCH - len(chunk))
        new = generate(model_cfg, params, [prompts[i] for i in rows], max_new_tokens, eos_token_ids=eos,
                       pad_token_id=tokenizer.pad_id, prompt_len=longest)
        for i, generated in zip(chunk, new):
            text, ref = _text(tokenizer, generated), _text(tokenizer, split[i][1])
            out.append({"where": examples[i].where, "prompt": tokenizer.decode(split[i][0]), "generated": text,
                        "reference": ref, "exact": text == ref})
    return out


def generation_accuracy(model_cfg: ModelConfig, params: Params, tokenizer: Tokenizer, data: Prepared,
                        max_new_tokens: int, max_examples: int = 0) -> dict[str, float]:
    """Exact-match accuracy of greedy generations, overall and per task ('<task>/exact_match'), of the tasks
    answered as text (a head task's accuracy is the head's). One compilation per task (its prompts padded to its
    longest)."""
    out: dict[str, float] = {}
    hits = total = 0
    for name, examples in text_tasks(data):
        examples = examples[:max_examples] if max_examples else examples
        results = generations(model_cfg, params, tokenizer, examples, max_new_tokens)
        task_hits = sum(r["exact"] for r in results)
        out[f"{name}/exact_match"] = task_hits / max(len(results), 1)
        hits, total = hits + task_hits, total + len(results)
    if total:
        out["exact_match"] = hits / total
    return out


def one_pass(data: Prepared, max_examples: int = 0) -> Prepared:
    """`data` as an evaluation set: one epoch visiting every example exactly once, at most `max_examples` per task
    (0: all). Mixture weights are dropped: with weights, an epoch draws round(E * w_i / sum(w)) examples of task i,
    repeating some examples and skipping others."""
    specs = [dataclasses.replace(s, weight=None) for s in data.config.datasets]
    config = dataclasses.replace(data.config, datasets=specs, num_epochs=1)
    datasets = [d[:max_examples] for d in data.datasets] if max_examples else data.datasets
    return dataclasses.replace(data, config=config, datasets=datasets)


def sample_examples(data: Prepared, n: int) -> list[Tokenized]:
    """n examples taken round-robin over the tasks answered as text (the first of each task first):
    deterministic."""
    picked: list[Tokenized] = []
    datasets = [examples for _, examples in text_tasks(data)]
    for i in range(max((len(d) for d in datasets), default=0)):
        for examples in datasets:
            if len(picked) < n and i < len(examples):
                picked.append(examples[i])
    return picked
