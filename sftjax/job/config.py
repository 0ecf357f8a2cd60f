"""The main job's own settings: `builtin.*`, and sftjax-train's schema, the library's TrainConfig plus them.

The library (`sftjax.train.loop.run_training`) takes a `TrainConfig` and knows nothing of the built-in corpus,
tasks and base. `sftjax-train` runs both the library and the main job (sftjax/job/run.py: no dataset, or
`model=builtin`), so its Hydra schema is `JobConfig`; `sftjax-eval` and `sftjax-export` read saved runs with it too.
No JAX is imported here (Hydra composes the config before JAX starts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from sftjax.config import TrainConfig


@dataclasses.dataclass
class PerTask:
    """One value per built-in task (sftjax.data.builtin.tasks), e.g. builtin.upsample.add=2."""

    module: float = 0.0
    first_param: float = 0.0
    add: float = 0.0


@dataclasses.dataclass
class BuiltinSection:
    cache_dir: str = "${oc.env:SFTJAX_CACHE,'~/.cache/sftjax'}"  # built corpus, tokenizer and pre-trained base
    vocab_size: int = 4096  # BPE vocabulary trained on the corpus (4k: every spaced digit is one token)
    base_layers: int = 4  # decoder layers of the base (width 128); fewer: a smaller base, e.g. a distilled student
    pretrain_steps: int = 500  # optimizer steps of the base's pre-training
    pretrain_batch: int = 32  # rows of pretrain_seq_len tokens per step
    pretrain_seq_len: int = 128  # tokens per pre-training row (the task examples are shorter)
    pretrain_lr: float = 5e-3  # peak learning rate of pre-training (warmup + cosine)
    train_examples: int = 8000  # train examples per task, at most (Python 3.11: module has 1050, first_param 5383)
    eval_examples: int = 100  # test (or valid) examples per task scored by generation in the report (at most)
    report_split: str = "test"  # the split the report scores: test | valid (choose settings on valid, not test)
    few_shot: int = 3  # solved examples in front of each prompt for the few-shot baseline
    max_new_tokens: int = 8  # generation length when scoring answers
    tasks: list[str] = field(default_factory=lambda: ["module", "first_param", "add"])  # trained and evaluated
    heads: list[str] = field(default_factory=list)  # tasks answered by a classification head (objective=heads)
    upsample: PerTask = field(default_factory=lambda: PerTask(1.0, 1.0, 1.0))  # draws per example, relative
    prompt_noise: PerTask = field(default_factory=lambda: PerTask(0.0, 0.0, 0.0))  # data.train[].prompt_noise


@dataclasses.dataclass
class JobConfig(TrainConfig):
    """TrainConfig plus the main job's section (its YAML: conf/experiment/main.yaml, conf/model/builtin.yaml)."""

    builtin: BuiltinSection = field(default_factory=BuiltinSection)  # the main job: model=builtin, no data.train
