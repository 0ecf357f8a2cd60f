"""Generation behaviour beyond greedy parity (tests/model/test_parity.py): EOS, sampling, seeds, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sftjax
from sftjax.model.generate import sample_logits

CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, eos_token_ids=(2,), pad_token_id=0)


@pytest.fixture(scope="module")
def params():
    # Large weights: peaked next-token distributions, so greedy decoding is far from ties.
    p = sftjax.init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, p)


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]


def _reference_greedy(params, prompt, n):
    """Greedy decoding by full forward passes, no cache: the definition generate must agree with."""
    tokens = list(prompt)
    for _ in range(n):
        logits = sftjax.forward(CFG, params, np.asarray([tokens], np.int32))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(prompt):]


def test_greedy_equals_uncached_reference(params):
    out = sftjax.generate(CFG, params, PROMPTS, max_new_tokens=8, eos_token_ids=())
    assert out == [_reference_greedy(params, p, 8) for p in PROMPTS]


def test_stops_at_eos_and_includes_it(params):
    free = sftjax.generate(CFG, params, PROMPTS, max_new_tokens=12, eos_token_ids=())
    # Declare as EOS the token each row emits at step 3 (or its first occurrence): rows stop there.
    eos = {row[3] for row in free}
    stopped = sftjax.generate(CFG, params, PROMPTS, max_new_tokens=12, eos_token_ids=tuple(eos))
    for row, cut in zip(free, stopped):
        first = min(i for i, t in enumerate(row) if t in eos)
        assert cut == row[: first + 1]


def test_sampling_is_seeded(params):
    kw = dict(max_new_tokens=10, temperature=1.5, eos_token_ids=())
    a = sftjax.generate(CFG, params, PROMPTS, seed=1, **kw)
    assert a == sftjax.generate(CFG, params, PROMPTS, seed=1, **kw)
    assert a != sftjax.generate(CFG, params, PROMPTS, seed=2, **kw)


def test_top_k_one_and_tiny_top_p_are_greedy(params):
    greedy = sftjax.generate(CFG, params, PROMPTS, max_new_tokens=6, eos_token_ids=())
    assert sftjax.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=2.0, top_k=1,
                           eos_token_ids=()) == greedy
    assert sftjax.generate(CFG, params, PROMPTS, max_new_tokens=6, temperature=2.0, top_p=1e-6,
                           eos_token_ids=()) == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    top2 = np.asarray(sample_logits(logits, keys, 1.0, 2, 1.0))
    assert set(top2) == {0, 1}
    nucleus = np.asarray(sample_logits(logits, keys, 1.0, 0, 0.8))  # 0.5 + 0.3 reaches 0.8: tokens 0, 1
    assert set(nucleus) == {0, 1}
    nucleus = np.asarray(sample_logits(logits, keys, 1.0, 0, 0.81))  # needs the third token
    assert set(nucleus) == {0, 1, 2}
    freq = np.bincount(np.asarray(sample_logits(logits, keys, 1.0, 0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)  # ~4 sigma at n=4000


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([], {}, "non-empty list"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 64]], {}, "token id 64 outside the vocabulary"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens=0"),
    ([[1]], {"temperature": -1.0}, "temperature >= 0"),
    ([[1]], {"top_p": 0.0}, "0 < top_p <= 1"),
])
def test_bad_arguments(params, prompts, kwargs, message):
    with pytest.raises(sftjax.UserError, match=message):
        sftjax.generate(CFG, params, prompts, **kwargs)
