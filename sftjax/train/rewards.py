"""The rewards of RL runs: `objective.rewards` names one or more, `objective.reward_weights` weighs them.

    exact_match        1.0 when the completion, stripped of surrounding whitespace, equals the prompt's answer
                       (stripped), else 0.0: the verifiable reward of the built-in tasks
    module:function    a Python function, imported (the working directory is on the path), called once per
                       completion as function(prompt, completion, **keywords) -> float; the keywords are `answer`
                       and the record's other keys, those the function names (all of them with **kwargs)
    a directory        a reward model (`sftjax.load_reward_model`: an sftjax reward run, its export, or any
                       transformers sequence-classification directory with one label) scoring prompt + completion

The reward of a completion is sum_i weight_i reward_i. A function that raises or returns something other than a
finite number stops the run with one line naming it and the prompt's file:line.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sftjax.data.prompts import Prompt
from sftjax.data.tokenizer import Tokenizer
from sftjax.errors import ConfigError, UserError

EXACT_MATCH = "exact_match"


class RewardError(UserError):
    """A reward function raised, or returned a value that is not a finite number."""


def exact_match(prompt: Any, completion: str, answer: str | None = None) -> float:
    return float(answer is not None and completion.strip() == answer.strip())


def _import(key: str, spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing the user's module is reported the same way
        raise ConfigError(f"{key}={spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _keywords(fn: Callable) -> Callable[[dict], dict]:
    """What to pass a function of the keyword arguments offered: those it names, or all with **kwargs."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return lambda offered: {}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return lambda offered: offered
    names = set(list(params)[2:])  # after (prompt, completion)
    return lambda offered: {k: v for k, v in offered.items() if k in names}


@dataclasses.dataclass
class Reward:
    name: str  # in metrics: exact_match, the function's name, the reward model directory's name
    score: Callable[[list[Prompt], list[str]], np.ndarray]  # -> [N] float


def _function_reward(key: str, spec: str, fn: Callable) -> Reward:
    pick = _keywords(fn)

    def score(prompts: list[Prompt], completions: list[str]) -> np.ndarray:
        out = np.zeros(len(completions), np.float64)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                value = fn(p.prompt, c, **pick({"answer": p.answer, **p.fields}))
            except Exception as e:  # noqa: BLE001 - the user's function: report any exception in one line
                raise RewardError(f"{key}={spec!r} raised {type(e).__name__}: {e} (on a completion of {p.where})"
                                  ) from None
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise RewardError(f"{key}={spec!r} returned {value!r} for a completion of {p.where}: a reward must "
                                  "be a finite number")
            out[i] = float(value)
        return out

    return Reward(spec.rpartition(':')[2], score)


def _model_reward(key: str, spec: str, tokenizer: Tokenizer) -> Reward:
    from sftjax.model.reward_model import load_reward_model

    model = load_reward_model(spec)
    theirs = model.tokenizer.backend.get_vocab(with_added_tokens=True)
    if theirs != tokenizer.backend.get_vocab(with_added_tokens=True):
        raise ConfigError(f"{key}={spec!r}: the reward model's tokenizer ({len(theirs)} tokens) is not the policy's "
                          f"({tokenizer.vocab_size} tokens): train the reward model on the policy's tokenizer")

    def score(prompts: list[Prompt], completions: list[str]) -> np.ndarray:
        return model.score([p.prompt for p in prompts], completions).astype(np.float64)

    return Reward(Path(spec).name, score)


@dataclasses.dataclass
class Rewards:
    """The run's rewards and their weights: `rewards(prompts, completions)` -> (total [N], {name: [N]}, seconds)."""

    parts: list[Reward]
    weights: tuple[float, ...]

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        each = {r.name: r.score(prompts, completions) for r in self.parts}
        total = sum(w * v for w, v in zip(self.weights, each.values()))
        return np.asarray(total, np.float64), each

    def timed(self, prompts, completions) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
        start = time.perf_counter()
        total, each = self(prompts, completions)
        return total, each, time.perf_counter() - start


def build_rewards(names: tuple[str, ...], weights: tuple[float, ...], tokenizer: Tokenizer,
                  prompts: list[Prompt]) -> Rewards:
    """The rewards `objective.rewards` names (see the module docstring), checked: an exact_match reward needs every
    prompt to have an answer."""
    parts = []
    for i, spec in enumerate(names):
        key = f"objective.rewards[{i}]"
        if spec == EXACT_MATCH:
            missing = next((p for p in prompts if p.answer is None), None)
            if missing is not None:
                raise ConfigError(f"{key}=exact_match: {missing.where} has no answer to match (an 'answer' key, "
                                  "or a completion)")
            parts.append(_function_reward(key, spec, exact_match))
        elif Path(spec).is_dir():
            parts.append(_model_reward(key, spec, tokenizer))
        elif ":" in spec:
            parts.append(_function_reward(key, spec, _import(key, spec)))
        else:
            raise ConfigError(f"{key}={spec!r}: not exact_match, a module:function, nor a reward model directory")
        if parts[-1].name in [r.name for r in parts[:-1]]:
            parts[-1].name = f"{parts[-1].name}_{i}"
    return Rewards(parts, weights)
