"""Packing: proven through the model, plus properties of bins and rows (hypothesis), and the over-long policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftjax.data.errors import DataError
from sftjax.data.masking import Tokenized
from sftjax.data.packing import build_rows, fit_length, pack_bins
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import forward, init_params

PACKED_TOLERANCE = 1e-5  # float32, highest matmul precision: only summation order differs


def example(tokens, mask=None):
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(len(tokens), bool) if mask is None else np.asarray(mask, bool)
    return Tokenized(tokens, mask, "x:1")


def test_packed_examples_compute_as_if_alone():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    a, b = example(rng.integers(0, 64, 7)), example(rng.integers(0, 64, 5))
    rows = build_rows([a, b], [0, 1], [[0, 1]], seq_len=16)
    # highest precision: XLA's CPU default may use reduced-precision float32 matmuls (see tests/conftest.py)
    with jax.default_matmul_precision("highest"):
        packed = forward(cfg, params, rows["tokens"], jnp.asarray(rows["segment_ids"]), jnp.asarray(rows["positions"]))
        alone_a = forward(cfg, params, a.tokens[None])
        alone_b = forward(cfg, params, b.tokens[None])
    assert float(jnp.abs(packed[0, :7] - alone_a[0]).max()) <= PACKED_TOLERANCE
    assert float(jnp.abs(packed[0, 7:12] - alone_b[0]).max()) <= PACKED_TOLERANCE
    # and the check can fail: without segment ids the second example sees the first
    with jax.default_matmul_precision("highest"):
        leaky = forward(cfg, params, rows["tokens"], jnp.ones((1, 16), jnp.int32), jnp.asarray(rows["positions"]))
    assert float(jnp.abs(leaky[0, 7:12] - alone_b[0]).max()) > 1e-3


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 32), min_size=0, max_size=40), seq_len=st.integers(32, 64),
       method=st.sampled_from(["bfd", "greedy", "none"]))
def test_bins_hold_every_example_once_and_fit(lengths, seq_len, method):
    bins = pack_bins(lengths, seq_len, method)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    sums = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < s <= seq_len for s in sums)
    if method == "bfd":  # any-fit: no two rows could have been merged
        assert all(sums[i] + sums[j] > seq_len for i in range(len(sums)) for j in range(i))
    if method == "greedy":
        assert [i for b in bins for i in b] == list(range(len(lengths)))  # stream order kept
        assert all(sums[i] + sums[i + 1] > seq_len for i in range(len(sums) - 1))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seq_len=st.integers(8, 40), method=st.sampled_from(["bfd", "greedy", "none"]))
def test_rows_lose_nothing_and_restart_positions(data, seq_len, method):
    lengths = data.draw(st.lists(st.integers(1, seq_len), min_size=1, max_size=12))
    examples = [example(data.draw(st.lists(st.integers(3, 99), min_size=n, max_size=n)),
                        data.draw(st.lists(st.booleans(), min_size=n, max_size=n))) for n in lengths]
    tasks = data.draw(st.lists(st.integers(0, 3), min_size=len(examples), max_size=len(examples)))
    bins = pack_bins(lengths, seq_len, method)
    rows = build_rows(examples, tasks, bins, seq_len, pad_id=0)
    seen = []
    for r, members in enumerate(bins):
        seg = rows["segment_ids"][r]
        assert seg.tolist() == sorted(seg.tolist(), key=lambda s: (s == 0, s))  # 1..n then padding
        for k, i in enumerate(members, start=1):
            where = np.flatnonzero(seg == k)
            ex = examples[i]
            assert where.tolist() == list(range(where[0], where[0] + len(ex.tokens)))  # contiguous
            assert rows["tokens"][r, where].tolist() == ex.tokens.tolist()
            assert rows["positions"][r, where].tolist() == list(range(len(ex.tokens)))
            assert (rows["task_ids"][r, where] == tasks[i]).all()
            assert rows["targets"][r, where[:-1]].tolist() == ex.tokens[1:].tolist()
            assert rows["loss_mask"][r, where].tolist() == ex.mask[1:].tolist() + [0.0]  # last predicts nothing
            seen.append(i)
        pad = seg == 0
        assert not rows["loss_mask"][r, pad].any() and (rows["task_ids"][r, pad] == -1).all()
    assert sorted(seen) == list(range(len(examples)))
    assert rows["loss_mask"].sum() == sum(e.mask[1:].sum() for e in examples)


def test_truncation_keeps_the_completion():
    bos = 1
    ex = example([bos, 10, 11, 12, 13, 14, 20, 21, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    fitted = fit_length(ex, 6, "truncate", bos)
    assert fitted.tokens.tolist() == [bos, 13, 14, 20, 21, 2] and fitted.mask.tolist() == [0, 0, 0, 1, 1, 1]
    fitted = fit_length(ex, 4, "truncate", bos)  # completion alone too long: one token of context, cut the end
    assert fitted.tokens.tolist() == [bos, 14, 20, 21] and fitted.num_trained == 2
    no_bos = example([10, 11, 12, 20, 21], [0, 0, 0, 1, 1])
    assert fit_length(no_bos, 3, "truncate", bos).tokens.tolist() == [12, 20, 21]
    assert fit_length(ex, 6, "drop", bos) is None and fit_length(ex, 9, "drop", bos) is ex
    with pytest.raises(DataError, match=r"^x:1: example has 9 tokens, more than seq_len=6"):
        fit_length(ex, 6, "error", bos)
