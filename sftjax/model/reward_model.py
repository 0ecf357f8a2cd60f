"""A trained reward model that scores text: `sftjax.load_reward_model(path).score(prompts, completions)`.

path is either what `sftjax-export` writes for a reward run (a transformers `<Family>ForSequenceClassification`
directory with num_labels 1 and the tokenizer files) or a transformers sequence-classification directory of
another origin, or an sftjax reward run directory (`objective=reward`: its latest checkpoint, adapters merged).

Scoring tokenizes each (prompt, completion) exactly as reward training does (`data/preference.py`: the prompt alone,
the completion alone, EOS appended unless the completion ends its own turn; a prompt given as a message list is
rendered with the chat template and the completion is the assistant's reply), lays each sequence in its own row
and reads the score head at its last token:

    reward [N] = hidden_states(prompt + completion)[last token] . w        w [D, 1]

Rows are right-padded to a power-of-two length (few compiled shapes) in batches of `batch_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftjax.errors import CheckpointError
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import Params


@dataclasses.dataclass
class RewardModel:
    cfg: ModelConfig
    params: Params  # the trunk (no lm_head)
    kernel: np.ndarray  # [D, 1]
    tokenizer: Any  # sftjax.data.tokenizer.Tokenizer
    append_eos: bool = True
    template_kwargs: dict = dataclasses.field(default_factory=dict)

    def tokens(self, prompt, completion) -> np.ndarray:
        """The token ids [L] of one scored sequence: prompt + completion, as reward training builds it."""
        from sftjax.data.preference import completion_text, encode_sequences

        chat = not isinstance(prompt, str)
        if chat and isinstance(completion, str):
            completion = ({"role": "assistant", "content": completion},)
        text = completion_text(self.tokenizer, prompt, completion, "<score>", self.template_kwargs)
        prompt_ids, completion_ids = encode_sequences(self.tokenizer, [text], [chat], self.append_eos)[0]
        return np.concatenate([prompt_ids, completion_ids])

    def score(self, prompts: Sequence, completions: Sequence, batch_size: int = 16) -> np.ndarray:
        """Rewards [N] (float32) of completions[i] as answers to prompts[i] (strings, or message lists as prompts)."""
        from sftjax.model.classifier import classify

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [self.tokens(p, c) for p, c in zip(prompts, completions)]
        out = np.zeros(len(seqs), np.float32)
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            T = 1 << max(max(len(s) for s in chunk) - 1, 0).bit_length()
            tokens = np.zeros((batch_size, T), np.int32)
            segments = np.zeros((batch_size, T), np.int32)
            for i, s in enumerate(chunk):
                tokens[i, :len(s)], segments[i, :len(s)] = s, 1
            segments[len(chunk):, 0] = 1  # filler rows: one token, scores dropped
            scores = classify(self.cfg, self.params, self.kernel, tokens, segments)
            out[start:start + len(chunk)] = np.asarray(scores, np.float32)[:len(chunk), 0]
        return out


def _from_run(directory: Path, dtype: str) -> RewardModel:
    from sftjax.cli.common import run_config
    from sftjax.objectives.reward import HEAD
    from sftjax.train.setup import build_model, build_tokenizer, merged_params, restore_checkpoint

    cfg = run_config(directory, [])
    model = build_model(cfg)
    trainable, _ = restore_checkpoint(cfg, directory / "checkpoints", model)
    head = trainable.get("heads", {}).get(HEAD)
    if head is None:
        raise CheckpointError(f"{directory}: the run has no reward head (objective={cfg.objective.get('name')}; "
                              "train one with objective=reward)")
    params, _ = merged_params(model, trainable)
    params = {k: v for k, v in params.items() if k != "lm_head"}
    tok = build_tokenizer(cfg, model.cfg).with_chat_template(cfg.data.chat_template)
    return RewardModel(model.cfg.replace(dtype=dtype), params, np.asarray(head["kernel"], np.float32), tok,
                       cfg.data.append_eos)


def load_reward_model(path: str | Path, dtype: str = "float32") -> RewardModel:
    """A reward model from an exported / transformers sequence-classification directory or an sftjax reward run
    (see the module docstring). A classifier with more than one label is refused."""
    from sftjax.data.tokenizer import load_tokenizer
    from sftjax.model.classifier import load_classifier

    directory = Path(path)
    if (directory / "checkpoints").is_dir() and (directory / "config.json").is_file():
        return _from_run(directory, dtype)
    cfg, params, kernel, labels = load_classifier(directory, dtype)
    if kernel.shape[1] != 1:
        raise CheckpointError(f"{directory}: a classifier with {kernel.shape[1]} labels ({', '.join(labels)}); a "
                              "reward model has one (num_labels 1)")
    if not (directory / "tokenizer.json").is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json (a reward model scores text with its tokenizer)")
    return RewardModel(cfg, params, kernel, load_tokenizer(directory))
