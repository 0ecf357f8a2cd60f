"""Hugging Face checkpoints: a local directory <-> (ModelConfig, params).

A directory holds config.json and either model.safetensors or model.safetensors.index.json plus its shards.
Names map one to one (torch Linear weights are [out, in]; sftjax kernels are [in, out]; layer tensors are
stacked on a leading L axis):

    model.embed_tokens.weight                     embed_tokens/embedding
    model.layers.{i}.self_attn.q_proj.weight      layers/self_attn/q_proj/kernel[i].T   (also k, v, o; .bias)
    model.layers.{i}.self_attn.q_norm.weight      layers/self_attn/q_norm/scale[i]      (Qwen3; also k_norm)
    model.layers.{i}.mlp.gate_proj.weight         layers/mlp/gate_proj/kernel[i].T      (also up, down; .bias)
    model.layers.{i}.input_layernorm.weight       layers/input_layernorm/scale[i]       (also post_attention_)
    model.norm.weight                             norm/scale
    lm_head.weight                                lm_head/kernel.T                      (untied only)

Loading checks the set of tensors exactly: a missing, extra or misshapen tensor is an error naming the file and
the tensor. Nothing is downloaded and nothing is unpickled (pytorch_model.bin is refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sftjax.errors import CheckpointError, ConfigError
from sftjax.model import safetensors_io
from sftjax.model.config import DTYPES, PRESETS, ModelConfig, load_hf_config, to_hf_dict
from sftjax.model.transformer import Params, init_params, param_shapes

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Non-parameter buffers that some older checkpoints carry: skipped, never an error.
_BUFFERS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}


def _entries(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, bool, int | None]]:
    """(param path, HF name, transpose?, layer index or None) for every HF tensor of this config."""
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    for key_path, _ in flat:
        path = tuple(k.key for k in key_path)
        leaf = _LEAF_NAMES[path[-1]]
        transpose = path[-1] == "kernel"
        if path[0] == "layers":
            for i in range(cfg.num_layers):
                yield path, ".".join(("model", "layers", str(i), *path[1:-1], leaf)), transpose, i
        elif path[0] == "lm_head":
            yield path, f"lm_head.{leaf}", transpose, None
        else:
            yield path, ".".join(("model", *path[:-1], leaf)), transpose, None


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """The names of all tensors an HF checkpoint of this config holds."""
    return [name for _, name, _, _ in _entries(cfg)]


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} cannot be honoured (supported: {', '.join(DTYPES)})")
    return dtype


def read_tensors(path: str | Path) -> dict[str, tuple[np.ndarray, Path]]:
    """{name: (array, file it came from)} of a single-file or sharded safetensors checkpoint."""
    path = Path(path)
    index, single = path / _INDEX, path / _SINGLE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (needs a JSON object with 'weight_map')") \
                from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"{index}: shard name {name!r} must be a file name in the same directory")
            if not (path / name).is_file():
                raise CheckpointError(f"{index}: shard {name!r} is listed but {path / name} does not exist")
    elif single.is_file():
        weight_map, files = None, [_SINGLE]
    else:
        found = "pytorch_model.bin (pickle, refused)" if (path / "pytorch_model.bin").exists() else "neither"
        raise CheckpointError(f"{path}: no {_SINGLE} or {_INDEX} (found {found})")
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for name in files:
        file = path / name
        for tensor_name, array in safetensors_io.load_file(file).items():
            if tensor_name in tensors:
                raise CheckpointError(f"{file}: tensor {tensor_name!r} is also stored in {tensors[tensor_name][1]}")
            if weight_map is not None and weight_map.get(tensor_name) != name:
                raise CheckpointError(f"{file}: tensor {tensor_name!r} is not listed for this shard in {index}")
            tensors[tensor_name] = (array, file)
    if weight_map is not None:
        for tensor_name, name in weight_map.items():
            if tensor_name not in tensors:
                raise CheckpointError(f"{path / name}: tensor {tensor_name!r} listed in {index} is not in the file")
    return tensors


def params_from_hf(cfg: ModelConfig, tensors: dict[str, tuple[np.ndarray, Path]], source: Path) -> Params:
    """Assemble the sftjax parameter tree from HF tensors, checking names and shapes exactly."""
    shapes = param_shapes(cfg)
    expected = set()
    stacks: dict[tuple[str, ...], list[np.ndarray | None]] = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    dtype = NP_DTYPES[cfg.param_dtype]
    for path, name, transpose, layer in _entries(cfg):
        expected.add(name)
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name!r} (config.json describes a {cfg.family} model "
                                  f"with {cfg.num_layers} layers)")
        array, file = tensors[name]
        want = _leaf(shapes, path).shape[1:] if layer is not None else _leaf(shapes, path).shape
        got = array.shape[::-1] if transpose else array.shape
        if got != want:
            hf_want = want[::-1] if transpose else want
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(array.shape)}, expected "
                                  f"{list(hf_want)} from config.json")
        if not np.issubdtype(array.dtype, np.floating) and array.dtype != ml_dtypes.bfloat16:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {array.dtype}, expected a float dtype "
                                  f"(quantized checkpoints are not loaded here)")
        value = np.asarray(array.T if transpose else array).astype(dtype)
        if layer is None:
            flat[path] = value
        else:
            stacks.setdefault(path, [None] * cfg.num_layers)[layer] = value
    for name, (_, file) in tensors.items():
        if name in expected or _BUFFERS.match(name):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: transformers ignores a stored lm_head as well
        raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of a {cfg.family} model with this "
                              f"config.json)")
    flat.update({path: np.stack(layers) for path, layers in stacks.items()})
    params: Params = {}
    for path, value in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value)
    return params


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def load_pretrained(path: str | Path, dtype: str = "float32", *, seed: int = 0) -> tuple[ModelConfig, Params]:
    """(cfg, params) from a local HF directory, or random weights for a built-in preset name (see PRESETS).

    dtype sets both the parameter and the compute dtype: float32, bfloat16 or float16.
    """
    _check_dtype(dtype)
    directory = Path(path)
    if not directory.exists() and str(path) in PRESETS:
        cfg = PRESETS[str(path)].replace(dtype=dtype, param_dtype=dtype)
        return cfg, init_params(cfg, jax.random.key(seed))
    if not directory.is_dir():
        presets = ", ".join(PRESETS)
        raise CheckpointError(f"{path}: no such model directory (nor a built-in preset: {presets})")
    cfg = load_hf_config(directory).replace(dtype=dtype, param_dtype=dtype)
    return cfg, params_from_hf(cfg, read_tensors(directory), directory)


# ----------------------------------------------------------------------------------------------------------------
# Saving


def params_to_hf(cfg: ModelConfig, params: Params, dtype: str | None = None) -> dict[str, np.ndarray]:
    """{HF name: numpy array in torch layout}, in `dtype` (default: cfg.param_dtype)."""
    np_dtype = NP_DTYPES[_check_dtype(dtype or cfg.param_dtype)]
    host = jax.device_get(params)
    out = {}
    for path, name, transpose, layer in _entries(cfg):
        value = np.asarray(_leaf(host, path))
        value = value[layer] if layer is not None else value
        out[name] = np.ascontiguousarray((value.T if transpose else value).astype(np_dtype))
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ConfigError(f"max_shard_size {size!r}: expected bytes as an int or a string like '5GB' or '500MB'")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_pretrained(path: str | Path, cfg: ModelConfig, params: Params, *, dtype: str | None = None,
                    max_shard_size: int | str = "5GB", overwrite: bool = False,
                    extra_files: tuple[Path, ...] = ()) -> None:
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_size) to `path`.

    transformers' `from_pretrained(path)` loads the result. An existing checkpoint at `path` is only replaced
    with overwrite=True; files are written to a temporary directory first, so a failure leaves `path` as it was.
    extra_files (e.g. the tokenizer's) are copied in with the checkpoint.
    """
    directory = Path(path)
    check_writable(directory, overwrite)
    save_dtype = _check_dtype(dtype or cfg.param_dtype)
    tensors = params_to_hf(cfg, params, save_dtype)
    hf_config = to_hf_dict(cfg.replace(param_dtype=save_dtype))
    generation = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
                  "eos_token_id": hf_config["eos_token_id"]}
    write_checkpoint(directory, tensors, hf_config, generation=generation, max_shard_size=max_shard_size,
                     extra_files=extra_files)


def check_writable(directory: Path, overwrite: bool) -> None:
    """Refuse to write over a checkpoint (config.json or model*) unless overwrite, or over a non-directory."""
    existing = [p.name for p in directory.glob("*") if p.name == "config.json" or p.name.startswith("model")] \
        if directory.is_dir() else []
    if existing and not overwrite:
        raise CheckpointError(f"{directory}: already holds a checkpoint ({', '.join(sorted(existing))}); "
                              f"pass overwrite=True to replace it")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")


def write_checkpoint(directory: Path, tensors: dict[str, np.ndarray], hf_config: dict, *,
                     generation: dict | None = None, max_shard_size: int | str = "5GB",
                     extra_files: tuple[Path, ...] = ()) -> None:
    """Write HF tensors {name: array in torch layout} as safetensors (sharded above max_shard_size), config.json
    and, if given, generation_config.json into `directory`, atomically (see `staged`); shards of an older
    checkpoint that the new set does not replace are deleted. Callers check `check_writable` first."""
    shards = _shards(tensors, _parse_size(max_shard_size))
    with staged(directory, extra_files, stale="model*.safetensors*") as staging:
        metadata = {"format": "pt"}  # transformers refuses safetensors files without it
        if len(shards) == 1:
            safetensors_io.save_file(tensors, staging / _SINGLE, metadata)
        else:
            weight_map = {}
            for i, names in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                safetensors_io.save_file({n: tensors[n] for n in names}, staging / file, metadata)
                weight_map.update({n: file for n in names})
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
            (staging / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if generation is not None:
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@contextlib.contextmanager
def staged(directory: Path, extra_files: tuple[Path, ...] = (), stale: str | None = None) -> Iterator[Path]:
    """Yield an empty staging directory beside `directory`; when the block succeeds, copy `extra_files` in and
    move every staged file into `directory` (created if needed), first deleting the files matching the glob
    `stale` that the new set does not replace (a shorter list of shards, a pickled file of an older tool).
    A failure inside the block leaves `directory` untouched."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.tmp-") as tmp:
        staging = Path(tmp)
        yield staging
        for file in extra_files:
            shutil.copyfile(file, staging / Path(file).name)
        directory.mkdir(exist_ok=True)
        for old in directory.glob(stale) if stale else ():
            if not (staging / old.name).exists():
                old.unlink()
        for file in staging.iterdir():
            os.replace(file, directory / file.name)

__all__ = ["load_pretrained", "save_pretrained", "read_tensors", "params_from_hf", "params_to_hf",
           "hf_tensor_names", "check_writable", "write_checkpoint"]
