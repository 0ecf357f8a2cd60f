"""Evaluation of an RL run on held-out prompts: greedy completions, exact match where prompts have answers, and
the run's reward of those completions.

    exact_match, <task>/exact_match    completion (stripped) == answer (stripped), as the SFT evaluation scores
    reward, <task>/reward              the mean reward (`objective.rewards`, weighted) of the greedy completions
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sftjax.data.prompts import Prompt
from sftjax.data.tokenizer import Tokenizer
from sftjax.model.config import ModelConfig
from sftjax.model.generate import generate
from sftjax.model.transformer import Params
from sftjax.train.rewards import Rewards, exact_match
from sftjax.train.rollout import stop_ids, text_of

_BATCH = 16  # prompts decoded together (the last batch filled up with repeats: one compiled shape)


def greedy_completions(cfg: ModelConfig, params: Params, tokenizer: Tokenizer, prompts: list[Prompt],
                       max_new_tokens: int) -> list[str]:
    """The greedy completion text of every prompt (up to its stop token, special tokens left out)."""
    stop = stop_ids(tokenizer, cfg)
    longest = max(len(p.ids) for p in prompts)
    out: list[str] = []
    for start in range(0, len(prompts), _BATCH):
        chunk = prompts[start:start + _BATCH]
        rows = chunk + [chunk[0]] * (_BATCH - len(chunk))
        new = generate(cfg, params, [p.ids for p in rows], max_new_tokens, eos_token_ids=stop,
                       pad_token_id=tokenizer.pad_id, prompt_len=longest)
        out += [text_of(tokenizer, ids, stop) for ids in new[:len(chunk)]]
    return out


def evaluate_prompts(cfg: ModelConfig, params: Params, tokenizer: Tokenizer, prompts: list[Prompt],
                     tasks: list[str], rewards: Rewards | None, max_new_tokens: int, num_samples: int = 0
                     ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, the first num_samples prompts' {where, prompt, generated, answer, reward}) of the greedy
    completions of `prompts`."""
    texts = greedy_completions(cfg, params, tokenizer, prompts, max_new_tokens)
    task = np.array([p.task for p in prompts])
    out: dict[str, float] = {}
    answered = np.array([p.answer is not None for p in prompts])
    hits = np.array([exact_match(p.prompt, t, p.answer) for p, t in zip(prompts, texts)])
    reward = rewards(prompts, texts)[0] if rewards is not None else None
    for t, name in enumerate(tasks):
        here = task == t
        if (here & answered).any():
            out[f"{name}/exact_match"] = float(hits[here & answered].mean())
        if reward is not None and here.any():
            out[f"{name}/reward"] = float(reward[here].mean())
    if answered.any():
        out["exact_match"] = float(hits[answered].mean())
    if reward is not None:
        out["reward"] = float(reward.mean())
    samples = [{"where": p.where, "prompt": tokenizer.decode(p.ids.tolist()), "generated": text, "answer": p.answer,
                **({"reward": float(reward[i])} if reward is not None else {})}
               for i, (p, text) in enumerate(zip(prompts[:num_samples], texts))]
    return out, samples
