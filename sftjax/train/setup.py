"""From a TrainConfig to the objects a run needs: model, tokenizer, train / eval data.

Each builder checks what only it can check (the tokenizer fits the model's vocabulary, the eval split is not
empty) and raises a one-line UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from sftjax.config import DatasetSection, TrainConfig
from sftjax.data.pipeline import DataConfig, DatasetSpec, Prepared, prepare
from sftjax.data.tokenizer import Tokenizer, load_tokenizer
from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig, load_hf_config, preset
from sftjax.model.hf import load_pretrained
from sftjax.model.transformer import Params
from sftjax.train.evaluate import one_pass


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture alone (config.json or the preset), without loading weights."""
    path = cfg.model.path
    return load_hf_config(path) if Path(path).is_dir() else preset(path)


def build_model(cfg: TrainConfig) -> tuple[ModelConfig, Params]:
    """Load the base weights in param_dtype and apply the run's execution policy."""
    m = cfg.model
    model_cfg, params = load_pretrained(m.path, dtype=m.param_dtype, seed=m.seed)
    return model_cfg.replace(dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat, dropout_rate=m.dropout), params


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


def _data_config(cfg: TrainConfig, datasets: list[DatasetSection], per_device_batch: int,
                 num_epochs: int | None) -> DataConfig:
    d = cfg.data
    specs = [DatasetSpec(s.path, s.weight, s.format, s.name, s.as_chat) for s in datasets]
    return DataConfig(datasets=specs, seq_len=d.seq_len, mask=d.mask, append_eos=d.append_eos,
                      over_long=d.over_long, packing=d.packing, pack_window=d.pack_window,
                      per_device_batch=per_device_batch, seed=d.seed, num_epochs=num_epochs,
                      chat_template=d.chat_template)


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
        return train, one_pass(prepare(_data_config(cfg, cfg.data.eval, per_device, num_epochs=1), tokenizer))
    if cfg.data.eval_fraction > 0:
        train, held = split_holdout(train, cfg.data.eval_fraction, cfg.data.seed)
        return train, one_pass(held)
    return train, None
