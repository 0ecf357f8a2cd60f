"""RL rollouts inside training: prompts -> sampled completions -> rewards -> rows the train step trains on.

One rollout (iteration k) takes the next N / G prompts of the prompt stream (the datasets of data.train mixed as
the SFT pipeline mixes them, `data/mixture.py`: with their weights, seeded by data.seed), samples G completions of
each with the policy as it is now (the KV-cache sampler of `model/generate.py`, pmapped: each device samples
N / devices rows), scores them (`train/rewards.py`, on the host), and lays each prompt + completion into its own
row of T tokens (the layout of `data/packing.py`: tokens, targets, loss_mask on the completion's tokens,
segment_ids, positions, task_ids). The objective's `score` (compiled, no gradient) adds the reference's and the
sampling policy's per-token log-probabilities (and PPO's values), its `advantages` (host) the rest. The rollout
then feeds `epochs` x `minibatches` optimizer steps, each a [devices, grad_accum, b, T] batch of N / minibatches
rows (rows reshuffled every epoch).

    N = trainer.batch_size x trainer.grad_accum x objective.minibatches      (a multiple of G)
    P = the rollout's longest prompt, rounded up to a power of two >= 16 (at most the longest of all, rounded
        up to 16): few compiled shapes, and a rare long prompt does not lengthen every rollout
    T = P + max_new_tokens, rounded up to 16

Randomness and resume: the sampling key of rollout k on device d is fold_in(fold_in(fold_in(rng, TAG), k), d)
(rng: the train state's), the prompt order depends only on data.seed, and the row order of epoch e on (seed, k, e).
Checkpoints are written only between rollouts, with the stream's position, so a run resumed from any of them
samples, scores and trains exactly what the uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np

from sftjax.data.mixture import epoch_order
from sftjax.data.prompts import Prompt
from sftjax.data.tokenizer import Tokenizer
from sftjax.model.config import ModelConfig
from sftjax.model.generate import left_padded, sample_loop
from sftjax.objectives.rl import RLObjective
from sftjax.train.rewards import Rewards
from sftjax.train.state import merge_params

TAG = 0x5A4D  # fold_in tag of the sampling keys: apart from the dropout keys fold_in(rng, step)
BUCKET = 16  # prompt and row lengths are rounded up to a multiple of this (few compiled shapes)
_STATE_VERSION = 1


def round_up(n: int, k: int = BUCKET) -> int:
    return -(-n // k) * k


def completion_rows(prompts: list[np.ndarray], completions: list[np.ndarray], tasks: list[int], T: int,
                    pad: int) -> dict[str, np.ndarray]:
    """Rows [N, T] of prompt + completion, one per row, right-padded: loss_mask is 1 where targets[t] is a completion
    token (t from len(prompt) - 1), segment id 1 on real tokens."""
    N = len(prompts)
    rows = {"tokens": np.full((N, T), pad, np.int32), "targets": np.full((N, T), pad, np.int32),
            "loss_mask": np.zeros((N, T), np.float32), "segment_ids": np.zeros((N, T), np.int32),
            "positions": np.zeros((N, T), np.int32), "task_ids": np.full((N, T), -1, np.int32)}
    for i, (p, c, task) in enumerate(zip(prompts, completions, tasks)):
        seq = np.concatenate([p, c]).astype(np.int32)
        L = len(seq)
        rows["tokens"][i, :L] = seq
        rows["targets"][i, :L - 1] = seq[1:]
        rows["loss_mask"][i, len(p) - 1:L - 1] = 1.0
        rows["segment_ids"][i, :L] = 1
        rows["positions"][i, :L] = np.arange(L)
        rows["task_ids"][i, :L] = task
    return rows


def _sample(trainable, frozen, tokens, segment_ids, positions, rng, iteration, *, cfg, eos, pad, s):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), TAG), iteration),
                             jax.lax.axis_index("data"))
    return sample_loop(cfg, merge_params(frozen, trainable), tokens, segment_ids, positions, eos, pad, key,
                       max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def _score(trainable, frozen, refs, chunks, *, objective):
    """The objective's per-token rows of every micro-batch chunk [c, b, T], one chunk at a time (memory: one
    micro-batch's activations and logits)."""
    params = merge_params(frozen, trainable)
    return jax.lax.map(lambda chunk: objective.score(params, refs, chunk), chunks)


def stop_ids(tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[int, ...]:
    """The tokens that end a completion: the tokenizer's EOS and the model's (generation_config.json's eos_token_id,
    e.g. an end-of-turn token besides the end-of-text one), as transformers' generate and TRL stop."""
    ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + list(cfg.eos_token_ids)
    return tuple(dict.fromkeys(int(i) for i in ids))


def text_of(tokenizer: Tokenizer, ids, stop: tuple[int, ...]) -> str:
    """A completion's text: up to its first stop token, special tokens left out."""
    ids = list(ids)
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


@dataclasses.dataclass
class Rollouts:
    """The batch source of an RL run (the loop's DataIterator for SFT): `next(state, frozen, refs)`."""

    objective: RLObjective
    model_cfg: ModelConfig  # the policy as trained
    tokenizer: Tokenizer
    prompts: list[list[Prompt]]  # per task (data.train order)
    weights: list[float] | None  # mixture weights (None: proportional to size)
    rewards: Rewards
    devices: int
    batch_size: int  # trainer.batch_size: global rows per micro-batch
    grad_accum: int
    data_seed: int
    seed: int

    def __post_init__(self):
        s = self.objective.settings
        self.rows_per_step = self.batch_size * self.grad_accum
        self.N = self.rows_per_step * s.minibatches
        self.P = round_up(max(len(p.ids) for task in self.prompts for p in task))  # the longest any rollout has
        self.T = round_up(self.P + s.max_new_tokens)
        self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (self.model_cfg.pad_token_id or 0)
        self.stop = stop_ids(self.tokenizer, self.model_cfg)
        self.eos = np.asarray(self.stop or (-1,), np.int32)
        devices = jax.local_devices()[:self.devices]
        self._p_sample = jax.pmap(functools.partial(_sample, cfg=self.model_cfg, eos=self.eos, pad=self.pad, s=s),
                                  axis_name="data", devices=devices, in_axes=(0, 0, 0, 0, 0, 0, None))
        self._p_score = jax.pmap(functools.partial(_score, objective=self.objective), axis_name="data",
                                 devices=devices)
        self.epoch = self.position = self.iteration = 0
        self._epoch_order: tuple[int, np.ndarray] | None = None  # (epoch, its order): computed once per epoch
        self._queue: list[dict[str, np.ndarray]] = []
        self.metrics: dict[str, float] = {}

    # -- the prompt stream ------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        """[E, 2] (task, prompt index) of mixture epoch `epoch`."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            sizes = [len(t) for t in self.prompts]
            self._epoch_order = (epoch, epoch_order(sizes, self.weights, self.data_seed, epoch))
        return self._epoch_order[1]

    def _take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            order = self._order(self.epoch)
            chunk = order[self.position:self.position + n - len(out)]
            out += [self.prompts[task][i] for task, i in chunk]
            self.position += len(chunk)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from the stream position a checkpoint saved (None: from the start)."""
        if state is not None:
            self.epoch, self.position, self.iteration = state["epoch"], state["position"], state["iteration"]

    def state(self) -> dict[str, Any]:
        """Where the stream stands (JSON; valid between rollouts, where checkpoints are written)."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "iteration": self.iteration}

    @property
    def at_boundary(self) -> bool:
        """No rollout half trained: a checkpoint written now resumes exactly."""
        return not self._queue

    # -- one rollout -----------------------------------------------------------------------------------------

    def _by_device(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.devices, -1, *x.shape[1:])

    def _rollout(self, state, frozen, refs) -> None:
        s = self.objective.settings
        G = s.num_generations
        prompts = [p for p in self._take(self.N // G) for _ in range(G)]  # the G samples of a prompt: adjacent
        P = min(self.P, max(BUCKET, 1 << (max(len(p.ids) for p in prompts) - 1).bit_length()))
        T = round_up(P + s.max_new_tokens)
        tokens, segments, positions = left_padded([p.ids for p in prompts], P, self.pad)
        start = time.perf_counter()
        out, lengths = self._p_sample(state["trainable"], frozen, *map(self._by_device, (tokens, segments, positions)),
                                      state["rng"], np.int32(self.iteration))
        out, lengths = np.asarray(out).reshape(self.N, -1), np.asarray(lengths).reshape(-1)
        generated = time.perf_counter()
        completions = [out[i, :lengths[i]] for i in range(self.N)]
        texts = [text_of(self.tokenizer, c, self.stop) for c in completions]
        rewards, each, reward_s = self.rewards.timed(prompts, texts)
        rows = completion_rows([p.ids for p in prompts], completions, [p.task for p in prompts], T, self.pad)
        scoring = time.perf_counter()
        b = self.batch_size // self.devices  # rows of one micro-batch on one device
        chunks = self.objective.prepare({k: v.reshape(self.devices, -1, b, *v.shape[1:]) for k, v in rows.items()})
        scored = self._p_score(state["trainable"], frozen, refs, chunks)
        rows.update({k: np.asarray(v, np.float32).reshape(self.N, T) for k, v in scored.items()})
        rows.update(self.objective.advantages(rows, rewards.astype(np.float32)))
        score_s = time.perf_counter() - scoring
        self._queue = self._minibatches(rows)
        self.metrics = self._rollout_metrics(rewards, each, completions, generated - start, reward_s, score_s)
        self.iteration += 1

    def _minibatches(self, rows: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        s = self.objective.settings
        out = []
        for epoch in range(s.epochs):
            order = np.random.default_rng([self.seed, self.iteration, epoch]).permutation(self.N)
            for m in range(s.minibatches):
                index = order[m * self.rows_per_step:(m + 1) * self.rows_per_step]
                out.append(self.objective.prepare({k: v[index].reshape(self.devices, self.grad_accum, -1, *v.shape[1:])
                                                   for k, v in rows.items()}))
        return out

    def _rollout_metrics(self, rewards, each, completions, generate_s, reward_s, score_s) -> dict[str, float]:
        G = self.objective.settings.num_generations
        groups = rewards.reshape(-1, G)
        group_std = groups.std(axis=1, ddof=1) if G > 1 else np.zeros(len(groups))
        lengths = np.array([len(c) for c in completions])
        eos_ended = np.array([len(c) > 0 and int(c[-1]) in self.stop for c in completions])
        out = {"reward": float(rewards.mean()), "reward_std": float(group_std.mean()),
               "frac_reward_zero_std": float(np.isclose(group_std, 0.0).mean()),
               "completions/mean_length": float(lengths.mean()),
               "completions/clipped_ratio": float(1.0 - eos_ended.mean()),
               "rollout/generate_s": generate_s, "rollout/reward_s": reward_s, "rollout/score_s": score_s,
               "rollout/generated_tokens_per_s": float(lengths.sum() / max(generate_s, 1e-9))}
        out.update({f"rewards/{name}": float(v.mean()) for name, v in each.items()})
        return out

    def next(self, state, frozen, refs, step: int = 0) -> tuple[dict[str, np.ndarray], int]:
        """The next step's batch [devices, grad_accum, b, T] (a new rollout when the last one is used up) and its
        completion-token count."""
        if not self._queue:
            self._rollout(state, frozen, refs)
        batch = self._queue.pop(0)
        return batch, int(batch["loss_mask"].sum())
