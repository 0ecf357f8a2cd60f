"""The transformer on its own: shapes, the parameter tree, packed sequences, the KV cache, execution options.

Tolerance for float32 comparisons of two sftjax computations of the same logits by different routes (packed vs
alone, cached vs full, scan vs loop): 1e-5 absolute; only summation order differs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sftjax
from sftjax.model.transformer import forward_cached, init_cache, segment_positions

ATOL = 1e-5

# One config per family switch that changes the computation (window, biases, q/k norm, Gemma norms/embeddings).
CONFIGS = {
    "llama": sftjax.ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4,
                                num_kv_heads=2, head_dim=12, rope_type="llama3", rope_factor=8.0,
                                rope_original_max_position_embeddings=32),
    "mistral": sftjax.ModelConfig(family="mistral", vocab_size=96, hidden_size=48, intermediate_size=80,
                                  num_layers=2, num_heads=4, num_kv_heads=1, head_dim=12, sliding_window=5),
    "qwen2": sftjax.ModelConfig(family="qwen2", vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=12, qkv_bias=True, sliding_window=4,
                                first_sliding_layer=1),
    "qwen3": sftjax.ModelConfig(family="qwen3", vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True),
    "gemma": sftjax.ModelConfig(family="gemma", vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2,
                                num_heads=2, num_kv_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh",
                                norm_plus_one=True, scale_embeddings=True, tie_word_embeddings=True),
}


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
    """Random params with non-trivial biases and norms (init gives zeros / ones). Noise from numpy: no compile."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                        sftjax.init_params(cfg, jax.random.key(seed)))


def _tokens(shape, seed=0, vocab=96):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def test_parameter_tree_spec():
    cfg = CONFIGS["qwen2"].replace(num_layers=3)
    shapes = jax.tree.map(lambda x: x.shape, sftjax.param_shapes(cfg))
    L, D, F, N, K, H, V = 3, 48, 80, 4, 2, 12, 96
    assert shapes == {
        "embed_tokens": {"embedding": (V, D)},
        "layers": {
            "input_layernorm": {"scale": (L, D)},
            "post_attention_layernorm": {"scale": (L, D)},
            "self_attn": {
                "q_proj": {"kernel": (L, D, N * H), "bias": (L, N * H)},
                "k_proj": {"kernel": (L, D, K * H), "bias": (L, K * H)},
                "v_proj": {"kernel": (L, D, K * H), "bias": (L, K * H)},
                "o_proj": {"kernel": (L, N * H, D)},
            },
            "mlp": {"gate_proj": {"kernel": (L, D, F)}, "up_proj": {"kernel": (L, D, F)},
                    "down_proj": {"kernel": (L, F, D)}},
        },
        "norm": {"scale": (D,)},
        "lm_head": {"kernel": (D, V)},
    }
    assert sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))) \
        == cfg.num_params()


@pytest.mark.parametrize("name", ["qwen3", "gemma"])
def test_family_parameters(name):
    cfg = CONFIGS[name]
    shapes = sftjax.param_shapes(cfg)
    attn = shapes["layers"]["self_attn"]
    if name == "qwen3":
        assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (2, 16)
    else:
        assert "lm_head" not in shapes  # tied
        assert all(float(s) == 0.0 for s in np.asarray(sftjax.init_params(cfg, jax.random.key(0))["norm"]["scale"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shapes_with_eval_shape(dtype):
    cfg = CONFIGS["llama"].replace(dtype=dtype, param_dtype=dtype)
    out = jax.eval_shape(lambda p, t: sftjax.forward(cfg, p, t), sftjax.param_shapes(cfg),
                         jax.ShapeDtypeStruct((3, 17), jnp.int32))
    assert out.shape == (3, 17, 96) and out.dtype == jnp.dtype(dtype)
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(sftjax.param_shapes(cfg)))


def test_segment_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_segments_equal_each_alone(name):
    """Three examples packed in one row (plus padding) get exactly the logits each gets alone."""
    cfg = CONFIGS[name]
    params = _params(cfg)
    lengths = [7, 11, 4]
    examples = [_tokens((1, n), seed=i) for i, n in enumerate(lengths)]
    T = 26
    tokens = np.zeros((1, T), np.int32)
    segment_ids = np.zeros((1, T), np.int32)
    start = 0
    for i, ex in enumerate(examples):
        tokens[0, start:start + ex.shape[1]] = ex
        segment_ids[0, start:start + ex.shape[1]] = i + 1
        start += ex.shape[1]
    packed = np.asarray(sftjax.forward(cfg, params, tokens, segment_ids=segment_ids))
    start = 0
    for ex in examples:
        alone = np.asarray(sftjax.forward(cfg, params, ex))
        np.testing.assert_allclose(packed[:, start:start + ex.shape[1]], alone, rtol=0, atol=ATOL)
        start += ex.shape[1]
    # Without segment ids the examples would see each other: the test can tell the difference.
    unpacked = np.asarray(sftjax.forward(cfg, params, tokens))
    assert np.abs(unpacked[:, lengths[0]:lengths[0] + lengths[1]] - packed[:, lengths[0]:lengths[0] + lengths[1]]
                  ).max() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name):
    """Prefill 6 tokens, then decode the rest one and three at a time: same logits as one full pass."""
    cfg = CONFIGS[name]
    params = _params(cfg, seed=2)
    B, T = 2, 14
    tokens = _tokens((B, T), seed=3)
    full = np.asarray(sftjax.forward(cfg, params, tokens))
    cache = init_cache(cfg, B, 16)
    ones = lambda n: jnp.ones((B, n), jnp.int32)  # noqa: E731
    pos = lambda a, b: jnp.broadcast_to(jnp.arange(a, b), (B, b - a))  # noqa: E731
    step = jax.jit(lambda p, t, c, s, q: forward_cached(cfg, p, t, c, s, q))
    pieces = []
    for a, b in [(0, 6), (6, 7), (7, 8), (8, 11), (11, 14)]:
        logits, cache = step(params, tokens[:, a:b], cache, ones(b - a), pos(a, b))
        pieces.append(np.asarray(logits))
    assert int(cache["index"]) == T
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("scan_layers,remat,block", [(False, "none", 128), (True, "full", 128), (False, "dots", 128),
                                                     (False, "none", 4), (True, "none", 5)])
def test_execution_options_do_not_change_results(scan_layers, remat, block):
    """Layer scan, rematerialisation and the attention block (12 positions in blocks of 4, or of 5, 5 and 2) give
    the same values and gradients, to float32 rounding."""
    cfg = CONFIGS["mistral"]
    params = _params(cfg, seed=4)
    tokens = _tokens((2, 12), seed=5)
    other = cfg.replace(scan_layers=scan_layers, remat=remat, attention_block=block)

    def loss(cfg, params):
        return jnp.mean(jax.nn.log_softmax(sftjax.forward(cfg, params, tokens)) ** 2)

    ref_value, ref_grad = jax.value_and_grad(loss, argnums=1)(cfg, params)
    value, grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(other, params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
    """The bf16 policy runs end to end and stays within bf16 rounding of the f32 result."""
    cfg = CONFIGS["llama"]
    params = _params(cfg, seed=6)
    tokens = _tokens((2, 10), seed=7)
    ref = np.asarray(sftjax.forward(cfg, params, tokens))
    cfg16 = cfg.replace(dtype="bfloat16")
    out = sftjax.forward(cfg16, params, tokens)
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: relative error ~4e-3 per op, a few percent of the logit range end to end.
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()
