"""The objective seam: what the train step, evaluation and the report ask of a training objective.

An objective is one file `sftjax/objectives/<name>.py` plus one config `conf/objective/<name>.yaml`. The file
defines

    Settings            a dataclass: the keys of its config (`objective.<key>=...` on the command line)
    make(settings, context) -> Objective

and the `Objective` (a subclass of the class below) says

    references()        frozen models it needs besides the policy: {"teacher": path}; loaded by the trainer
                        (`train/references.py`), replicated once, never donated, never checkpointed, fingerprinted
    policy_references() names of references that are the policy as it starts (DPO's reference policy): the trainer
                        gives them the initial trainable tree without adapters (the whole model under full
                        fine-tuning; under LoRA only the originals of modules trained beside the adapters, since
                        the frozen base with the adapters off is the rest)
    bind(configs)       the objective given the loaded references' architectures ({"teacher": ModelConfig}):
                        where it checks that they fit the policy (same vocabulary)
    init(rng)           extra trainable parameters ({"heads": ...}; {} for SFT), saved with the adapters / weights
    prepare(batch)      host side, per batch: extra keys it needs (SFT: `label_index`); batch arrays [..., b, T]
    totals(batch)       counts that depend on the batch only (pairs, chosen tokens), summed over the micro-batches
                        and devices of a step before any sums: `sums` finds them in batch["totals"], for a term that
                        is a mean over something other than the weight (ORPO's NLL per chosen token)
    sums(params, refs, batch, rng)
                        sums over one micro-batch [b, T]: always "loss" (a sum) and "weight" (what the loss is a
                        sum over: trained tokens, examples, pairs); anything else it wants to report
    metrics(sums)       means after the sums are added over micro-batches, devices and (in evaluation) batches

The train step differentiates sums["loss"], psums everything and divides once by the global sums["weight"], so a
step's loss is the mean over everything it trained on, whatever the device count and accumulation. `metrics` runs
in the compiled step (jax arrays) and on the host over float64 evaluation totals (numpy arrays); `ratio` serves
both. A metric that has nothing to average (a task absent from a batch) is NaN and left out of evaluations.

The batch is an open dict: the pipeline's rows (tokens, targets, loss_mask, segment_ids, positions, task_ids; see
`data/packing.py`) plus what `prepare` adds.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig

Params = dict[str, Any]
Batch = dict[str, Any]
_NOT_OBJECTIVES = ("base", "pairs", "rl")  # modules of this package that are not objectives


@dataclasses.dataclass(frozen=True)
class Context:
    """What an objective may depend on besides its settings: the policy's architecture and the run's tasks."""

    model: ModelConfig  # the policy (as trained: LoRA scale and dropout included)
    tasks: tuple[str, ...]  # task names: the datasets of the mixture, in order (task id = index)
    labels: tuple[tuple[str, ...] | None, ...] = ()  # per task: the classes of its head, or None (an LM task)

    @property
    def heads(self) -> dict[str, tuple[str, ...]]:
        """task -> classes, for the tasks with a classification head."""
        labels = self.labels or (None,) * len(self.tasks)
        return {t: c for t, c in zip(self.tasks, labels) if c is not None}


class Objective:
    """Base class: no references, no extra parameters, no host preparation. Subclasses define sums and metrics."""

    name: str = "objective"
    pairs: bool = False  # trains on preference pairs (data/preference.py) instead of text

    def references(self) -> dict[str, str]:
        return {}

    def policy_references(self) -> tuple[str, ...]:
        return ()

    def totals(self, batch: Batch) -> dict:
        return {}

    def bind(self, configs: dict[str, ModelConfig]) -> Objective:
        return self

    def init(self, rng: jax.Array) -> Params:
        return {}

    def prepare(self, batch: Batch) -> Batch:
        return batch

    def sums(self, params: Params, refs: dict[str, Params], batch: Batch, rng: jax.Array | None) -> dict:
        raise NotImplementedError

    def metrics(self, sums: dict) -> dict:
        raise NotImplementedError


def array_module(*xs):
    """jax.numpy inside the compiled step (jax arrays), numpy on the host (float64 evaluation totals)."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def ratio(num, den):
    """num / den where den > 0, NaN where it is 0. Numpy in: numpy out; jax in: jax out."""
    xp = array_module(num, den)
    return xp.where(den > 0, num / xp.maximum(den, 1e-30), xp.nan)


def flat_positions(selected: np.ndarray, size) -> np.ndarray | None:
    """Flat positions [..., K] of the True entries of each micro-batch's selected [..., B, T], padded with -1.

    size(most) -> K: the slots to compile for, given the largest count of any micro-batch (the same K for all of
    them: one shape); None from it: no index (the caller computes every position)."""
    *lead, B, T = selected.shape
    flat = selected.reshape(-1, B * T)
    K = size(int(flat.sum(axis=1).max(initial=0)))
    if K is None:
        return None
    out = np.full((flat.shape[0], K), -1, np.int32)
    for i, row in enumerate(flat):
        where = np.flatnonzero(row)
        out[i, :len(where)] = where
    return out.reshape(*lead, K)


def per_task(name: str, values, tasks: tuple[str, ...]) -> dict:
    """{"<task>/<name>": values[t]} for a per-task vector [num_tasks]."""
    return {f"{task}/{name}": values[t] for t, task in enumerate(tasks)}


# ----------------------------------------------------------------------------------------------------------------
# Finding objectives and their settings


def available() -> list[str]:
    """Names of the objectives this package ships (its modules other than this one)."""
    import sftjax.objectives as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name not in _NOT_OBJECTIVES)


def module(name: str):
    """The module of objective `name`. An unknown name: one line listing the known ones."""
    if not isinstance(name, str) or name not in available():
        raise ConfigError(f"objective.name={name!r}: unknown objective (known: {', '.join(available())})")
    return importlib.import_module(f"sftjax.objectives.{name}")


def _typed(key: str, value: Any, kind: Any) -> Any:
    """value checked (and int -> float widened) against a Settings field's annotation."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    if kind is Any or (isinstance(kind, type) and isinstance(value, kind) and not
                       (kind is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}={value!r}: expected {getattr(kind, '__name__', kind)}")


def settings(section: dict[str, Any]):
    """(module, its Settings) from the `objective` config section; unknown keys and wrong types: one line."""
    section = dict(section)
    mod = module(section.pop("name", "sft"))
    fields = {f.name: f for f in dataclasses.fields(mod.Settings)}
    hints = typing.get_type_hints(mod.Settings)
    values = {}
    for key, value in section.items():
        if key not in fields:
            raise ConfigError(f"objective.{key}: not a setting of objective {mod.NAME} "
                              f"(its settings: {', '.join(fields) or 'none'})")
        values[key] = _typed(f"objective.{key}", value, hints[key])
    try:
        return mod, mod.Settings(**values)
    except TypeError as e:  # a setting without a default left out
        raise ConfigError(f"objective ({mod.NAME}): {e}") from None


def build(section: dict[str, Any], context: Context) -> Objective:
    """The run's objective from its config section (`objective.name` and its settings)."""
    mod, values = settings(section)
    return mod.make(values, context)
