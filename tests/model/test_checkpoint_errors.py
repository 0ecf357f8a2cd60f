"""Bad checkpoints and bad arguments: one clear line naming the file and the tensor or key; nothing overwritten."""

import json
import shutil

import jax
import numpy as np
import pytest

import sftjax
from sftjax.model import safetensors_io
from sftjax.model.hf import hf_tensor_names, read_tensors

CFG = sftjax.PRESETS["tiny-llama"].replace(num_layers=2, vocab_size=64, hidden_size=32, intermediate_size=48,
                                           num_heads=2, num_kv_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    sftjax.save_pretrained(directory, CFG, sftjax.init_params(CFG, jax.random.key(0)))
    return directory


def _copy(good, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(good, target)
    return target


def _rewrite(directory, edit):
    file = directory / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_io.load_file(file).items()}
    edit(tensors)
    safetensors_io.save_file(tensors, file, {"format": "pt"})
    return file


def _one_line(info):
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(sftjax.CheckpointError, match="no such model directory") as info:
        sftjax.load_pretrained(tmp_path / "nope")
    assert "tiny-llama" in _one_line(info)  # lists the presets
    with pytest.raises(sftjax.ConfigError, match=r"config.json: not found"):
        sftjax.load_pretrained(tmp_path)


def test_unsupported_model_type(good, tmp_path):
    d = _copy(good, tmp_path)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, "model_type": "phi3"}))
    with pytest.raises(sftjax.ConfigError, match=r"config.json: model_type 'phi3' is not supported"):
        sftjax.load_pretrained(d)


def test_missing_weights_file_and_pickle_refused(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(sftjax.CheckpointError, match=r"no model.safetensors .* pytorch_model.bin \(pickle, refused\)"):
        sftjax.load_pretrained(d)


def test_missing_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(sftjax.CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'") as info:
        sftjax.load_pretrained(d)
    assert str(d) in _one_line(info)


def test_extra_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    file = _rewrite(d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((48, 32), np.float32)}))
    with pytest.raises(sftjax.CheckpointError, match=r"unexpected tensor 'model.layers.2.mlp.up_proj.weight'") as info:
        sftjax.load_pretrained(d)
    assert _one_line(info).startswith(str(file))


def test_misshapen_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    file = _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
    with pytest.raises(sftjax.CheckpointError) as info:
        sftjax.load_pretrained(d)
    assert _one_line(info) == (f"{file}: tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 32], "
                               f"expected [16, 32] from config.json")


def test_integer_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.zeros((32,), np.int32)}))
    with pytest.raises(sftjax.CheckpointError, match=r"'model.norm.weight' has dtype int32, expected a float"):
        sftjax.load_pretrained(d)


def test_known_buffers_are_ignored(good, tmp_path):
    """Older Llama checkpoints store rotary_emb.inv_freq buffers: not parameters, not an error."""
    d = _copy(good, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    sftjax.load_pretrained(d)


def test_corrupt_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken json!!!}")
    with pytest.raises(sftjax.CheckpointError, match=r"model.safetensors: not a safetensors file"):
        sftjax.load_pretrained(d)
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(sftjax.CheckpointError, match=r"shorter than 8 bytes"):
        sftjax.load_pretrained(d)


def test_truncated_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(sftjax.CheckpointError, match=r"data offsets .* do not match"):
        sftjax.load_pretrained(d)


def test_sharded_index_errors(good, tmp_path):
    d = _copy(good, tmp_path)
    names = hf_tensor_names(CFG)
    (d / "model.safetensors").rename(d / "part-1.safetensors")
    index = {"weight_map": {n: "part-1.safetensors" for n in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(read_tensors(d)) == set(names)
    index["weight_map"]["model.norm.weight"] = "part-2.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(sftjax.CheckpointError, match=r"shard 'part-2.safetensors' is listed but .* does not exist"):
        sftjax.load_pretrained(d)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(sftjax.CheckpointError, match=r"must be a file name in the same directory"):
        sftjax.load_pretrained(d)


def test_dtype_that_cannot_be_honoured(good):
    for dtype in ("float64", "int8", "fp4"):
        with pytest.raises(sftjax.ConfigError, match=rf"dtype '{dtype}' cannot be honoured"):
            sftjax.load_pretrained(good, dtype=dtype)


def test_save_refuses_to_overwrite(good, tmp_path):
    d = _copy(good, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    params = sftjax.init_params(CFG, jax.random.key(1))
    with pytest.raises(sftjax.CheckpointError, match=r"already holds a checkpoint .* overwrite=True"):
        sftjax.save_pretrained(d, CFG, params)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    sftjax.save_pretrained(d, CFG, params, overwrite=True)
    _, loaded = sftjax.load_pretrained(d)
    np.testing.assert_array_equal(loaded["norm"]["scale"], params["norm"]["scale"])
    np.testing.assert_array_equal(loaded["layers"]["mlp"]["up_proj"]["kernel"],
                                  params["layers"]["mlp"]["up_proj"]["kernel"])
    assert not list(tmp_path.glob(".model.tmp-*"))  # the staging directory is cleaned up


def test_overwrite_from_sharded_to_single_leaves_no_stale_shards(tmp_path):
    params = sftjax.init_params(CFG, jax.random.key(2))
    sftjax.save_pretrained(tmp_path, CFG, params, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sftjax.save_pretrained(tmp_path, CFG, params, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]


def test_safetensors_io_matches_the_reference_library(tmp_path):
    """Our reader/writer and the safetensors package read each other's files (bf16 via torch)."""
    import ml_dtypes
    import safetensors.numpy
    import safetensors.torch
    import torch

    ours = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
            "c": np.array([0.5, 1.5, -3.0], ml_dtypes.bfloat16)}
    safetensors_io.save_file(ours, tmp_path / "ours.safetensors", {"format": "pt"})
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    np.testing.assert_array_equal(theirs["a"].numpy(), ours["a"])
    assert theirs["c"].dtype == torch.bfloat16 and theirs["c"].float().tolist() == [0.5, 1.5, -3.0]
    safetensors.numpy.save_file({"x": np.ones((2, 2), np.float16)}, tmp_path / "theirs.safetensors")
    np.testing.assert_array_equal(safetensors_io.load_file(tmp_path / "theirs.safetensors")["x"], np.ones((2, 2)))
