"""4-bit blockwise quantization of the frozen base (QLoRA), bit-exact with bitsandbytes 0.50 on CPU.

A quantized kernel ("qkernel") is a plain dict of arrays holding one torch-order weight W [out, in] (the transpose
of an sftjax kernel [in, out]), flattened row-major to n = out * in values, in blocks of BLOCK_SIZE = 64:

    codes          uint8   [ceil(n/2)]        4-bit codes, two per byte, the first element in the high nibble
    table          float32 [16]               code -> value in [-1, 1] (NF4_TABLE or INT4_TABLE)
    shape          int32   [2]                (out, in): a tree can be dequantized without the model config
    absmax         float32 [nb]               nb = ceil(n / 64): max |w| of each block    (without double quant.)
  or, with double quantization (DQ):
    absmax_codes   uint8   [nb]               absmax - offset, quantized with DYNAMIC_MAP in blocks of 256
    absmax_scale   float32 [ceil(nb / 256)]
    absmax_offset  float32 []                 the mean of the absmax values

    w[i] = table[code[i]] * absmax[i // 64]
    absmax[j] = DYNAMIC_MAP[absmax_codes[j]] * absmax_scale[j // 256] + absmax_offset          (DQ)

In a model tree every array gains a leading L axis (layers are stacked), e.g. codes [L, ceil(n/2)].

Quantization, as bitsandbytes' `quantize_4bit` (its default backend, which is what runs on CPU):
  1. absmax of each block of 64; the last block may be partial and has its own absmax.
  2. full blocks: s = x * (1 / max(absmax, 1e-38)); the partial block: s = x / max(absmax, 1e-38) (bnb computes
     the two differently, and stores the partial block's absmax after the floor); s clamped to [-1, 1].
  3. code = the number of table midpoints strictly below s (torch.bucketize): the nearest value, a tie going to
     the lower code. An odd n is padded with s = 0 (code(0.0) in the last low nibble), as bnb pads.
Double quantization, as bitsandbytes' `quantize_blockwise(absmax - offset, blocksize=256)` (native CPU kernel):
  4. offset = mean(absmax) = float32 sum / nb, the sum in the order of torch's CPU kernel run on one thread
     (above 32768 blocks torch splits the sum over threads, so bnb's own offset varies with the thread count).
  5. per block of 256 of c = absmax - offset: scale = max |c|; v = clamp(c * (1 / scale), -1, 1); code =
     LUT[trunc(((v + 1) * 0.5) * 65535 + 0.5)], LUT[i] = the DYNAMIC_MAP value nearest to -1 + 2i / 65535 (all
     in float32). A block of zeros gets scale 0 and codes 0. (bnb's CUDA kernel searches the map exactly instead
     and averages on the GPU: on CUDA a few absmax codes and the offset's last bit can differ from these.)
int4 (not in bitsandbytes) is symmetric linear: value(code) = (code - 8) / 7, quantized by the same rule as NF4
(the nearest table value, i.e. round(7 x / absmax) + 8, codes 1..15); code 0 (-8/7) is never produced.

Bits per parameter (QLoRA paper, section 3), for n a multiple of 64 * 256:
    without DQ: 4 + 32 / 64 = 4.5            with DQ: 4 + 8 / 64 + 32 / (64 * 256) = 4.127
plus, per matrix, the table (64 bytes), the shape (8) and with DQ the offset (4), which the byte counts of
`memory_report` and `bits_per_parameter` include: 4096 x 4096 with DQ is 4.12699 bits per weight.

The 4-bit codes are computed by jax on the device (a 1B model takes seconds) with exact float32 operations only;
the double quantization (1/64 of the data) runs on the host in numpy, where torch's summation order can be
replayed. Dequantization is jax.numpy, traceable under jit/scan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError

BLOCK_SIZE = 64  # weights per absmax (QLoRA paper, section 3; bitsandbytes' default blocksize)
DQ_BLOCK_SIZE = 256  # absmax values per fp32 scale under double quantization (QLoRA paper, section 3)
KINDS = ("nf4", "int4")

# bitsandbytes `get_4bit_type("nf4")`: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (index 7).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
INT4_TABLE = ((np.arange(16) - 8) / 7).astype(np.float32)  # code 0 (-8/7) is never produced
_TABLES = {"nf4": NF4_TABLE, "int4": INT4_TABLE}

_ABSMAX_FLOOR = np.float32(1e-38)  # bnb divides by max(absmax, 1e-38): a block of zeros maps to code(0.0)
_LUT_SIZE = 65536  # bins of [-1, 1] in bnb's CPU 8-bit quantizer


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes' signed 8-bit dynamic map


def _linspace_fma(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32 as torch's AVX2 / AVX-512 CPU kernels compute it.

    The compiler fuses start + step * i into one multiply-add (a single rounding); torch's DEFAULT (no SIMD)
    kernel rounds twice and differs in 42 of the 256 map values, so bnb's map depends on the CPU build too.
    """
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(steps - 1)  # float32
    i = np.arange(steps)
    # float64 holds step * i and the sum exactly (24-bit step times a small integer), so one rounding to float32
    # at the end is the fused multiply-add; torch fills the first half from start and the second from end.
    low = (np.float64(s) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(e) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, low, high)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes `create_dynamic_map(signed=True)`: 256 sorted float32 values in [-0.993, 1].

    For exponent e = 0..6, 2**e values 10**(e - 6) * (midpoints of linspace(0.1, 1, 2**e + 1)) and their
    negatives (254 values), plus 0 and 1.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        bounds = _linspace_fma(0.1, 1.0, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)  # float32
        scale = np.float32(10.0 ** (e - 6))
        values += list(scale * means) + list(-scale * means)
    return np.sort(np.array(values, np.float32))


DYNAMIC_MAP = _dynamic_map()  # float32 [256]


def _dynamic_lut() -> np.ndarray:
    """uint8 [65536]: bin i of [-1, 1] (centre -1 + 2i / 65535) -> the nearest DYNAMIC_MAP code (bnb's CPU LUT)."""
    midpoints = np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])
    bins = np.arange(_LUT_SIZE, dtype=np.float32)
    centres = np.float32(-1.0) + (np.float32(2.0) * bins) / np.float32(_LUT_SIZE - 1)  # float32, as bnb
    return np.searchsorted(midpoints, centres, side="left").astype(np.uint8)  # midpoints strictly below the centre


_DYNAMIC_LUT = _dynamic_lut()


# ----------------------------------------------------------------------------------------------------------------
# Quantization: 4-bit codes on the device (jax), double quantization on the host (numpy)


def _table(kind: str, name: str) -> np.ndarray:
    if kind not in _TABLES:
        raise ConfigError(f"{name}: unknown quantization kind {kind!r} (kinds: {', '.join(KINDS)})")
    return _TABLES[kind]


def _check_weight(w: Any, name: str, ndims: tuple[int, ...] = (2,)) -> None:
    """One line naming the weight unless w is a non-empty float array with ndims dimensions."""
    shape = tuple(np.shape(w))
    if len(shape) not in ndims:
        expected = "a 2-D [out, in] weight" if ndims == (2,) else "an [in, out] or layer-stacked [L, in, out] kernel"
        raise ConfigError(f"{name}: shape {shape} is not {expected}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ConfigError(f"{name}: dtype {w.dtype} is not a float type; only float weights can be quantized")
    if math.prod(shape) == 0:
        raise ConfigError(f"{name}: shape {shape} has no elements")


@jax.jit
def _quantize_codes(w: jax.Array, table: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """W [out, in] -> (packed codes uint8 [ceil(n/2)], absmax float32 [nb], number of non-finite values []).

    Steps 1-3 of the module docstring. Only exact float32 operations (max, one division, one product, clamp,
    comparisons), so the codes do not depend on the backend. A block of zeros gets s = 0 directly (bnb: 0 times
    1 / 1e-38), since backends that flush denormals would turn 1e-38 into 0 (a block whose absmax is itself
    denormal, < 1.2e-38, can still differ there). The partial block's stored absmax is floored at 1e-38 on the
    host (`quantize_weight`).
    """
    x = w.astype(jnp.float32).reshape(-1)  # [n], row-major
    n = x.shape[0]
    full = n - n % BLOCK_SIZE
    blocks = x[:full].reshape(-1, BLOCK_SIZE)  # [nb_full, 64]
    absmax = jnp.abs(blocks).max(axis=1)  # [nb_full]
    reciprocal = 1.0 / jnp.where(absmax > 0, absmax, 1.0)
    scaled = [jnp.where(absmax[:, None] > 0, blocks * reciprocal[:, None], 0.0).reshape(-1)]
    if full < n:  # the partial last block: true division (as bnb)
        last = jnp.abs(x[full:]).max()
        scaled.append(jnp.where(last > 0, x[full:] / jnp.where(last > 0, last, 1.0), 0.0))
        absmax = jnp.append(absmax, last)
    s = jnp.clip(jnp.concatenate(scaled), -1.0, 1.0)
    s = jnp.pad(s, (0, n % 2))  # an odd n: the last byte's low nibble is code(0.0), as bnb pads
    midpoints = (table[:-1] + table[1:]) / 2.0  # [15], float32
    # the number of midpoints strictly below s (torch.bucketize): the nearest value, a tie going to the lower code
    codes = jnp.searchsorted(midpoints, s, side="left", method="compare_all").astype(jnp.uint8)  # [2 ceil(n/2)]
    packed = (codes[0::2] << 4) | codes[1::2]  # first element in the high nibble
    return packed, absmax, jnp.sum(~jnp.isfinite(x))


def _torch_cpu_sum(x: np.ndarray) -> np.float32:
    """sum(x) of float32 [m] in float32, in the order of torch's CPU cascade sum (one thread, 8 lanes).

    torch (aten/src/ATen/native/cpu/SumKernel.cpp) sums a contiguous row as 8-lane vectors, 4 rows of vectors at
    a time, each in up to 4 levels of partial sums (a level holds 2**p consecutive partial sums of the level
    below, p = max(4, ceil(log2(rows)) // 4)); then the scalar tail and the 8 lanes in order. Each addition is
    rounded to float32, so the result depends on this order; bnb's offset is this sum / m.
    """
    lanes = 8 if x.size >= 8 else 1
    vectors = x.size // lanes
    total = _row_sum(x[:vectors * lanes].reshape(vectors, lanes))  # [lanes]
    final = np.float32(0.0)
    for value in (*x[vectors * lanes:], *total):  # the scalar tail, then the lanes in order
        final = np.float32(final + value)
    return final


def _row_sum(rows: np.ndarray) -> np.ndarray:
    """torch `row_sum`: rows [m, lanes] -> [lanes], as 4 interleaved cascades (rows i, i+1, i+2, i+3)."""
    m = rows.shape[0] // 4
    partial = _cascade(rows[:m * 4].reshape(m, 4, rows.shape[1]))  # [4, lanes]
    for row in rows[m * 4:]:
        partial[0] = partial[0] + row
    for k in range(1, 4):
        partial[0] = partial[0] + partial[k]
    return partial[0]


def _cascade(rows: np.ndarray) -> np.ndarray:
    """torch `multi_row_sum`: rows [m, ...] -> [...], summed in levels of 2**p rows (see `_torch_cpu_sum`)."""
    m, levels = rows.shape[0], 4
    power = max(4, (int(m - 1).bit_length() if m > 2 else 1) // levels)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((levels,) + rows.shape[1:], np.float32)
    i = 0
    while i + step <= m:
        acc[0] = np.add.accumulate(rows[i:i + step], axis=0)[-1]  # left to right, from 0
        i += step
        for j in range(1, levels):  # carry into the next level; stop at the first level that is not full
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0.0
            if i & (mask << (j * power)):
                break
    for row in rows[i:]:
        acc[0] = acc[0] + row
    for j in range(1, levels):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _quantize_dynamic(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [m] -> (uint8 codes [m], scale float32 [ceil(m / 256)]): bnb's CPU `quantize_blockwise`."""
    m = x.size
    nbb = -(-m // DQ_BLOCK_SIZE)
    blocks = np.pad(x, (0, nbb * DQ_BLOCK_SIZE - m)).reshape(nbb, DQ_BLOCK_SIZE)  # zero padding keeps the max
    scale = np.abs(blocks).max(axis=1)  # [nbb]
    inverse = np.float32(1.0) / np.where(scale == 0, np.float32(1.0), scale)
    v = np.clip(blocks * inverse[:, None], -1.0, 1.0)
    bins = (((v + np.float32(1.0)) * np.float32(0.5)) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)).astype(np.int64)
    codes = np.where(scale[:, None] == 0, 0, _DYNAMIC_LUT[bins]).astype(np.uint8)
    return codes.reshape(-1)[:m], scale


def _double_quantize(absmax: np.ndarray) -> dict[str, np.ndarray]:
    """absmax float32 [nb] -> {absmax_codes [nb], absmax_scale [ceil(nb / 256)], absmax_offset []}."""
    offset = np.float32(_torch_cpu_sum(absmax) / np.float32(absmax.size))
    codes, scale = _quantize_dynamic(absmax - offset)
    return {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": np.asarray(offset, np.float32)}


def quantize_weight(w: np.ndarray | jax.Array, kind: str = "nf4", double_quant: bool = True, *,
                    name: str = "weight") -> dict[str, jax.Array]:
    """Quantize one torch-order weight W [out, in] (any float dtype, read as float32) to a qkernel.

    The codes and constants equal bitsandbytes' `quantize_4bit(W, blocksize=64, quant_type="nf4",
    compress_statistics=double_quant)` (the module docstring lists every rule). `name` prefixes error messages.
    """
    table = _table(kind, name)
    _check_weight(w, name)
    codes, absmax, bad = _quantize_codes(jnp.asarray(w), jnp.asarray(table))
    if int(bad):
        raise ConfigError(f"{name}: {int(bad)} of {math.prod(np.shape(w))} values are not finite (nan/inf) in "
                          "float32; 4-bit codes need finite weights")
    absmax = np.array(absmax)  # [nb] on the host: the double quantization below sums in torch's order
    if math.prod(np.shape(w)) % BLOCK_SIZE:
        absmax[-1] = max(absmax[-1], _ABSMAX_FLOOR)  # bnb stores the partial block's absmax after its floor
    q = {"codes": codes, "table": table, "shape": np.array(np.shape(w), np.int32)}
    q.update(_double_quantize(absmax) if double_quant else {"absmax": absmax})
    return {k: jnp.asarray(v) for k, v in q.items()}


# ----------------------------------------------------------------------------------------------------------------
# Dequantization (jax.numpy: traceable, shapes static)

def _absmax(q: Mapping[str, jax.Array], nb: int) -> jax.Array:
    """float32 [nb]: the per-block absmax, stored or rebuilt from its 8-bit codes (+ offset)."""
    if "absmax" in q:
        return jnp.asarray(q["absmax"], jnp.float32)
    nbb = -(-nb // DQ_BLOCK_SIZE)
    values = jnp.asarray(DYNAMIC_MAP)[q["absmax_codes"]]  # [nb]
    values = jnp.pad(values, (0, nbb * DQ_BLOCK_SIZE - nb)).reshape(nbb, DQ_BLOCK_SIZE)
    # bnb rounds the product, then adds the offset; under jit XLA may fuse the two into one FMA (1 ulp apart).
    scaled = values * jnp.asarray(q["absmax_scale"], jnp.float32)[:, None]
    return (scaled + jnp.asarray(q["absmax_offset"], jnp.float32)).reshape(-1)[:nb]


def _code_values(q: Mapping[str, jax.Array], n: int) -> jax.Array:
    """float32 [n]: the table value of each of the first n 4-bit codes (before the per-block absmax)."""
    codes = q["codes"]  # [ceil(n / 2)] uint8: two 4-bit codes per byte, the high nibble first
    nibbles = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)[:n]  # [n], each < 16
    # A 16-entry lookup per value: on XLA:CPU faster than looking up the byte's pair of values in a [256, 2] table
    # (experiments/bench/README.md, "Design measurements"). The codes are < 16, so no bounds check is needed.
    return jnp.asarray(q["table"], jnp.float32).at[nibbles].get(mode="promise_in_bounds")


def dequantize(q: Mapping[str, jax.Array], shape: tuple[int, int], dtype) -> jax.Array:
    """qkernel of one weight -> W [out, in] = shape, computed in float32 and cast to dtype at the end."""
    out_features, in_features = shape
    n = out_features * in_features
    nb = -(-n // BLOCK_SIZE)
    if q["codes"].shape != ((n + 1) // 2,):
        raise ConfigError(f"qkernel codes {q['codes'].shape} do not hold a [{out_features}, {in_features}] weight")
    values = jnp.pad(_code_values(q, n), (0, nb * BLOCK_SIZE - n)).reshape(nb, BLOCK_SIZE)
    w = (values * _absmax(q, nb)[:, None]).reshape(-1)[:n]
    return w.reshape(out_features, in_features).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Parameter trees

Targets = Callable[[tuple[str, ...]], bool]


def decoder_linears(module: tuple[str, ...]) -> bool:
    """Default targets: every Dense kernel under `layers` (embeddings, norms, biases and lm_head stay float)."""
    return module[:1] == ("layers",)


def quantize_params(params: Mapping[str, Any], kind: str, double_quant: bool,
                    targets: Targets | None = None) -> dict[str, Any]:
    """A new tree where each targeted `kernel` ([L, in, out] stacked, or [in, out]) becomes a `qkernel`.

    targets(module path, e.g. ("layers", "self_attn", "q_proj")) -> bool; default `decoder_linears`. Layer i
    is quantized as the torch weight kernel[i].T, so its codes equal bitsandbytes' for that weight; the arrays
    of all layers are stacked on a leading L axis.
    """
    targets = targets or decoder_linears
    _table(kind, "quantize_params")  # an unknown kind fails before any work

    def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        new = {k: visit(v, (*path, k)) if isinstance(v, Mapping) else v for k, v in node.items()}
        if "kernel" in new and not isinstance(new["kernel"], Mapping) and targets(path):
            new["qkernel"] = _quantize_kernel(new.pop("kernel"), kind, double_quant, "/".join((*path, "kernel")))
        return new

    return visit(params, ())


def _quantize_kernel(kernel: Any, kind: str, double_quant: bool, name: str) -> dict[str, jax.Array]:
    """kernel [L, in, out] or [in, out] -> qkernel with arrays [L, ...] or [...]."""
    _check_weight(kernel, name, ndims=(2, 3))
    if np.ndim(kernel) == 2:
        return quantize_weight(kernel.T, kind, double_quant, name=name)
    layers = [quantize_weight(kernel[i].T, kind, double_quant, name=f"{name} (layer {i})")
              for i in range(kernel.shape[0])]
    return {k: jnp.stack([q[k] for q in layers]) for k in layers[0]}


def dequantize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `quantize_params`: each `qkernel` becomes a float32 `kernel` [L, in, out] (or [in, out])."""
    def visit(node: Mapping[str, Any]) -> dict[str, Any]:
        new = {k: v if k == "qkernel" or not isinstance(v, Mapping) else visit(v) for k, v in node.items()}
        if "qkernel" in new:
            new["kernel"] = _dequantize_kernel(new.pop("qkernel"))
        return new

    return visit(params)


def _dequantize_kernel(q: Mapping[str, Any]) -> jax.Array:
    """qkernel (stacked or not) -> float32 kernel [L, in, out] or [in, out]."""
    out_features, in_features = (int(d) for d in np.asarray(q["shape"]).reshape(-1, 2)[0])

    def one(layer: Mapping[str, jax.Array]) -> jax.Array:  # [in, out]
        return dequantize(layer, (out_features, in_features), jnp.float32).T

    return jax.vmap(one)(q) if np.ndim(q["codes"]) == 2 else one(q)


# ----------------------------------------------------------------------------------------------------------------
# Memory accounting (pure functions of shapes)


def tree_bytes(tree: Any) -> int:
    """Bytes of all array leaves (arrays or jax.ShapeDtypeStruct)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bits_per_parameter(qkernel: Mapping[str, Any], n: int) -> float:
    """Storage bits per weight of a qkernel holding n weights (every array counted, the per-matrix ones too)."""
    return 8 * tree_bytes(qkernel) / n


def qkernel_layout(shape: tuple[int, int], double_quant: bool,
                   layers: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays `quantize_params` makes for a weight [out, in] = shape (stacked on L when layers is given)."""
    n = math.prod(shape)
    nb = -(-n // BLOCK_SIZE)
    lead = () if layers is None else (layers,)

    def spec(*dims: int, dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((*lead, *dims), dtype)

    layout = {"codes": spec((n + 1) // 2, dtype=jnp.uint8), "table": spec(16, dtype=jnp.float32),
              "shape": spec(2, dtype=jnp.int32)}
    if double_quant:
        layout.update(absmax_codes=spec(nb, dtype=jnp.uint8),
                      absmax_scale=spec(-(-nb // DQ_BLOCK_SIZE), dtype=jnp.float32),
                      absmax_offset=spec(dtype=jnp.float32))
    else:
        layout["absmax"] = spec(nb, dtype=jnp.float32)
    return layout


def memory_report(params: Mapping[str, Any], targets: Targets | None = None) -> dict[str, int | float]:
    """Bytes of a float base tree (arrays or ShapeDtypeStructs) in each storage format, from shapes alone.

    float32_bytes / bfloat16_bytes: every parameter at 4 / 2 bytes. nf4_dq_bytes (= int4_dq_bytes) and
    nf4_bytes (no DQ): the tree `quantize_params` returns (targeted kernels quantized, every other leaf in its
    own dtype), so they equal `tree_bytes(quantize_params(params, ...))`. dq_bits_per_param / bits_per_param:
    storage bits per quantized weight with / without DQ.
    """
    targets = targets or decoder_linears
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    total = quantized = kept = dq = plain = 0
    for path, leaf in flat:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        size = math.prod(leaf.shape)
        total += size
        if keys[-1] == "kernel" and targets(keys[:-1]) and len(leaf.shape) in (2, 3):
            layers, shape = (None, leaf.shape[::-1]) if len(leaf.shape) == 2 else (leaf.shape[0], leaf.shape[:0:-1])
            quantized += size
            dq += tree_bytes(qkernel_layout(shape, True, layers))
            plain += tree_bytes(qkernel_layout(shape, False, layers))
        else:
            kept += size * jnp.dtype(leaf.dtype).itemsize
    return {
        "params": total,
        "quantized_params": quantized,
        "float32_bytes": 4 * total,
        "bfloat16_bytes": 2 * total,
        "nf4_dq_bytes": kept + dq,
        "int4_dq_bytes": kept + dq,
        "nf4_bytes": kept + plain,
        "dq_bits_per_param": 8 * dq / quantized if quantized else 0.0,
        "bits_per_param": 8 * plain / quantized if quantized else 0.0,
    }
