"""`job.base._built_once`: the built-in corpus and tasks are built once per key and loaded afterwards."""

import json

import pytest

from sftjax.job.base import _built_once


def test_built_once_per_key_and_again_when_interrupted_or_changed(tmp_path):
    calls = []

    def build(directory):
        calls.append("build")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data.txt").write_text("x")
        return "built"

    def load(directory):
        calls.append("load")
        (directory / "data.txt").read_text()  # OSError when the file is gone: built again
        return "loaded"

    d = tmp_path / "d"
    assert _built_once(d, ["k", 1], build, load) == "built"
    assert json.loads((d / "built.json").read_text()) == {"key": ["k", 1]}
    assert _built_once(d, ["k", 1], build, load) == "loaded"
    assert _built_once(d, ["k", 2], build, load) == "built"  # another key (changed sources or settings)
    (d / "data.txt").unlink()
    assert _built_once(d, ["k", 2], build, load) == "built"  # a file went missing
    (d / "built.json").write_text("{not json")
    assert _built_once(d, ["k", 2], build, load) == "built"  # an unreadable marker

    def interrupted(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _built_once(d, ["k", 3], interrupted, load)
    assert not (d / "built.json").exists()  # removed before building: the old key no longer matches half a build
    assert calls == ["build", "load", "build", "load", "build", "build"]


def test_the_base_pre_trains_at_its_own_numerics_whatever_the_fine_tuning_sets(tmp_path):
    """A fine-tuning setting that changes rounding (model.attention_block, padding_free, dtype, dropout) must not
    reach the pre-training: the cached base is named by its settings, not by these."""
    import dataclasses

    from sftjax.job.base import _pretrain_config
    from sftjax.job.config import JobConfig
    from sftjax.model.config import ATTENTION_BLOCK

    template = JobConfig()
    template.model = dataclasses.replace(template.model, attention_block=32, dtype="bfloat16", dropout=0.1,
                                         padding_free=True)
    corpus = type("Corpus", (), {"train_path": tmp_path / "t.jsonl", "heldout_path": tmp_path / "h.jsonl"})()
    cfg = _pretrain_config(template.builtin, tmp_path, tmp_path / "init", corpus, template)
    assert (cfg.model.attention_block, cfg.model.dtype, cfg.model.dropout) == (ATTENTION_BLOCK, "float32", 0.0)
    assert cfg.model.padding_free is False
