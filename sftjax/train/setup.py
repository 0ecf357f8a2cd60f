"""From a TrainConfig to the objects a run needs: model, tokenizer, train / eval data.

Each builder checks what only it can check (the tokenizer fits the model's vocabulary, the eval split is not
empty) and raises a one-line UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

from sftjax.config import TrainConfig
from sftjax.data.pipeline import DataConfig, DatasetSpec, Prepared, prepare
from sftjax.data.tokenizer import Tokenizer, load_tokenizer
from sftjax.errors import CheckpointError, ConfigError
from sftjax.model.config import ModelConfig, load_hf_config, preset
from sftjax.model.hf import load_pretrained
from sftjax.model.transformer import Params
from sftjax.objectives import base as objectives
from sftjax.peft import lora as lora_lib
from sftjax.peft import quant
from sftjax.train.checkpoint import Checkpointer, check_base, fingerprint
from sftjax.train.optim import make_optimizer
from sftjax.train.state import init_state, merge_params
from sftjax.train.evaluate import one_pass

log = logging.getLogger("sftjax")


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture alone (config.json or the preset), without loading weights."""
    path = cfg.model.path
    return load_hf_config(path) if Path(path).is_dir() else preset(path)


@dataclasses.dataclass
class Model:
    """What a run trains: the model settings, the frozen and trainable trees, and where they came from.

    full:  frozen = {}, trainable = the whole base.
    lora:  frozen = the base (minus method.lora.trainable_modules), trainable = adapters (+ those modules).
    qlora: as lora, with every decoder linear kernel of the frozen base quantized to 4 bits (`qkernel`).
    `merge_params(frozen, trainable)` is the tree the model runs under `cfg`.
    """

    cfg: ModelConfig  # architecture + runtime policy (+ the linear plug-in of LoRA / QLoRA)
    frozen: Params
    trainable: Params
    fingerprint: str  # of the base weights as loaded (before quantization): resumes check it
    lora: lora_lib.LoraSpec | None  # None for full fine-tuning
    memory: dict[str, float]  # quant.memory_report of the base (bytes per storage format, bits per parameter)


def build_model(cfg: TrainConfig) -> Model:
    """Load the base weights in param_dtype, apply the run's execution policy and split them per method.name."""
    m, method = cfg.model, cfg.method
    model_cfg, params = load_pretrained(m.path, dtype=m.param_dtype, seed=m.seed)
    model_cfg = model_cfg.replace(dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
                                  attention_block=m.attention_block, padding_free=m.padding_free,
                                  dropout_rate=m.dropout)
    base_fingerprint = fingerprint(params)
    memory = quant.memory_report(params)
    if method.name == "full":
        return Model(model_cfg, {}, params, base_fingerprint, None, memory)
    spec = dataclasses.replace(method.lora)  # a copy: the run config stays the run config
    adapters = lora_lib.init_adapters(model_cfg, spec, jax.random.fold_in(jax.random.key(cfg.trainer.seed), 1))
    frozen, trainable = lora_lib.split(params, spec, adapters)
    if method.name == "qlora":
        frozen = quant.quantize_params(frozen, method.quant.kind, method.quant.double_quant)
    return Model(lora_lib.model_config(model_cfg, spec), frozen, trainable, base_fingerprint, spec, memory)


def describe_model(cfg: TrainConfig, model: Model) -> list[str]:
    """Lines for the start of a run: parameter counts and the memory of the frozen base in each format."""
    total, trainable = model.cfg.num_params(), lora_lib.count(model.trainable)
    mem = model.memory
    lines = [f"model {cfg.model.path} ({model.cfg.family}): {total / 1e6:.2f}M parameters; method "
             f"{cfg.method.name}: {trainable / 1e6:.3f}M trainable ({trainable / total:.3%}), optimizer state for "
             "those only"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines.append(f"base weights: float32 {mib(mem['float32_bytes'])}, bfloat16 {mib(mem['bfloat16_bytes'])}, "
                 f"nf4/int4 + double quant {mib(mem['nf4_dq_bytes'])} (its {mem['quantized_params'] / 1e6:.2f}M "
                 f"linear weights at {mem['dq_bits_per_param']:.3f} bits per parameter; "
                 f"{mem['bits_per_param']:.3f} without double quant)")
    if model.frozen:
        lines.append(f"frozen tree as held: {mib(quant.tree_bytes(model.frozen))}"
                     + (f" ({cfg.method.quant.kind}, double_quant={cfg.method.quant.double_quant})"
                        if cfg.method.name == "qlora" else ""))
    return lines


def build_tokenizer(cfg: TrainConfig, model_cfg: ModelConfig) -> Tokenizer:
    """The tokenizer of model.tokenizer (default: the model directory), checked against the model's vocabulary."""
    directory = cfg.model.tokenizer or cfg.model.path
    if not (Path(directory) / "tokenizer.json").is_file():
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        raise ConfigError(f"{key}={directory!r}: no tokenizer.json there (presets have none: set model.tokenizer)")
    tok = load_tokenizer(directory, cfg.data.chat_template)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"model.tokenizer={directory!r}: the tokenizer has {tok.vocab_size} tokens, more than the "
                          f"model's vocab_size={model_cfg.vocab_size}")
    return tok


def _plain(value):
    """A config mapping as plain dicts and lists (templates read them; `tojson` cannot serialize OmegaConf nodes)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)


def _data_config(cfg: TrainConfig, datasets: list[DatasetSpec], per_device_batch: int,
                 num_epochs: int | None, labels: tuple[tuple[str, ...] | None, ...] = ()) -> DataConfig:
    """labels: per dataset, the classes of its head or None; given (eval datasets: the training split's classes),
    they decide head and labels instead of the entries' own. objective=heads with no dataset declaring a head
    gives every dataset one (`sftjax-train objective=heads data=reviews.jsonl`)."""
    every = cfg.objective.get("name") == "heads" and not any(s.head for s in cfg.data.train)
    heads = labels or [tuple(s.labels) if s.head or every else None for s in datasets]
    specs = [dataclasses.replace(s, head=c is not None, labels=c or ()) for s, c in zip(datasets, heads)]
    return DataConfig.from_options(cfg.data, datasets=specs, per_device_batch=per_device_batch, num_epochs=num_epochs,
                                   template_kwargs=_plain(cfg.data.template_kwargs))


def split_holdout(prepared: Prepared, fraction: float, seed: int) -> tuple[Prepared, Prepared]:
    """Hold out ceil(fraction * n) examples of each task (a seeded permutation); both parts keep the task order."""
    train, held = [], []
    for task, (examples, stats) in enumerate(zip(prepared.datasets, prepared.stats)):
        n = len(examples)
        k = math.ceil(fraction * n)
        if k >= n:
            raise ConfigError(f"data.eval_fraction={fraction}: holding out {k} of the {n} examples of "
                              f"{stats.path} leaves nothing to train on")
        order = np.random.default_rng([seed, task]).permutation(n)
        held.append([examples[i] for i in sorted(order[:k])])
        train.append([examples[i] for i in sorted(order[k:])])
    return (dataclasses.replace(prepared, datasets=train), dataclasses.replace(prepared, datasets=held))


def build_data(cfg: TrainConfig, tokenizer: Tokenizer, devices: int) -> tuple[Prepared, Prepared | None]:
    """(train data, streamed without end; eval data: every example once, or None). Batches are [devices, b, T].

    devices: local devices of this process; every process of a multi-host run gets its own rows.
    """
    per_device = cfg.trainer.batch_size // (devices * jax.process_count())
    train = prepare(_data_config(cfg, cfg.data.train, per_device, num_epochs=None), tokenizer)
    names = [s.name for s in train.stats]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"data.train[{i}]: task name {name!r} is taken by data.train[{names.index(name)}] "
                              f"(names default to the file stem): set data.train[{i}].name")
    if cfg.data.eval:
        if len(cfg.data.eval) != len(cfg.data.train):
            raise ConfigError(f"data.eval: {len(cfg.data.eval)} datasets for {len(cfg.data.train)} training tasks; "
                              "give one held-out dataset per training dataset, in the same order")
        eval_config = _data_config(cfg, cfg.data.eval, per_device, num_epochs=1, labels=train.labels)
        held = prepare(eval_config, tokenizer)
        for stats, name in zip(held.stats, names):  # data.eval[i] is task i: its metrics carry the task's name
            stats.name = name
        return train, one_pass(held)
    if cfg.data.eval_fraction > 0:
        train, held = split_holdout(train, cfg.data.eval_fraction, cfg.data.seed)
        return train, one_pass(held)
    return train, None


def build_prompts(cfg: TrainConfig, tokenizer: Tokenizer, max_new_tokens: int):
    """(train prompts per task, held-out prompts or None, [PromptStats]) of an RL run: the prompt side of data.train /
    data.eval (or data.eval_fraction of each training dataset, held out by a seeded permutation), each prompt
    fitted to data.seq_len - max_new_tokens tokens by data.over_long."""
    from sftjax.data.prompts import read_prompts

    budget = cfg.data.seq_len - max_new_tokens
    if budget < 1:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: leaves no room for a prompt before "
                          f"objective.max_new_tokens={max_new_tokens} new tokens")
    names = task_names(cfg)

    def read(sections):
        out, stats = [], []
        for i, (s, name) in enumerate(zip(sections, names)):
            prompts, st = read_prompts(s.path, i, name, tokenizer, budget, cfg.data.over_long, s.format, s.as_chat,
                                       _plain(cfg.data.template_kwargs))
            out.append(prompts)
            stats.append(st)
        return out, stats

    train, stats = read(cfg.data.train)
    held = None
    if cfg.data.eval:
        if len(cfg.data.eval) != len(cfg.data.train):
            raise ConfigError(f"data.eval: {len(cfg.data.eval)} datasets for {len(cfg.data.train)} training tasks; "
                              "give one held-out dataset per training dataset, in the same order")
        held = [p for task in read(cfg.data.eval)[0] for p in task]
    elif cfg.data.eval_fraction > 0:
        kept, held = [], []
        for task, prompts in enumerate(train):
            k = math.ceil(cfg.data.eval_fraction * len(prompts))
            if k >= len(prompts):
                raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction}: holding out {k} of the "
                                  f"{len(prompts)} prompts of {stats[task].path} leaves nothing to train on")
            order = np.random.default_rng([cfg.data.seed, task]).permutation(len(prompts))
            held += [prompts[i] for i in sorted(order[:k])]
            kept.append([prompts[i] for i in sorted(order[k:])])
            stats[task].kept = len(kept[-1])
        train = kept
    return train, held, stats


def task_names(cfg: TrainConfig) -> tuple[str, ...]:
    """The tasks of data.train in order: their names, or file stems (as the pipeline names them)."""
    return tuple(s.name or Path(s.path).stem for s in cfg.data.train)


def build_objective(cfg: TrainConfig, model_cfg: ModelConfig,
                    labels: tuple[tuple[str, ...] | None, ...] = ()) -> objectives.Objective:
    """The run's objective (cfg.objective) for the policy `model_cfg` and the tasks of data.train.

    labels: the classes of each task's head (None: no head), as the data collected them; default: from the config
    (data.train[i].labels of tasks with head=true, filled in by the run that collected them).
    """
    labels = labels or tuple(tuple(s.labels) if s.head else None for s in cfg.data.train)
    return objectives.build(cfg.objective, objectives.Context(model_cfg, task_names(cfg), labels))


def check_data(objective: objectives.Objective, data: Prepared) -> None:
    """Refuse preference pairs given to an objective that trains on text, and text given to one of pairs."""
    path = data.stats[0].path
    if objective.pairs and not data.pairs:
        raise ConfigError(f"data.train[0]={path!r}: objective={objective.name} trains on preference pairs ('prompt', "
                          "'chosen', 'rejected' records); this dataset holds none")
    if data.pairs and not objective.pairs:
        raise ConfigError(f"data.train[0]={path!r}: preference pairs ('chosen' / 'rejected') given to objective="
                          f"{objective.name}: train them with objective=dpo or objective=reward")


def build_references(cfg: TrainConfig, model: Model, objective: objectives.Objective, tokenizer: Tokenizer,
                     splits: list[Prepared | None]):
    """(objective bound to its references, {name: params} for the step, {name: fingerprint}, splits).

    References named by path are loaded (checked to share the tokenizer); those equal to the starting policy
    (`policy_references`) are the model's initial trainable tree without adapters. An objective that precomputes
    its reference (DPO, precompute_reference=true) gets each split's pairs scored once here and no reference
    weights in the step. A reference's fingerprint is checked on resume; the starting policy's is the base's.
    """
    from sftjax.train.references import load_references, policy_reference, precompute_logps

    references = load_references(objective.references(), cfg.model, tokenizer)
    objective = objective.bind({name: r.cfg for name, r in references.items()})
    refs = {name: r.params for name, r in references.items()}
    refs.update({name: policy_reference(model.trainable) for name in objective.policy_references()})
    for name in objective.policy_references():
        held = quant.tree_bytes(refs[name]) / 2**20
        log.info("objective.%s: the starting policy%s", name, f" (a frozen copy, {held:.1f} MiB)" if model.lora is None
                 else f": the frozen base with the adapters off (+ {held:.1f} MiB of fully trained modules' originals)")
    if getattr(objective, "precomputes_reference", False):
        start = merge_params(model.frozen, model.trainable)
        splits = [None if s is None else precompute_logps(objective, start, refs, s) for s in splits]
        refs = {}
        log.info("reference log-probabilities precomputed for %s pairs: no reference in the step",
                 " + ".join(str(sum(map(len, s.datasets))) for s in splits if s is not None))
    return objective, refs, {name: r.fingerprint for name, r in references.items()}, splits


def with_labels(config: dict, labels: tuple[tuple[str, ...] | None, ...]) -> dict:
    """The resolved config with each head task marked (data.train[i].head) and the classes it collected written
    into data.train[i].labels, so that its config.json alone rebuilds the heads (sftjax-eval, sftjax-export, a
    teacher run)."""
    if not any(labels):
        return config
    train = [dict(section, head=True, labels=list(classes)) if classes else section
             for section, classes in zip(config["data"]["train"], labels)]
    return {**config, "data": {**config["data"], "train": train}}


def run_trainable(model: Model, objective: objectives.Objective, seed: int) -> Params:
    """What a run trains: the model's trainable tree plus the objective's own parameters (task heads)."""
    extra = objective.init(jax.random.fold_in(jax.random.key(seed), 2))
    return {**model.trainable, **extra}


def merged_params(model: Model, trainable: Params, requantize: bool = False) -> tuple[Params, dict[str, float]]:
    """A run's weights as one plain float tree: adapters folded into the base (a 4-bit base dequantized first;
    requantize: the merged weights rounded to its code), the objective's own parameters (heads) left out. Returns
    (params, re-quantization error per merged weight; {} for full fine-tuning)."""
    params = merge_params(model.frozen, {k: v for k, v in trainable.items() if k != "heads"})
    if model.lora is None:
        return params, {}
    params, errors = lora_lib.merge(params, model.lora.scale, requantize=requantize)
    return quant.dequantize_params(params), errors


def restore_checkpoint(cfg: TrainConfig, directory: Path, model: Model, step: int | None = None,
                       best: bool = False) -> tuple[Params, int]:
    """(trainable, step) of a run's checkpoint: `step`, the best by trainer.best_metric, or the latest. trainable
    holds the objective's own parameters too (under their key, e.g. "heads").

    The checkpoint must have been trained on the base `model` holds (fingerprint check). Opened read-only: a
    training may still be writing there, and its save in progress is never cleaned up.
    """
    t = cfg.trainer
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint directory (the run saved nothing yet)")
    optimizer = make_optimizer(cfg.optim, t.max_steps)
    trainable = jax.eval_shape(lambda: run_trainable(model, build_objective(cfg, model.cfg), t.seed))
    abstract = jax.eval_shape(lambda: init_state(trainable, optimizer, t.seed))  # the loop's train state
    with Checkpointer(directory, read_only=True, keep_last=max(t.keep_last, 1), keep_best=1,
                      best_metric=t.best_metric, best_mode=t.best_mode) as checkpointer:
        chosen = checkpointer.best_step() if best else step
        if chosen is None and best:
            raise CheckpointError(f"{directory}: no checkpoint ranked by {t.best_metric} (did the run evaluate?); "
                                  "use --step N or the latest")
        chosen = checkpointer.latest_step() if chosen is None else chosen
        if chosen is None:
            raise CheckpointError(f"{directory}: no checkpoint to restore")
        state, extras = checkpointer.restore(abstract, chosen)
    check_base(extras, model.fingerprint)
    return state["trainable"], chosen
