"""experiments/memory/simulate.py on tiny-llama over the 4 forced host devices (tests/conftest.py): FSDP holds a
quarter of data-parallel's parameters and optimizer state per device, the per-device bytes computed from the
shardings are what XLA passes the compiled step, temporaries are reported, and the abstract QLoRA base has the
shapes and dtypes of the real quantized one."""

import importlib.util
from pathlib import Path

import jax
import pytest

from sftjax.model.config import preset
from sftjax.model.transformer import init_params, param_shapes
from sftjax.peft import quant

SIMULATE = Path(__file__).resolve().parents[1] / "experiments" / "memory" / "simulate.py"
DEVICES = 4
SEQ_LEN = 64  # short rows keep the compiles to seconds


def _simulate():
    spec = importlib.util.spec_from_file_location("simulate", SIMULATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def simulate():
    assert jax.device_count() >= DEVICES, "tests/conftest.py forces 4 host devices"
    return _simulate()


def test_fsdp_holds_a_quarter_of_the_state(simulate):
    cfg = preset("tiny-llama")
    data = simulate.measure(cfg, "full", DEVICES, "data", SEQ_LEN)
    fsdp = simulate.measure(cfg, "full", DEVICES, "fsdp", SEQ_LEN)
    held = lambda m: m["parameters"] + m["optimizer"]  # noqa: E731
    # Data-parallel: the whole float32 model and AdamW's mu and nu on every device.
    assert data["parameters"] == 4 * cfg.num_params()
    assert data["optimizer"] >= 2 * data["parameters"]
    # FSDP: a quarter, plus the arrays too small to split (norm scales: MIN_SPLIT), which stay whole.
    ratio = held(fsdp) / held(data)
    assert 0.25 <= ratio < 0.27, ratio
    for m in (data, fsdp):
        # XLA's per-device arguments are the shards counted from the shardings, + step (int32) and rng (uint32 [2]).
        assert m["argument"] == held(m) + m["batch"] + 12, m
        assert m["temporaries"] > 0
        assert m["alias"] > 0  # the donated state's outputs reuse its buffers
        assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temporaries"]


def test_lora_and_qlora_trees(simulate):
    cfg = preset("tiny-llama")
    full = simulate.measure(cfg, "full", DEVICES, "data", SEQ_LEN)
    lora = simulate.measure(cfg, "lora", DEVICES, "data", SEQ_LEN)
    qlora = simulate.measure(cfg, "qlora", DEVICES, "data", SEQ_LEN)
    assert lora["trainable"] == qlora["trainable"] < full["trainable"] / 4
    assert lora["frozen"] == 2 * cfg.num_params()  # bfloat16 base
    assert qlora["frozen"] < lora["frozen"] / 2  # linears at ~4 bits, the rest bfloat16
    assert qlora["temporaries"] > 0


def test_abstract_quantize_matches_quantize_params(simulate):
    cfg = preset("tiny-llama").replace(param_dtype="bfloat16")
    real = quant.quantize_params(init_params(cfg, jax.random.key(0)), "nf4", double_quant=True)
    abstract = simulate.abstract_quantize(param_shapes(cfg))
    shape = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)  # noqa: E731
    assert shape(abstract) == shape(real)
