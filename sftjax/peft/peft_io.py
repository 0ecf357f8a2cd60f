"""PEFT LoRA adapters on disk (huggingface/peft's format) <-> (LoraSpec, adapter tree).

A directory holds adapter_config.json and adapter_model.safetensors (a pickled adapter_model.bin is refused).
Tensor names carry PEFT's prefix P = "base_model.model." (the PeftModel wraps the HF model) and no adapter name
("default" is stripped on save). Torch Linear weights are [out, in]; sftjax kernels are [in, out], stacked on L:

    P model.layers.{i}.self_attn.q_proj.lora_A.weight [R, in]   layers/self_attn/q_proj/lora_a[i].T  (each Dense)
    P model.layers.{i}.self_attn.q_proj.lora_B.weight [out, R]  layers/self_attn/q_proj/lora_b[i].T
    P model.embed_tokens.weight  [V, D]  embed_tokens/embedding  modules_to_save entry "embed_tokens"
    P lm_head.weight             [V, D]  lm_head/kernel.T        modules_to_save entry "lm_head"
    P model.norm.weight          [D]     norm/scale              modules_to_save entry "model.norm"

PEFT matches modules_to_save by a plain suffix test (`name.endswith(entry)`, no dot), so "norm" would also copy
every layer's input_layernorm / q_norm; the final norm is written as "model.norm". With tied embeddings a trained
embed_tokens is also the output layer: we write ensure_weight_tying=true (PEFT then wraps lm_head with the same
trained copy; it needs lm_head.weight in the file) and store lm_head.weight = embed_tokens.weight, as PEFT itself
does. An adapter whose PEFT output layer stays the base embedding (ensure_weight_tying false and no lm_head.weight,
which is what PEFT saves by default) cannot be expressed by a tied sftjax model and is refused.

adapter_config.json (what we write; loading reads the same keys, other keys are ignored unless they change the math):

    peft_type "LORA", task_type "CAUSAL_LM", r R, lora_alpha, lora_dropout, use_rslora (scale alpha / sqrt(R)),
    target_modules [names of adapted modules, e.g. "q_proj"] (PEFT: a list of name suffixes or one full-match regex),
    modules_to_save, bias "none", fan_in_fan_out false, init_lora_weights (true | "gaussian"), use_dora false,
    lora_bias false, rank_pattern {}, alpha_pattern {}, ensure_weight_tying, inference_mode true,
    layers_to_transform null, layers_pattern null, base_model_name_or_path

Refused on load, each with one line naming the file and key or tensor: another peft_type or task, a bias,
per-module ranks or alphas, DoRA and other LoRA variants, initialisations that rewrite the base weights when PEFT
loads the adapter (PiSSA, OLoRA, CorDA, LoftQ), and tensors that do not fit the model (unknown module, layer out of
range, wrong shape, lora_A without lora_B, adapters in only some layers: sftjax stacks adapters over layers).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import CheckpointError, ConfigError
from sftjax.model import hf, safetensors_io
from sftjax.model.config import DTYPES, ModelConfig
from sftjax.model.transformer import Params, param_shapes
from sftjax.peft import lora
from sftjax.peft.lora import LoraSpec, Module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # torch.save output: unpickling runs code, never read
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
# PEFT's modules_to_save entry for each module sftjax can train fully (see the module docstring for "model.norm").
SAVE_NAMES = {"embed_tokens": "embed_tokens", "lm_head": "lm_head", "norm": "model.norm"}
_LORA_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
# init_lora_weights values that only initialise A and B (the file holds their trained values) -> LoraSpec.init
_INITS = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "orthogonal": "kaiming", "eva": "kaiming"}
_REWRITES_BASE = ("pissa", "olora", "corda", "loftq")  # PEFT changes the base weights when loading these
# adapter_config.json keys that must be false / empty: each changes what the adapter computes.
_UNSUPPORTED = {
    "rank_pattern": "per-module ranks are not supported (adapters are stacked over layers with one rank r)",
    "alpha_pattern": "per-module alphas are not supported (one scale for every adapter)",
    "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters are for Conv1D layers (GPT-2), which sftjax models do not have",
    "lora_bias": "a bias on lora_B is not supported",
    "layer_replication": "layer replication is not supported",
    "trainable_token_indices": "trainable token indices are not supported (train embed_tokens fully instead)",
    "target_parameters": "adapters on parameters (MoE experts) are not supported",
    "alora_invocation_tokens": "activated LoRA is not supported",
    "use_qalora": "QA-LoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "kasa_config": "the KaSA variant is not supported",
    "velora_config": "the VeLoRA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "arrow_config": "Arrow routing is not supported",
}


# ----------------------------------------------------------------------------------------------------------------
# Names


def full_modules(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], str, bool]]:
    """{module: (param path, HF tensor name, transpose?)} of the modules this model can train fully."""
    return {path[0]: (path, name, transpose) for path, name, transpose, layer in hf._entries(cfg)
            if layer is None and path[0] in lora.TRAINABLE_MODULES}


def lora_name(module: Module, layer: int, half: str) -> str:
    """("layers", "self_attn", "q_proj"), 0, "A" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    return f"{PREFIX}{lora.hf_module_name(module, layer)}.lora_{half}.weight"


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _check_trainable(cfg: ModelConfig, spec: LoraSpec, trainable: Params) -> tuple[list[Module], list[str]]:
    """(adapted modules, fully trained modules) of `trainable`, checked against the spec and the model's shapes."""
    targets = lora.check_spec(cfg, spec)
    found = lora.adapter_modules(trainable)
    if set(found) != set(targets):
        raise ConfigError(f"save_adapter: the trainable tree has adapters on {['/'.join(m) for m in found]} but "
                          f"target_modules={spec.target_modules!r} selects {['/'.join(m) for m in targets]}")
    shapes = param_shapes(cfg)
    for module in targets:
        L, d_in, d_out = lora.subtree(shapes, module)["kernel"].shape
        node = lora.subtree(trainable, module)
        for key, want in (("lora_a", (L, d_in, spec.rank)), ("lora_b", (L, spec.rank, d_out))):
            if tuple(node[key].shape) != want:
                raise ConfigError(f"save_adapter: {'/'.join(module)}/{key} has shape {list(node[key].shape)}, "
                                  f"expected {list(want)}")
    full = [name for name in lora.TRAINABLE_MODULES if name in trainable]
    extra = set(trainable) - set(full) - {"layers"}
    if extra or set(full) != set(spec.trainable_modules):
        raise ConfigError(f"save_adapter: the trainable tree's full modules {sorted(set(trainable) - {'layers'})} "
                          f"differ from trainable_modules={list(spec.trainable_modules)}")
    return targets, full


def adapter_config(cfg: ModelConfig, spec: LoraSpec, targets: list[Module], full: list[str],
                   base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json that PEFT's LoraConfig reads back as this spec."""
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else float(spec.alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": [m[-1] for m in targets],
        "modules_to_save": [SAVE_NAMES[name] for name in full] or None,
        "ensure_weight_tying": cfg.tie_word_embeddings and "embed_tokens" in full,
        "init_lora_weights": True if spec.init == "kaiming" else spec.init,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True,
    }


def adapter_tensors(cfg: ModelConfig, trainable: Params, targets: list[Module], full: list[str],
                    dtype: str) -> dict[str, np.ndarray]:
    """{PEFT name: array in torch layout}: lora_A [R, in] and lora_B [out, R] per layer; full modules as HF
    stores them."""
    np_dtype = hf.NP_DTYPES[dtype]
    host = jax.device_get(trainable)
    out = {}
    for module in targets:
        node = lora.subtree(host, module)
        for layer in range(cfg.num_layers):
            out[lora_name(module, layer, "A")] = np.asarray(node["lora_a"][layer]).T  # [in, R] -> [R, in]
            out[lora_name(module, layer, "B")] = np.asarray(node["lora_b"][layer]).T  # [R, out] -> [out, R]
    modules = full_modules(cfg)
    for name in full:
        path, hf_name, transpose = modules[name]
        value = np.asarray(lora.subtree(host, path))
        out[PREFIX + hf_name] = value.T if transpose else value
    if cfg.tie_word_embeddings and "embed_tokens" in full:  # PEFT stores the tied output layer too
        out[PREFIX + "lm_head.weight"] = out[PREFIX + modules["embed_tokens"][1]]
    return {name: np.ascontiguousarray(value.astype(np_dtype)) for name, value in out.items()}


def save_adapter(directory: str | Path, cfg: ModelConfig, spec: LoraSpec, trainable: Params,
                 base_model_name_or_path: str | None = None, *, dtype: str = "float32", overwrite: bool = False,
                 extra_files: tuple[Path, ...] = ()) -> None:
    """Write `trainable` (adapters + fully trained modules, see lora.split) as a PEFT adapter directory.

    `peft.PeftModel.from_pretrained(hf_model, directory)` loads it. dtype (float32 | bfloat16 | float16) is the
    storage dtype of the tensors. A non-empty `directory` is only written into with overwrite=True; files are
    staged in a temporary directory beside it first, so a failure leaves it as it was. extra_files (e.g. the
    tokenizer's) are copied in.
    """
    directory = Path(directory)
    if dtype not in DTYPES:
        raise ConfigError(f"save_adapter: dtype {dtype!r} cannot be honoured (supported: {', '.join(DTYPES)})")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    existing = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if existing and not overwrite:
        raise CheckpointError(f"{directory}: not empty ({', '.join(existing[:5])}); pass overwrite=True to write "
                              "the adapter into it")
    targets, full = _check_trainable(cfg, spec, trainable)
    config = adapter_config(cfg, spec, targets, full, base_model_name_or_path)
    tensors = adapter_tensors(cfg, trainable, targets, full, dtype)
    with hf.staged(directory, extra_files, stale=PICKLE_FILE) as staging:  # a stale adapter of another run
        safetensors_io.save_file(tensors, staging / WEIGHTS_FILE, {"format": "pt"})  # PEFT/transformers want it
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

# ----------------------------------------------------------------------------------------------------------------
# Loading


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, checked for what changes the adapter's math (one-line ConfigError)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")

    def bad(key: str, why: str):
        raise ConfigError(f"{path}: {key}={config.get(key)!r}: {why}")

    if config.get("peft_type") != "LORA":
        bad("peft_type", "only LoRA adapters are supported (peft_type \"LORA\")")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        bad("task_type", "only causal-LM adapters are supported (task_type \"CAUSAL_LM\")")
    if config.get("bias", "none") != "none":
        bad("bias", "trained biases are not supported (bias \"none\")")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            bad(key, why)
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        bad("r", "must be a positive integer")
    if "lora_alpha" not in config:
        bad("lora_alpha", "missing")
    for key, low, high in (("lora_alpha", 0.0, math.inf), ("lora_dropout", 0.0, 1.0)):
        value = config.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
            bad(key, f"must be a number in [{low}, {high})")
    if not isinstance(config.get("use_rslora", False), bool):
        bad("use_rslora", "must be true or false")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        bad("init_lora_weights", "PEFT rewrites the base weights when it loads this adapter; convert it to a plain "
                                 "LoRA adapter first (PEFT: save_pretrained(path_initial_model_for_weight_conversion))")
    if not isinstance(init, (bool, str)) or init not in _INITS:
        bad("init_lora_weights", f"not supported (supported: {', '.join(map(repr, _INITS))})")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        bad("target_modules", "must be a list of module names or one regular expression")
    saves = config.get("modules_to_save")
    if saves is not None and not (isinstance(saves, list) and all(isinstance(t, str) and t for t in saves)):
        bad("modules_to_save", "must be a list of module names")
    return config


def _files(directory: Path) -> tuple[Path, Path]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such adapter directory")
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    if not weights.is_file():
        found = f"{PICKLE_FILE} (pickle, refused: re-save it as safetensors)" if (directory / PICKLE_FILE).exists() \
            else "neither"
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (found {found})")
    return config, weights


def _sort_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], file: Path, rank: int, saves: list[str]
                  ) -> tuple[dict[Module, dict[tuple[int, str], np.ndarray]], dict[str, np.ndarray]]:
    """({module: {(layer, "A" | "B"): array}}, {full module: array}) with every name and shape checked."""
    shapes = param_shapes(cfg)
    by_name = {".".join(m[1:]): m for m in lora.linear_modules(cfg)}  # "self_attn.q_proj" -> module
    full_by_name = {name: module for module, (_, name, _) in full_modules(cfg).items()}
    base_names = set(hf.hf_tensor_names(cfg))
    adapters: dict[Module, dict[tuple[int, str], np.ndarray]] = {}
    full: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if not np.issubdtype(array.dtype, np.floating) and array.dtype != hf.NP_DTYPES["bfloat16"]:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {array.dtype}, expected a float dtype")
        inner = name.removeprefix(PREFIX)
        if name == inner:
            raise CheckpointError(f"{file}: tensor {name!r} does not start with {PREFIX!r} (not a PEFT adapter of a "
                                  "causal LM)")
        match = _LORA_NAME.fullmatch(inner)
        if match:
            layer, module_name, half = int(match[1]), match[2], match[3]
            if module_name not in by_name:
                raise CheckpointError(f"{file}: tensor {name!r}: this {cfg.family} model has no linear module "
                                      f"{module_name!r} (has {', '.join(by_name)})")
            if layer >= cfg.num_layers:
                raise CheckpointError(f"{file}: tensor {name!r}: layer {layer}, but the model has {cfg.num_layers} "
                                      "layers (an adapter for another model?)")
            module = by_name[module_name]
            _, d_in, d_out = lora.subtree(shapes, module)["kernel"].shape
            want = (rank, d_in) if half == "A" else (d_out, rank)
            if array.shape != want:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(array.shape)}, expected {list(want)} "
                                      f"(r={rank} from {CONFIG_FILE}, {module_name} is {d_in} -> {d_out})")
            adapters.setdefault(module, {})[(layer, half)] = array
        elif ".lora_" in inner:
            raise CheckpointError(f"{file}: tensor {name!r}: sftjax adapts only the linear layers of the decoder "
                                  "(lora_A.weight / lora_B.weight on model.layers.{i}.*)")
        elif inner == "lm_head.weight" and cfg.tie_word_embeddings:
            full["lm_head"] = array  # PEFT's copy of the tied output layer (checked in _check_full)
        elif inner in full_by_name:
            module_path = (PREFIX + inner).removesuffix(".weight")
            if not any(module_path.endswith(entry) for entry in saves):  # PEFT's own matching rule
                raise CheckpointError(f"{file}: tensor {name!r} is not a module listed in modules_to_save {saves}")
            full[full_by_name[inner]] = array
        elif inner in base_names:
            raise CheckpointError(f"{file}: tensor {name!r}: a fully trained copy (modules_to_save) of a module "
                                  "sftjax cannot train fully (only embed_tokens, lm_head and the final model.norm)")
        else:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} (not a LoRA weight or a module of this "
                                  f"{cfg.family} model)")
    return adapters, full


def _check_complete(cfg: ModelConfig, adapters: dict[Module, dict[tuple[int, str], np.ndarray]], file: Path) -> None:
    """Every adapted module has lora_A and lora_B in every layer (adapters are stacked over layers)."""
    for module, halves in adapters.items():
        layers = sorted({layer for layer, _ in halves})
        for layer in layers:
            for half, other in (("A", "B"), ("B", "A")):
                if (layer, half) not in halves:
                    raise CheckpointError(f"{file}: missing tensor {lora_name(module, layer, half)!r} "
                                          f"(its lora_{other} is present)")
        if len(layers) != cfg.num_layers:
            missing = next(i for i in range(cfg.num_layers) if i not in layers)
            raise CheckpointError(f"{file}: missing tensor {lora_name(module, missing, 'A')!r}: {module[-1]} has "
                                  f"adapters in layers {layers} of {cfg.num_layers}; sftjax stacks adapters over "
                                  "layers, so it needs them in every layer (layers_to_transform is not supported)")


def _check_full(cfg: ModelConfig, full: dict[str, np.ndarray], config: dict, file: Path, config_file: Path) -> None:
    """Shapes of the fully trained modules, and the tied-embedding rules (see the module docstring)."""
    shapes = param_shapes(cfg)
    modules = full_modules(cfg)
    for name, (path, hf_name, transpose) in modules.items():
        if name in full:
            want = lora.subtree(shapes, path).shape
            want = want[::-1] if transpose else want
            if full[name].shape != want:
                hint = " (vocabulary resized? resize the base model first)" if name != "norm" else ""
                raise CheckpointError(f"{file}: tensor {PREFIX + hf_name!r} has shape {list(full[name].shape)}, "
                                      f"expected {list(want)}{hint}")
    if not cfg.tie_word_embeddings:
        return
    head = f"{PREFIX}lm_head.weight"
    if "lm_head" in full and "embed_tokens" not in full:
        raise CheckpointError(f"{file}: tensor {head!r}: lm_head is tied to embed_tokens in this model, and the "
                              "adapter does not train embed_tokens")
    if "lm_head" in full and not np.array_equal(full["lm_head"], full["embed_tokens"]):
        raise CheckpointError(f"{file}: tensor {head!r} differs from the trained embed_tokens, but lm_head is tied "
                              "to embed_tokens in this model")
    # PEFT's output layer is the trained embedding if it ties the copies or loads the stored lm_head over the base
    if "embed_tokens" in full and "lm_head" not in full and not config.get("ensure_weight_tying", False):
        raise ConfigError(f"{config_file}: ensure_weight_tying=false and no {head} with embed_tokens in "
                          "modules_to_save on a model with tied embeddings: PEFT then keeps lm_head at the base "
                          "embedding, which a tied sftjax model cannot express")


def _spec_targets(cfg: ModelConfig, config: dict, found: list[Module], config_file: Path, file: Path):
    """LoraSpec.target_modules: the config's, checked to select exactly the modules that have tensors."""
    targets = config.get("target_modules")
    if targets is None or config.get("exclude_modules"):  # the tensors decide; LoraSpec has no exclusions
        return tuple(m[-1] for m in found)
    targets = targets if isinstance(targets, str) else tuple(targets)
    try:
        selected = lora.select_targets(cfg, targets)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: target_modules: {e}") from None
    for module in selected:
        if module not in found:
            raise CheckpointError(f"{file}: missing tensor {lora_name(module, 0, 'A')!r} (target_modules="
                                  f"{config['target_modules']!r} in {CONFIG_FILE} selects {module[-1]})")
    for module in found:
        if module not in selected:
            raise CheckpointError(f"{file}: tensor {lora_name(module, 0, 'A')!r}: {module[-1]} is not selected by "
                                  f"target_modules={config['target_modules']!r} in {CONFIG_FILE}")
    return targets


def load_adapter(directory: str | Path, cfg: ModelConfig) -> tuple[LoraSpec, Params]:
    """(spec, adapters) of a PEFT LoRA adapter directory for the model `cfg` describes.

    adapters holds float32 lora_a [L, in, R] / lora_b [L, R, out] per adapted Dense and the fully trained modules;
    run the model as forward(lora.model_config(cfg, spec), merge_params(base_params, adapters), tokens).
    """
    config_file, file = _files(Path(directory))
    config = read_config(config_file)
    rank = config["r"]
    saves = config.get("modules_to_save") or []
    by_module, full = _sort_tensors(cfg, safetensors_io.load_file(file), file, rank, saves)
    if not by_module:
        raise CheckpointError(f"{file}: no lora_A / lora_B tensors")
    _check_complete(cfg, by_module, file)
    _check_full(cfg, full, config, file, config_file)
    found = [m for m in lora.linear_modules(cfg) if m in by_module]  # tree order
    modules = full_modules(cfg)  # a tied model's stored lm_head copy is not a module of its own
    spec = LoraSpec(rank=rank, alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                    target_modules=_spec_targets(cfg, config, found, config_file, file),
                    rslora=config.get("use_rslora", False), init=_INITS[config.get("init_lora_weights", True)],
                    trainable_modules=tuple(m for m in lora.TRAINABLE_MODULES if m in full and m in modules))
    adapters: Params = {}
    for module in found:
        halves = by_module[module]
        a = np.stack([halves[(i, "A")].T for i in range(cfg.num_layers)])  # [L, in, R]
        b = np.stack([halves[(i, "B")].T for i in range(cfg.num_layers)])  # [L, R, out]
        adapters = lora.with_subtree(adapters, module, {"lora_a": jnp.asarray(a, jnp.float32),
                                                "lora_b": jnp.asarray(b, jnp.float32)})
    for name in spec.trainable_modules:
        path, _, transpose = modules[name]
        value = full[name].T if transpose else full[name]
        adapters = lora.with_subtree(adapters, path, jnp.asarray(value, jnp.float32))
    return spec, adapters


__all__ = ["adapter_config", "adapter_tensors", "full_modules", "load_adapter", "read_config", "save_adapter"]
