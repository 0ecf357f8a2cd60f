"""prepare + DataIterator: counts, mixtures, epochs, exact resume, pmap/multi-host shapes."""

import json

import numpy as np
import pytest

from sftjax.data.errors import DataError
from sftjax.errors import ConfigError
from sftjax.data.mixture import draws_per_epoch, epoch_order
from sftjax.data.pipeline import DataConfig, DataIterator, DataOptions, DatasetSpec, prepare
from sftjax.data.tokenizer import load_tokenizer

from .test_formats import write_jsonl

WORDS = "hello world how are you today fine thanks quick brown fox lazy dog".split()


def chat_records(n, seed):
    rng = np.random.default_rng(seed)
    say = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    return [{"messages": [{"role": "user", "content": f"{i} {say(rng.integers(1, 8))}"},
                          {"role": "assistant", "content": say(rng.integers(1, 12))}]} for i in range(n)]


@pytest.fixture()
def two_datasets(tmp_path):
    a = write_jsonl(tmp_path / "chat.jsonl", chat_records(37, 0))
    b = write_jsonl(tmp_path / "pc.jsonl",
                    [{"prompt": f"{i} {WORDS[i % 13]}", "completion": " fox"} for i in range(11)])
    return str(a), str(b)


def config(paths, **kw):
    weights = kw.pop("weights", [None] * len(paths))
    return DataConfig(datasets=[DatasetSpec(p, weight=w) for p, w in zip(paths, weights)],
                      **{"seq_len": 64, "per_device_batch": 2, "pack_window": 16, **kw})


def segments(batches):
    """Every (task id, tokens) segment in a list of batches, in order."""
    out = []
    for b in batches:
        for key in ("tokens", "segment_ids", "task_ids"):
            b[key] = b[key].reshape(-1, b[key].shape[-1])
        for r in range(len(b["tokens"])):
            for s in range(1, b["segment_ids"][r].max() + 1):
                where = b["segment_ids"][r] == s
                out.append((int(b["task_ids"][r][where][0]), tuple(b["tokens"][r][where].tolist())))
    return out


def test_one_epoch_holds_every_example_exactly_once(chatml_dir, two_datasets):
    tok = load_tokenizer(chatml_dir)
    prepared = prepare(config(two_datasets), tok)
    expected = sorted((t, tuple(e.tokens.tolist())) for t, d in enumerate(prepared.datasets) for e in d)
    it = DataIterator(prepared, devices=2)
    batches = list(it)
    assert all(b["tokens"].shape == (2, 2, 64) for b in batches)
    assert sorted(segments(batches)) == expected
    assert 0.5 < it.efficiency <= 1.0
    assert [s.kept for s in prepared.stats] == [37, 11] and prepared.stats[1].name == "pc"


def test_resume_from_state_continues_exactly(chatml_dir, two_datasets):
    prepared = prepare(config(two_datasets, num_epochs=3, weights=[1.0, 3.0], packing="greedy"),
                       load_tokenizer(chatml_dir))
    uninterrupted = list(DataIterator(prepared))
    for stop in (1, 5, len(uninterrupted) // 2, len(uninterrupted) - 1):
        it = DataIterator(prepared)
        first = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(it.state()))
        rest = list(DataIterator(prepare(config(two_datasets, num_epochs=3, weights=[1.0, 3.0],
                                                packing="greedy"), load_tokenizer(chatml_dir)), state=state))
        assert len(first) + len(rest) == len(uninterrupted)
        for got, want in zip(first + rest, uninterrupted):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    assert set(DataIterator(prepared).state()) == {"version", "epoch", "position", "row", "seed", "fingerprint"}


def test_resume_refuses_other_data(chatml_dir, two_datasets):
    tok = load_tokenizer(chatml_dir)
    state = DataIterator(prepare(config(two_datasets), tok)).state()
    with pytest.raises(DataError, match="fingerprint differ"):
        DataIterator(prepare(config(two_datasets, seq_len=32), tok), state=state)
    with pytest.raises(DataError, match="seed or fingerprint differ"):
        DataIterator(prepare(config(two_datasets, seed=1), tok), state=state)



@pytest.mark.parametrize("kw,message", [
    (dict(packing="bad"), r"^data.packing='bad': must be one of bfd, greedy, none$"),
    (dict(mask="assistant"), r"^data.mask='assistant': must be one of completion, last_turn, all$"),
    (dict(mask_rule="guess"), r"^data.mask_rule='guess': must be one of auto, tags, per_turn, search$"),
    (dict(over_long="trunc"), r"^data.over_long='trunc': must be one of truncate, drop, error$"),
    (dict(seq_len=1), r"^data.seq_len=1: must be >= 2"),
    (dict(weights=[1.0, None]), r"^data.datasets\[\*\].weight: give a weight for every dataset or for none$"),
    (dict(weights=[1.0, -1.0]), r"^data.datasets\[1\].weight=-1.0: must be >= 0"),
])
def test_impossible_settings_fail_before_reading(kw, message):
    with pytest.raises(ConfigError, match=message):  # the files do not exist: nothing was read
        prepare(config(["missing.jsonl", "missing2.jsonl"], **kw), tokenizer=None)
    with pytest.raises(ConfigError, match=r"^data.datasets\[0\].format='csv': must be auto or one of chat, "):
        prepare(DataConfig(datasets=[DatasetSpec("missing.jsonl", format="csv")]), tokenizer=None)
    with pytest.raises(ConfigError, match=r"^data.datasets: no dataset given$"):
        prepare(DataConfig(), tokenizer=None)
    with pytest.raises(ConfigError, match=r"^data.datasets\[0\].path: not set"):
        prepare(DataConfig(datasets=[DatasetSpec()]), tokenizer=None)


def test_data_config_takes_the_options_of_a_run_config_section():
    options = DataOptions(seq_len=128, packing="greedy", template_kwargs={"enable_thinking": False}, seed=3)
    cfg = DataConfig.from_options(options, datasets=[DatasetSpec("a.jsonl", labels=["x", "y"])], num_epochs=None)
    assert (cfg.seq_len, cfg.packing, cfg.template_kwargs, cfg.seed, cfg.num_epochs) == \
        (128, "greedy", {"enable_thinking": False}, 3, None)
    assert cfg.datasets[0].labels == ("x", "y") and DataConfig().seq_len == DataOptions().seq_len == 512


def test_multi_host_slices_make_up_the_global_batch(chatml_dir, two_datasets):
    prepared = prepare(config(two_datasets), load_tokenizer(chatml_dir))
    whole = list(DataIterator(prepared, devices=4))
    hosts = [list(DataIterator(prepared, devices=2, process_index=p, process_count=2)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(whole)
    for w, h0, h1 in zip(whole, *hosts):
        np.testing.assert_array_equal(w["tokens"], np.concatenate([h0["tokens"], h1["tokens"]]))


def test_mixture_weights_and_seeds():
    assert draws_per_epoch([100, 10], None) == [100, 10]
    assert draws_per_epoch([100, 10], [1, 1]) == [55, 55]
    order = epoch_order([100, 10], [1, 1], seed=0, epoch=0)
    assert (order[:, 0] == 1).sum() == 55
    counts = np.bincount(order[order[:, 0] == 1, 1], minlength=10)
    assert counts.min() >= 5 and counts.max() <= 6  # whole passes over the small dataset, then part of one
    np.testing.assert_array_equal(order, epoch_order([100, 10], [1, 1], seed=0, epoch=0))
    assert not np.array_equal(order, epoch_order([100, 10], [1, 1], seed=1, epoch=0))
    assert not np.array_equal(order, epoch_order([100, 10], [1, 1], seed=0, epoch=1))
    # the large dataset continues where it stopped: two epochs of 55 draws cover 100 examples, then repeat
    second = epoch_order([100, 10], [1, 1], seed=0, epoch=1)
    both = np.concatenate([order[order[:, 0] == 0, 1], second[second[:, 0] == 0, 1]])
    assert len(set(both.tolist())) == 100
    with pytest.raises(DataError, match="non-negative weight"):
        draws_per_epoch([1, 2], [1, -1])


def test_drops_truncation_and_no_trainable_token(chatml_dir, tmp_path):
    tok = load_tokenizer(chatml_dir)
    long = "hello " * 80
    records = [{"prompt": long, "completion": "fox"}, {"prompt": "a", "completion": long},
               {"prompt": "hi", "completion": "fox"}]
    path = str(write_jsonl(tmp_path / "d.jsonl", records))
    st = prepare(config([path]), tok).stats[0]
    assert (st.records, st.kept, st.truncated, st.dropped_too_long) == (3, 3, 2, 0)
    st = prepare(config([path], over_long="drop"), tok).stats[0]
    assert (st.kept, st.dropped_too_long) == (1, 2)
    with pytest.raises(DataError, match=r"d.jsonl:1: example has \d+ tokens, more than seq_len=64"):
        prepare(config([path], over_long="error"), tok)
    no_reply = str(write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2))
    with pytest.raises(DataError, match=r"n.jsonl: no trainable token in the dataset \(2 records: 2 with an empty"):
        prepare(config([no_reply]), tok)
    mixed = str(write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, records[2]]))
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field 'messages'$"):
        prepare(config([mixed]), tok)


def test_padding_mode_puts_one_example_per_row(chatml_dir, two_datasets):
    prepared = prepare(config(two_datasets, packing="none"), load_tokenizer(chatml_dir))
    it = DataIterator(prepared)
    batches = list(it)
    assert all(b["segment_ids"].max(axis=-1).max() <= 1 for b in batches)
    assert len(segments(batches)) == 48
    packed = DataIterator(prepare(config(two_datasets), load_tokenizer(chatml_dir)))
    list(packed)
    assert it.efficiency < 0.7 < packed.efficiency


def test_bfd_rows_are_shuffled_so_batches_mix_lengths(chatml_dir, tmp_path):
    """Best-fit decreasing fills rows longest first; emitted in that order, a task mixture of long and short
    examples would give batches of one task each. The rows of a window are shuffled (deterministically)."""
    tok = load_tokenizer(chatml_dir)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": " ".join(WORDS) + f" {i}", "completion": " fox"}
                                                 for i in range(64)])
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": f"{i}", "completion": " dog"} for i in range(256)])
    prepared = prepare(config([str(long), str(short)], pack_window=320, per_device_batch=1), tok)
    batches = list(DataIterator(prepared, devices=1))
    order = [tuple(sorted(set(b["task_ids"][b["task_ids"] >= 0].tolist()))) for b in batches]
    assert len(order) >= 8
    # Sorted by length, all rows holding long examples would come first; shuffled, the pure-short rows (the
    # short examples left after filling) and the long rows interleave.
    first_short = next(i for i, t in enumerate(order) if t == (1,))
    last_long = max(i for i, t in enumerate(order) if 0 in t)
    assert first_short < last_long
    again = list(DataIterator(prepared, devices=1))  # deterministic
    assert [b["tokens"].tolist() for b in again] == [b["tokens"].tolist() for b in batches]
