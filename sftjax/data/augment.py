"""Data augmentation on packed batches: prompt-token noise, a step of the data pipeline.

    DataIterator (packed rows) -> PromptNoise (this module; only when a dataset sets prompt_noise) -> train step

Each time a batch is drawn, every *prompt* token of a task with rate r > 0 is replaced with probability r by a
token drawn uniformly from the batch's eligible prompt tokens (so from the data's own token distribution: no
vocabulary knowledge needed, no special tokens invented). An example is seen with different noise every epoch,
which makes memorising its exact wording harder (the text analogue of random crops; cf. "word dropout",
Iyyer et al. 2015, and EDA's random replacement, Wei & Zou 2019).

Eligible: token j of an example that is neither its first token (BOS / turn start), nor a trained token
(loss_mask[j - 1] = 1: j is a completion token), nor the token that predicts a trained token (loss_mask[j] = 1:
the cue right before the answer), nor the last token of a head example (class_ids >= 0: the token its
classification head reads). Targets are left as they are: the noised positions' targets are never trained.
Use it only where the answer does not depend on every prompt token (classification of a text, not arithmetic).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def eligible(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Bool [..., T]: the prompt tokens that noise may replace (see the module docstring)."""
    mask = batch["loss_mask"] > 0
    trained_before = np.zeros_like(mask)
    trained_before[..., 1:] = mask[..., :-1]
    ok = (batch["segment_ids"] > 0) & (batch["positions"] > 0) & ~mask & ~trained_before
    return ok & (batch["class_ids"] < 0) if "class_ids" in batch else ok


def prompt_noise(batch: dict[str, np.ndarray], rates: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`batch` with its eligible prompt tokens replaced at the per-task rates [num_tasks] (task_ids index them).

    Returns a new dict (the input arrays are not modified); unchanged when no rate is positive.
    """
    if not np.any(rates > 0):
        return batch
    tokens = batch["tokens"]
    ok = eligible(batch)
    rate = np.where(ok, rates[np.clip(batch["task_ids"], 0, len(rates) - 1)], 0.0)
    hit = rng.random(tokens.shape) < rate
    if not hit.any():
        return batch
    pool = tokens[ok]
    noised = tokens.copy()
    noised[hit] = pool[rng.integers(0, len(pool), int(hit.sum()))]
    return {**batch, "tokens": noised}


class PromptNoise:
    """Batches of a data iterator with `prompt_noise` applied at the per-task rates (task ids index them).

    Each batch's randomness comes from (seed, the iterator's position before the batch, the process index), so the
    stream depends on the iterator state alone and a resumed run draws exactly the noise of the uninterrupted one;
    `state()` is the wrapped iterator's.
    """

    def __init__(self, iterator: Any, rates: Sequence[float], seed: int):
        self.iterator, self.rates, self.seed = iterator, np.asarray(rates, np.float64), seed

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        at = self.iterator.state()
        rng = np.random.default_rng([self.seed, at["epoch"], at["position"], at["row"], self.iterator.process_index])
        return prompt_noise(next(self.iterator), self.rates, rng)

    def state(self) -> dict[str, Any]:
        return self.iterator.state()


def with_prompt_noise(iterator: Any, rates: Sequence[float], seed: int) -> Any:
    """The pipeline's augmentation step: `iterator` itself when no rate is positive, else `PromptNoise`."""
    return PromptNoise(iterator, rates, seed) if any(r > 0 for r in rates) else iterator
