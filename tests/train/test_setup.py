"""From config to data: task names are unique, and the eval split visits every held-out example exactly once."""

import pytest

from sftjax.cli.common import compose_config
from sftjax.data.pipeline import DataIterator
from sftjax.data.tokenizer import load_tokenizer
from sftjax.errors import ConfigError
from sftjax.train.setup import build_data
from tests.train.conftest import write_arithmetic


def test_task_names_must_be_unique(workspace, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_arithmetic(tmp_path / "a" / "train.jsonl", 10, seed=0)
    b = write_arithmetic(tmp_path / "b" / "train.jsonl", 10, seed=1)
    cfg = compose_config([f"model={workspace['model']}", f"data.train=[{{path:'{a}'}},{{path:'{b}'}}]"])
    with pytest.raises(ConfigError, match=r"data.train\[1\]: task name 'train' is taken by data.train\[0\]"):
        build_data(cfg, load_tokenizer(workspace["model"]), devices=1)


def test_eval_split_ignores_mixture_weights(workspace, tmp_path):
    a = write_arithmetic(tmp_path / "a.jsonl", 20, seed=0)
    b = write_arithmetic(tmp_path / "b.jsonl", 20, seed=1)
    cfg = compose_config([f"model={workspace['model']}", "data.eval_fraction=0.5", "trainer.batch_size=1",
                          f"data.train=[{{path:'{a}',weight:3}},{{path:'{b}',weight:1}}]"])
    _, held = build_data(cfg, load_tokenizer(workspace["model"]), devices=1)
    assert [len(d) for d in held.datasets] == [10, 10]
    # Every held-out example once: per task, the tokens in the rows are exactly those of its 10 examples
    # (with the 3:1 weights of training, an epoch would draw 15 examples of task 0 and 5 of task 1).
    per_task = [0, 0]
    for batch in DataIterator(held):
        real = batch["segment_ids"] > 0
        for task in (0, 1):
            per_task[task] += int((real & (batch["task_ids"] == task)).sum())
    assert per_task == [sum(len(e.tokens) for e in d) for d in held.datasets]
