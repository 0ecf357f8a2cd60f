"""The data pipeline from config to batches: read -> tokenize + mask -> fit length -> mix -> pack -> shard.

The settings are the run config's own dataclasses (sftjax.config registers them with Hydra): `DatasetSpec` is an
entry of data.train / data.eval, `DataOptions` the rest of data.*, and `DataConfig` adds what this module needs
beyond them (the datasets of one split, the batch, the epochs).

`prepare(config, tokenizer)` reads and tokenizes every dataset once (SFT datasets fit in host memory; lengths are
needed for packing anyway) and counts what was dropped or truncated. `DataIterator` then streams batches:

    batch[key]: [devices, per_device_batch, seq_len] numpy arrays for key in
    tokens, targets, loss_mask (float32), segment_ids (0 = padding), positions, task_ids (-1 = padding),
    class_ids (int32: a head example's class index at its last token, -1 elsewhere)

ready for `jax.pmap` (see `packing.py` for the row layout). The stream is the mixture order of `mixture.py` cut
into windows of `pack_window` examples, each window packed on its own (deterministically). Best-fit decreasing
fills rows longest first, so its rows come out sorted by example length, which in a task mixture means by task;
they are shuffled (seeded by seed, epoch and window) so that a batch of consecutive rows mixes lengths and tasks
instead of holding one task at a time. Greedy rows keep the stream order (pre-training text).
The iterator state is {"epoch", "position" (window start in the epoch's order), "row" (rows of that window already
emitted), "seed", "fingerprint"}: small, JSON-serializable, and enough to rebuild the exact stream, since rows do
not depend on the batch size or the number of devices.

Classification heads: a dataset with `head=True` is not trained as text. Each example is its prompt (nothing in
loss_mask) and its class, whose index sits in class_ids at the example's last token. The classes are the
dataset's `labels` when given (a record outside them is an error), else the sorted set of its records' labels;
`Prepared.labels` holds them per task (None for an LM task), in class-index order.

Preference pairs: a dataset of `preference` records (formats.py) is tokenized by `data/preference.py`; each pair
is one unit of packing (its two sequences in one row) and rows carry the pair keys of `packing.py`. The datasets
of a run are all pairs or all not (`Prepared.pairs`): an objective trains on one or the other.

Multi-host: every process computes the same global stream (so all agree on the number of batches and share one
state) and keeps its own slice of each global batch of process_count * devices * per_device_batch rows. A final
partial batch is completed with all-padding rows (nothing trained), so no example is skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from sftjax.data.chat_spans import RULES
from sftjax.data.errors import DataError
from sftjax.data.formats import FORMATS, Example, Pair, read_dataset
from sftjax.data.masking import MASK_MODES, Tokenized, tokenize_examples
from sftjax.data.mixture import epoch_order
from sftjax.data.packing import OVER_LONG, PACKING, build_rows, empty_rows, fit_length, pack_bins
from sftjax.data.preference import tokenize_pairs
from sftjax.data.tokenizer import Tokenizer
from sftjax.errors import ConfigError

_STATE_VERSION = 2  # 2: rows of a best-fit-decreasing window are shuffled
_ROW_TAG = 3  # seeds of the row shuffle of a packed window (mixture.py uses tags 1 and 2)


@dataclasses.dataclass
class DatasetSpec:
    """One dataset of a run: an entry of data.train / data.eval in the run config, and of DataConfig.datasets."""

    path: str = "???"  # local .jsonl / .json file (required: "???" is Hydra's missing value)
    weight: float | None = None  # mixture weight (None for every dataset: proportional to size)
    format: str = "auto"  # auto | chat | prompt_completion | alpaca | text | preference (formats.FORMATS)
    name: str | None = None  # task name in metrics (default: the file stem); the task id is the list index
    as_chat: bool = False  # render prompt/completion and Alpaca records through the chat template
    prompt_noise: float = 0.0  # augmentation: share of prompt tokens replaced at random in every batch drawn
    # (by the pipeline's augmentation step after the iterator, data/augment.py; `prepare` ignores it)
    head: bool = False  # a classification head for this task (objective=heads): label from `label` or the completion
    labels: tuple[str, ...] = ()  # the head's classes in order ((): collected from the train split)

    def __post_init__(self) -> None:
        if isinstance(self.labels, list):  # Hydra hands lists
            self.labels = tuple(self.labels)

    def check(self, key: str) -> None:
        """ConfigError, one line naming `key`.<field> (e.g. data.train[0].format), on an impossible value."""
        if self.path in ("", "???"):
            raise ConfigError(f"{key}.path: not set (a local .jsonl or .json file)")
        if self.format != "auto" and self.format not in FORMATS:
            raise ConfigError(f"{key}.format={self.format!r}: must be auto or one of {', '.join(FORMATS)}")
        if self.weight is not None and not self.weight >= 0:
            raise ConfigError(f"{key}.weight={self.weight!r}: must be >= 0 (or null for every dataset)")
        if not 0.0 <= self.prompt_noise < 1.0:
            raise ConfigError(f"{key}.prompt_noise={self.prompt_noise!r}: must be in [0, 1)")


@dataclasses.dataclass
class DataOptions:
    """How every dataset of a run becomes rows: data.* in the run config (beside data.train / data.eval)."""

    seq_len: int = 512  # T: tokens per packed row
    mask: str = "completion"  # completion | last_turn | all: which tokens are trained
    mask_rule: str = "auto"  # how chat masks are found: auto | tags | per_turn | search (data/chat_spans.py)
    append_eos: bool = True  # append EOS (trained) where the text does not end its own turn
    over_long: str = "truncate"  # truncate (keep the completion) | drop | error
    packing: str = "bfd"  # bfd | greedy | none (one example per row, padded)
    pack_window: int = 1024  # examples packed together (a larger window packs tighter, shuffles less)
    chat_template: str | None = None  # override the tokenizer's template: built-in name or .jinja path
    template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # chat-template variables
    seed: int = 0  # shuffling seed (also decides the held-out split)

    def check(self, key: str = "data") -> None:
        """ConfigError, one line naming `key`.<field>, on an impossible value."""
        if self.seq_len < 2:
            raise ConfigError(f"{key}.seq_len={self.seq_len!r}: must be >= 2 (one input, one target)")
        for name, allowed in (("mask", MASK_MODES), ("mask_rule", RULES), ("over_long", OVER_LONG),
                              ("packing", PACKING)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{key}.{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if self.pack_window < 1:
            raise ConfigError(f"{key}.pack_window={self.pack_window!r}: must be >= 1")


@dataclasses.dataclass
class DataConfig(DataOptions):
    """What `prepare` and `DataIterator` read: the datasets, the options, and how batches are drawn."""

    datasets: list[DatasetSpec] = dataclasses.field(default_factory=list)  # one task each, in task-id order
    per_device_batch: int = 8  # rows per device per step
    num_epochs: int | None = 1  # mixture epochs; None: endless

    @classmethod
    def from_options(cls, options: DataOptions, **rest: Any) -> DataConfig:
        """The DataOptions fields of `options` (e.g. the run config's data section) plus `rest` (datasets, ...)."""
        return cls(**{**{f.name: getattr(options, f.name) for f in dataclasses.fields(DataOptions)}, **rest})

    def check(self, key: str = "data") -> None:
        """DataOptions.check, then the datasets (each entry; weights for all or none) and the batch."""
        super().check(key)
        if not self.datasets:
            raise ConfigError(f"{key}.datasets: no dataset given")
        for i, spec in enumerate(self.datasets):
            spec.check(f"{key}.datasets[{i}]")
        if len({d.weight is None for d in self.datasets}) > 1:
            raise ConfigError(f"{key}.datasets[*].weight: give a weight for every dataset or for none")
        if self.per_device_batch < 1:
            raise ConfigError(f"{key}.per_device_batch={self.per_device_batch!r}: must be >= 1")


@dataclasses.dataclass
class DatasetStats:
    name: str
    path: str
    records: int = 0
    kept: int = 0
    dropped_empty_mask: int = 0  # nothing to train (no assistant turn, empty completion without EOS)
    dropped_too_long: int = 0  # over seq_len with over_long=drop
    truncated: int = 0
    tokens: int = 0  # after truncation, kept examples
    trained_tokens: int = 0
    head_examples: int = 0  # kept examples with a class label (a head task: all of them)
    dropped_identical: int = 0  # preference pairs whose chosen and rejected are the same tokens
    mask_rules: dict[str, int] = dataclasses.field(default_factory=dict)  # chats per mask rule (chat_spans.py)


@dataclasses.dataclass(eq=False)
class Prepared:
    config: DataConfig
    datasets: list[list[Tokenized]]  # per task, kept examples in file order
    stats: list[DatasetStats]
    pad_id: int
    labels: tuple[tuple[str, ...] | None, ...] = ()  # per task: the classes of its head, or None (an LM task)
    pairs: bool = False  # every dataset holds preference pairs (each example: a pair, `Tokenized.split` > 0)


def _tokenize(spec: DatasetSpec, config: DataConfig, tokenizer: Tokenizer, examples: list, st: DatasetStats
              ) -> list[Tokenized]:
    """Tokenized examples (pairs: identical ones dropped and counted)."""
    if examples and isinstance(examples[0], Pair):
        tokenized = tokenize_pairs(examples, tokenizer, config.append_eos, config.template_kwargs)
        st.dropped_identical = sum(t is None for t in tokenized)
        return [t for t in tokenized if t is not None]
    tokenized = tokenize_examples(examples, tokenizer, config.mask, config.append_eos, config.template_kwargs,
                                  config.mask_rule)
    st.mask_rules = dict(collections.Counter(t.rule for t in tokenized if t.rule))
    return tokenized


def _classes(spec: DatasetSpec, name: str, examples: list[Example]) -> tuple[str, ...]:
    """The classes of a head dataset: spec.labels (every record's label must be one), else its sorted labels."""
    classes = tuple(spec.labels) or tuple(sorted({ex.label for ex in examples}))
    if len(set(classes)) != len(classes):
        raise DataError(f"{spec.path}: labels {list(classes)} name a class twice")
    if len(classes) < 2:
        raise DataError(f"{spec.path}: a head dataset needs at least 2 classes, got {len(classes)} "
                        f"({', '.join(classes)})")
    known = set(classes)
    for ex in examples:
        if ex.label not in known:
            raise DataError(f"{ex.where}: label {ex.label!r} is not one of the classes of {name}: "
                            f"{', '.join(classes)}")
    return classes


def prepare(config: DataConfig, tokenizer: Tokenizer) -> Prepared:
    """Read, validate, tokenize, mask and fit every dataset. Raises ConfigError on an impossible setting (before
    reading anything), DataError on bad input or no trainable token.

    Head datasets keep every example that fits (nothing is trained as text) with its class index set.
    """
    config.check()
    tokenizer = tokenizer.with_chat_template(config.chat_template)
    datasets, stats, labels, kinds = [], [], [], []
    for spec in config.datasets:
        st = DatasetStats(spec.name or Path(spec.path).stem, spec.path)
        examples = read_dataset(spec.path, spec.format, spec.as_chat, spec.head)
        st.records = len(examples)
        kinds.append(isinstance(examples[0], Pair))
        if kinds[-1] != kinds[0]:
            raise DataError(f"{spec.path}: {'preference pairs' if kinds[-1] else 'not preference pairs'}, unlike "
                            f"{config.datasets[0].path}: the datasets of a run are all preference pairs (objective="
                            "dpo or reward) or none")
        classes = _classes(spec, st.name, examples) if spec.head else None
        tokenized = _tokenize(spec, config, tokenizer, examples, st)
        if classes is not None:
            index = {c: i for i, c in enumerate(classes)}
            tokenized = [dataclasses.replace(t, label=index[e.label]) for t, e in zip(tokenized, examples)]
        kept = []
        for ex in tokenized:
            if ex.num_trained == 0 and ex.label < 0:
                st.dropped_empty_mask += 1
                continue
            fitted = fit_length(ex, config.seq_len, config.over_long, tokenizer.bos_id)
            if fitted is None:
                st.dropped_too_long += 1
                continue
            if fitted is not ex:
                st.truncated += 1
                if fitted.num_trained == 0 and fitted.label < 0:
                    st.dropped_empty_mask += 1
                    continue
            kept.append(fitted)
            st.tokens += len(fitted.tokens)
            st.trained_tokens += fitted.num_trained
            st.head_examples += int(fitted.label >= 0)
        if not kept and spec.head:
            raise DataError(f"{spec.path}: no example kept ({st.records} records, {st.dropped_too_long} over "
                            f"seq_len={config.seq_len})")
        if not kept and kinds[-1]:
            raise DataError(f"{spec.path}: no pair kept ({st.records} records: {st.dropped_identical} with chosen = "
                            f"rejected, {st.dropped_too_long} over seq_len={config.seq_len}: prompt + chosen and "
                            "prompt + rejected must fit one row)")
        if not kept:
            raise DataError(f"{spec.path}: no trainable token in the dataset ({st.records} records: "
                            f"{st.dropped_empty_mask} with an empty loss mask, {st.dropped_too_long} over "
                            f"seq_len={config.seq_len})")
        st.kept = len(kept)
        datasets.append(kept)
        stats.append(st)
        labels.append(classes)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return Prepared(config, datasets, stats, pad_id, tuple(labels), pairs=kinds[0])


def fingerprint(prepared: Prepared) -> str:
    """A short hash of everything that decides the row stream except the seed (refuses mismatched resumes)."""
    cfg = prepared.config
    keys = dict(sizes=[len(d) for d in prepared.datasets], tokens=[s.tokens for s in prepared.stats],
                weights=[d.weight for d in cfg.datasets], seq_len=cfg.seq_len, packing=cfg.packing,
                pack_window=cfg.pack_window, mask=cfg.mask, append_eos=cfg.append_eos, over_long=cfg.over_long)
    if cfg.mask_rule != "auto":  # only when set: fingerprints of earlier runs stay as they were
        keys["mask_rule"] = cfg.mask_rule
    if any(c is not None for c in prepared.labels):  # only with heads: LM-only fingerprints stay as they were
        keys["labels"] = [None if c is None else list(c) for c in prepared.labels]
    if prepared.pairs:
        keys["pairs"] = True
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


class DataIterator:
    """Batches [devices, per_device_batch, seq_len] for this process, resumable from `state()`."""

    def __init__(self, prepared: Prepared, devices: int = 1, process_index: int = 0, process_count: int = 1,
                 state: dict[str, Any] | None = None):
        if not 0 <= process_index < process_count or devices < 1:
            raise DataError(f"process_index={process_index}, process_count={process_count}, devices={devices}: "
                            "need 0 <= process_index < process_count and devices >= 1")
        cfg = prepared.config
        self.prepared, self.cfg = prepared, cfg
        self.devices, self.process_index, self.process_count = devices, process_index, process_count
        self._sizes = [len(d) for d in prepared.datasets]
        self._weights = None if cfg.datasets[0].weight is None else [d.weight for d in cfg.datasets]
        self._fingerprint = fingerprint(prepared)
        self.epoch, self.position, self.row = 0, 0, 0
        if state is not None:
            self._restore(state)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._rows_cache: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None
        self.tokens_emitted = 0  # non-padding tokens in emitted rows
        self.slots_emitted = 0  # all token slots in emitted rows (padding rows included)

    def state(self) -> dict[str, Any]:
        """Where the stream stands (JSON-serializable): a new iterator given it continues exactly here."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position, "row": self.row,
                "seed": self.cfg.seed, "fingerprint": self._fingerprint}

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"data iterator state: version {state.get('version')!r}, expected {_STATE_VERSION}")
        if state.get("seed") != self.cfg.seed or state.get("fingerprint") != self._fingerprint:
            raise DataError("data iterator state: saved for other data or settings (seed or fingerprint differ); "
                            "resuming would skip or repeat examples")
        self.epoch, self.position, self.row = int(state["epoch"]), int(state["position"]), int(state["row"])

    @property
    def epoch_size(self) -> int:
        return len(self._order(self.epoch))

    @property
    def efficiency(self) -> float:
        """Fraction of emitted token slots holding real tokens (1.0 = no padding)."""
        return self.tokens_emitted / max(self.slots_emitted, 1)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self._sizes, self._weights, self.cfg.seed, epoch))
        return self._order_cache[1]

    def _window_rows(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        key = (epoch, position)
        if self._rows_cache is None or self._rows_cache[0] != key:
            picks = self._order(epoch)[position:position + self.cfg.pack_window]
            examples = [self.prepared.datasets[t][i] for t, i in picks]
            bins = pack_bins([len(e.tokens) for e in examples], self.cfg.seq_len, self.cfg.packing)
            if self.cfg.packing == "bfd":
                bins = [bins[i] for i in np.random.default_rng([self.cfg.seed, _ROW_TAG, epoch, position])
                        .permutation(len(bins))]
            rows = build_rows(examples, picks[:, 0], bins, self.cfg.seq_len, self.prepared.pad_id,
                              self.prepared.pairs)
            self._rows_cache = (key, rows)
        return self._rows_cache[1]

    def _finished(self) -> bool:
        return self.cfg.num_epochs is not None and self.epoch >= self.cfg.num_epochs

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        per_process = self.devices * self.cfg.per_device_batch
        needed = self.process_count * per_process
        parts = []
        while needed and not self._finished():
            rows = self._window_rows(self.epoch, self.position)
            count = len(rows["tokens"])
            take = min(needed, count - self.row)
            parts.append({k: v[self.row:self.row + take] for k, v in rows.items()})
            self.row += take
            needed -= take
            if self.row == count:
                self.position, self.row = self.position + self.cfg.pack_window, 0
                if self.position >= len(self._order(self.epoch)):
                    self.epoch, self.position = self.epoch + 1, 0
        if not parts:
            raise StopIteration
        if needed:
            parts.append(empty_rows(needed, self.cfg.seq_len, self.prepared.pad_id, self.prepared.pairs))
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.tokens_emitted += int((batch["segment_ids"] > 0).sum())
        self.slots_emitted += batch["segment_ids"].size
        mine = slice(self.process_index * per_process, (self.process_index + 1) * per_process)
        shape = (self.devices, self.cfg.per_device_batch, self.cfg.seq_len)
        return {k: v[mine].reshape(shape) for k, v in batch.items()}
