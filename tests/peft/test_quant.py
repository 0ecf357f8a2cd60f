"""4-bit quantization against bitsandbytes 0.50 on CPU: codes, double-quantized constants, dequantized values;
int4; the parameter-tree transform under the model; memory accounting; bad input.

Tolerances: codes, absmax codes, scales and offsets are compared for equality (bit-exact). Dequantized values are
equal to bitsandbytes' when computed op by op; under jit XLA may fuse absmax = code * scale + offset into one FMA,
so there they agree within 3e-7 relative (1 ulp of absmax, then the product rounded). Model outputs from the same
dequantized weights by two routes agree within 1e-5 absolute (only summation order and that FMA differ).

bitsandbytes' offset (the mean of the absmax values) is a float32 sum that torch splits over threads above 32768
blocks, so bnb's own result depends on the thread count: the reference runs on one thread (fixture below).
"""

import bitsandbytes.functional as bnb
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sftjax
from sftjax.errors import ConfigError
from sftjax.peft import quant

JIT_RTOL = 3e-7  # dequantized under jit vs bitsandbytes: absmax may differ by 1 ulp (FMA), see the docstring
MODEL_ATOL = 1e-5

# Odd sizes on purpose: q/k/v/o [35, 24] = 840 weights (13 blocks + a partial one), gate/up/down 35 x 45 = 1575
# weights (odd: the last byte holds one code), so the tree test covers partial blocks and odd counts.
CFG = sftjax.ModelConfig(vocab_size=64, hidden_size=35, intermediate_size=45, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=6)
TOKENS = np.random.RandomState(0).randint(0, 64, (2, 7)).astype(np.int32)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The reference on one thread (see the docstring), eager: bnb's default ops would torch.compile per shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch._dynamo.config.patch(disable=True):
        yield
    torch.set_num_threads(threads)


def _weight(shape, seed, scale=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _bnb(w, double_quant):
    """(packed codes [ceil(n/2)], quant_state) from bitsandbytes for a torch-order weight (numpy or torch)."""
    tw = w if isinstance(w, torch.Tensor) else torch.from_numpy(w)
    packed, state = bnb.quantize_4bit(tw, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed.numpy().reshape(-1), state


def _assert_equals_bnb(w, double_quant):
    q = quant.quantize_weight(w, "nf4", double_quant)
    packed, state = _bnb(w, double_quant)
    np.testing.assert_array_equal(np.asarray(q["codes"]), packed)
    if double_quant:
        np.testing.assert_array_equal(np.asarray(q["absmax_codes"]), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(q["absmax_scale"]), state.state2.absmax.numpy())
        assert np.asarray(q["absmax_offset"]) == state.offset.numpy()
    else:
        np.testing.assert_array_equal(np.asarray(q["absmax"]), state.absmax.numpy())
    return q, packed, state


# ----------------------------------------------------------------------------------------------------------------
# Constants and the summation order


def test_tables_equal_bitsandbytes():
    np.testing.assert_array_equal(quant.NF4_TABLE, bnb.get_4bit_type("nf4", device="cpu").numpy())
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch without SIMD rounds linspace twice: its dynamic map differs (see quant._linspace_fma)")
    np.testing.assert_array_equal(quant.DYNAMIC_MAP, bnb.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("n", [*range(1, 70), 255, 1000, 4097, 32768, 65536 + 13])
def test_offset_sum_replays_torch(n):
    x = np.abs(_weight(n, n, scale=0.05))
    assert quant._torch_cpu_sum(x) == torch.from_numpy(x).sum().numpy()


# ----------------------------------------------------------------------------------------------------------------
# NF4 codes and constants equal bitsandbytes'

SHAPES = [
    (64, 64),
    (512, 1408),  # bench-llama gate/up, torch order
    (1408, 512),  # bench-llama down
    (2048, 2048),  # 65536 blocks: the offset sum is past torch's thread split
    (3, 50),  # 150 weights: the last block has 22
    (5, 3),  # 15 weights: odd, one partial block
    (1, 1),
    (300, 257),  # 1205 blocks: the last absmax block of 256 is partial (181)
    (33, 4097),
]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_equals_bitsandbytes(shape, double_quant):
    for seed in range(2):
        _assert_equals_bnb(_weight(shape, seed, scale=10.0 ** -seed), double_quant)


@settings(max_examples=12, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 300), log_scale=st.floats(-30, 30), seed=st.integers(0, 2**16),
       double_quant=st.booleans())
def test_nf4_equals_bitsandbytes_any_shape(out, inp, log_scale, seed, double_quant):
    _assert_equals_bnb(_weight((out, inp), seed, scale=10.0**log_scale), double_quant)


def test_ties_zeros_and_half_precision_equal_bitsandbytes():
    midpoints = (quant.NF4_TABLE[:-1] + quant.NF4_TABLE[1:]) / np.float32(2)
    ties = np.concatenate([[1.0], midpoints, -midpoints, np.nextafter(midpoints, 2), np.nextafter(midpoints, -2)])
    # block absmax 1, so x / absmax = x: exact midpoints (ties) in a full block and in a partial one
    w = np.concatenate([ties, np.zeros(64 - ties.size), ties[:40]]).astype(np.float32).reshape(1, -1)
    for double_quant in (True, False):
        _assert_equals_bnb(w, double_quant)
    # blocks of zeros, full and partial (bnb keeps absmax 0 for the first, floors the second at 1e-38)
    for w in (np.zeros((2, 64), np.float32), np.zeros((3, 50), np.float32), np.zeros((5, 3), np.float32)):
        _, _, state = _assert_equals_bnb(w, False)
        _assert_equals_bnb(w, True)
    assert state.absmax.numpy()[-1] == np.float32(1e-38)
    # bfloat16 / float16 weights are read as float32, as bnb does
    for torch_dtype, np_dtype in ((torch.bfloat16, ml_dtypes.bfloat16), (torch.float16, np.float16)):
        tw = torch.from_numpy(_weight((96, 200), 1)).to(torch_dtype)
        q = quant.quantize_weight(tw.float().numpy().astype(np_dtype))
        packed, state = _bnb(tw, True)
        np.testing.assert_array_equal(np.asarray(q["codes"]), packed)
        np.testing.assert_array_equal(np.asarray(q["absmax_codes"]), state.absmax.numpy())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(512, 1408), (3, 50), (5, 3)])
def test_dequantize_equals_bitsandbytes(shape, double_quant):
    q, packed, state = _assert_equals_bnb(_weight(shape, 0), double_quant)
    expected = bnb.dequantize_4bit(torch.from_numpy(packed).reshape(-1, 1), state).numpy()
    np.testing.assert_array_equal(quant.dequantize(q, shape, jnp.float32), expected)  # op by op: exact
    jitted = jax.jit(quant.dequantize, static_argnums=(1, 2))(q, shape, jnp.float32)
    np.testing.assert_allclose(jitted, expected, rtol=JIT_RTOL, atol=0)
    # bfloat16 output: computed in float32, rounded at the end, as bnb's kernel
    tw = torch.from_numpy(_weight(shape, 0)).to(torch.bfloat16)
    packed, state = _bnb(tw, double_quant)
    q = quant.quantize_weight(tw.float().numpy().astype(ml_dtypes.bfloat16), "nf4", double_quant)
    expected = bnb.dequantize_4bit(torch.from_numpy(packed).reshape(-1, 1), state).float().numpy()
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q, shape, jnp.bfloat16), np.float32), expected)


# ----------------------------------------------------------------------------------------------------------------
# int4


def test_int4_codes_and_round_trip():
    np.testing.assert_array_equal(quant.INT4_TABLE, ((np.arange(16) - 8) / 7).astype(np.float32))
    w = _weight((37, 301), 3)  # 11137 weights: odd, partial last block
    q = quant.quantize_weight(w, "int4", double_quant=False)
    packed = np.asarray(q["codes"])
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:w.size]
    assert codes.min() >= 1 and codes.max() <= 15  # symmetric: code 0 (-8/7) never produced
    absmax = np.repeat(np.asarray(q["absmax"]), 64)[:w.size]
    error = np.abs(np.asarray(quant.dequantize(q, w.shape, jnp.float32)).reshape(-1) - w.reshape(-1))
    assert np.all(error <= absmax / 14 * (1 + 1e-6))  # half a step of 1/7, float32 slack
    # round-to-nearest of 7 x / absmax where no tie is within float rounding
    r = 7 * w.reshape(-1).astype(np.float64) / absmax
    clear = np.abs(r - np.floor(r) - 0.5) > 1e-4
    np.testing.assert_array_equal(codes[clear], (np.rint(r[clear]) + 8).astype(np.uint8))
    # double quantization changes only how absmax is stored
    dq = quant.quantize_weight(w, "int4", double_quant=True)
    np.testing.assert_array_equal(np.asarray(dq["codes"]), packed)
    absmax = np.asarray(q["absmax"])  # 8-bit codes of absmax - offset: error well under 1% of the largest
    np.testing.assert_allclose(quant._absmax(dq, absmax.size), absmax, rtol=0, atol=0.01 * absmax.max())


# ----------------------------------------------------------------------------------------------------------------
# The parameter tree


@pytest.fixture(scope="module")
def params():
    """Random float32 params of CFG (N(0, 0.02) everywhere), drawn by numpy: no init to compile."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), sftjax.param_shapes(CFG))


@pytest.fixture(scope="module")
def nf4_tree(params):
    return quant.quantize_params(params, "nf4", double_quant=True)


LINEARS = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
          [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_quantize_params_tree(params, nf4_tree, kind):
    before = jax.tree.map(np.array, params)
    quantized = nf4_tree if kind == "nf4" else quant.quantize_params(params, kind, double_quant=True)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), before)  # input untouched
    for module in ("embed_tokens", "norm", "lm_head"):  # not targets: the same float arrays
        jax.tree.map(np.testing.assert_array_equal, quantized[module], params[module])
    jax.tree.map(np.testing.assert_array_equal, quantized["layers"]["input_layernorm"],
                 params["layers"]["input_layernorm"])
    for group, name in LINEARS:
        kernel, node = np.asarray(params["layers"][group][name]["kernel"]), quantized["layers"][group][name]
        assert set(node) == {"qkernel"}
        L, d_in, d_out = kernel.shape
        layout = quant.qkernel_layout((d_out, d_in), True, L)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), node["qkernel"]) == \
            jax.tree.map(lambda a: (a.shape, a.dtype), layout)
        stacked = jax.tree.map(np.asarray, node["qkernel"])
        for i in range(L):  # layer i is bitsandbytes' quantization of the torch weight kernel[i].T
            one = quant.quantize_weight(kernel[i].T, kind, True)
            jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a[i], b), stacked, one)
    if kind == "nf4":
        packed, _ = _bnb(np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1]).T.copy(), True)
        np.testing.assert_array_equal(quantized["layers"]["mlp"]["down_proj"]["qkernel"]["codes"][1], packed)


def test_forward_on_quantized_tree_equals_forward_on_dequantized(params, nf4_tree):
    dequantized = quant.dequantize_params(nf4_tree)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), dequantized) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), params)
    # forward is jitted: the Dense layers dequantize inside jit and the layer scan (through the plug-in that reads
    # 4-bit kernels: `lora_model_config` without a spec)
    np.testing.assert_allclose(sftjax.forward(sftjax.lora_model_config(CFG), nf4_tree, TOKENS),
                               sftjax.forward(CFG, dequantized, TOKENS), atol=MODEL_ATOL)
    # the round trip is per-layer dequantize(quantize(kernel[i].T)).T, and close to the float weights
    kernel = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"])
    restored = np.asarray(dequantized["layers"]["mlp"]["up_proj"]["kernel"])
    one = quant.dequantize(quant.quantize_weight(kernel[2].T), kernel.shape[:0:-1], jnp.float32).T
    np.testing.assert_array_equal(restored[2], one)
    assert np.linalg.norm(restored - kernel) / np.linalg.norm(kernel) < 0.15  # NF4 on N(0, 0.02)


def test_custom_targets_and_unstacked_kernels(params):
    targets = {("layers", "self_attn", "q_proj"), ("lm_head",)}.__contains__
    quantized = quant.quantize_params(params, "nf4", double_quant=False, targets=targets)
    assert "qkernel" in quantized["layers"]["self_attn"]["q_proj"]
    assert "kernel" in quantized["layers"]["self_attn"]["k_proj"]
    kernel = params["lm_head"]["kernel"]  # [D, V], not layer-stacked
    np.testing.assert_array_equal(quantized["lm_head"]["qkernel"]["codes"], quant.quantize_weight(kernel.T)["codes"])
    restored = quant.dequantize_params(quantized)
    expected = quant.dequantize(quantized["lm_head"]["qkernel"], kernel.shape[::-1], jnp.float32).T
    np.testing.assert_array_equal(restored["lm_head"]["kernel"], expected)
    assert restored["lm_head"]["kernel"].shape == kernel.shape


# ----------------------------------------------------------------------------------------------------------------
# Memory accounting


def test_bits_per_parameter_of_a_4096_square_layer():
    n = 4096 * 4096
    w = _weight((4096, 4096), 0)
    dq, plain = quant.quantize_weight(w, "nf4", True), quant.quantize_weight(w, "nf4", False)
    # QLoRA arithmetic for the per-block arrays, plus the per-matrix table (64 B), shape (8 B) and offset (4 B)
    assert quant.bits_per_parameter(dq, n) == 4 + 8 / 64 + 32 / (64 * 256) + 8 * 76 / n
    assert quant.bits_per_parameter(plain, n) == 4 + 32 / 64 + 8 * 72 / n
    assert quant.bits_per_parameter(dq, n) <= 4.13
    tree = {"layers": {"self_attn": {"q_proj": {"kernel": jax.ShapeDtypeStruct((1, 4096, 4096), jnp.float32)}}}}
    report = quant.memory_report(tree)
    assert report["dq_bits_per_param"] == quant.bits_per_parameter(dq, n)
    assert report["bits_per_param"] == quant.bits_per_parameter(plain, n)
    assert report["float32_bytes"] == 4 * n and report["bfloat16_bytes"] == 2 * n


def test_memory_report_matches_the_quantized_tree(params, nf4_tree):
    report = quant.memory_report(params)
    assert report == quant.memory_report(sftjax.param_shapes(CFG))  # shapes alone suffice
    assert report["params"] == CFG.num_params() and report["float32_bytes"] == 4 * CFG.num_params()
    assert report["nf4_dq_bytes"] == quant.tree_bytes(nf4_tree)
    assert report["int4_dq_bytes"] == quant.tree_bytes(quant.quantize_params(params, "int4", True))
    assert report["nf4_bytes"] == quant.tree_bytes(quant.quantize_params(params, "nf4", False))
    kernels = [x for path, x in jax.tree_util.tree_flatten_with_path(params["layers"])[0] if path[-1].key == "kernel"]
    assert report["quantized_params"] == sum(x.size for x in kernels)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the parameter


def _tree(kernel):
    return {"layers": {"mlp": {"down_proj": {"kernel": kernel}}}}


@pytest.mark.parametrize("kernel, kind, message", [
    (np.ones((2, 3, 5, 1), np.float32), "nf4",
     "layers/mlp/down_proj/kernel: shape (2, 3, 5, 1) is not an [in, out] or layer-stacked [L, in, out] kernel"),
    (np.ones((2, 3, 5), np.int32), "nf4",
     "layers/mlp/down_proj/kernel: dtype int32 is not a float type; only float weights can be quantized"),
    (np.ones((2, 0, 5), np.float32), "nf4", "layers/mlp/down_proj/kernel: shape (2, 0, 5) has no elements"),
    (np.where(np.arange(30).reshape(2, 3, 5) == 17, np.nan, 1.0).astype(np.float32), "nf4",
     ("layers/mlp/down_proj/kernel (layer 1): 1 of 15 values are not finite (nan/inf) in float32; 4-bit codes "
      "need finite weights")),
    (np.ones((2, 3, 5), np.float32), "nf8", "quantize_params: unknown quantization kind 'nf8' (kinds: nf4, int4)"),
])
def test_bad_input_is_one_line_naming_the_parameter(kernel, kind, message):
    with pytest.raises(ConfigError) as e:
        quant.quantize_params(_tree(kernel), kind, double_quant=True)
    assert str(e.value) == message and "\n" not in message


def test_bad_weight_and_shape_mismatch():
    with pytest.raises(ConfigError, match=r"^weight: shape \(15,\) is not a 2-D \[out, in\] weight$"):
        quant.quantize_weight(np.ones(15, np.float32))
    with pytest.raises(ConfigError, match=r"^w: 1 of 6 values are not finite"):
        quant.quantize_weight(np.array([[1, 2, 3], [4, np.inf, 6]], np.float32), name="w")
    q = quant.quantize_weight(np.ones((3, 5), np.float32))  # odd counts are supported, as in bitsandbytes
    with pytest.raises(ConfigError, match=r"^qkernel codes \(8,\) do not hold a \[4, 5\] weight$"):
        quant.dequantize(q, (4, 5), jnp.float32)
