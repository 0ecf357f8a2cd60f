"""LoRA: low-rank adapters on the model's linear layers, as a separate parameter tree.

    W x  ->  W x + scale * B A dropout(x),   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

In sftjax a Dense kernel is [in, out], so an adapter is lora_a [in, R] and lora_b [R, out], stacked on L like
every layer parameter. The adapter tree mirrors the model tree and holds only adapters (and the modules made fully
trainable, e.g. embeddings for added tokens):

    layers/self_attn/q_proj/{lora_a [L, D, R], lora_b [L, R, N*H]}   ...one per targeted module
    embed_tokens/embedding [V, D]                                      when trainable_modules has embed_tokens

`merge_params(frozen, adapters)` (sftjax.train.state) is the tree the model runs: each targeted Dense then holds
kernel (or qkernel) plus lora_a / lora_b. The model itself knows only kernels: `model_config(cfg, spec)` gives it
the linear plug-in that reads and applies the adapters with this spec's scale and dropout
(`sftjax.peft.adapted`).

Targets follow PEFT's rules, applied to the HF module names `model.layers.{i}.self_attn.q_proj`: a list matches a
module whose name equals an entry or ends with "." + entry; a single string other than "all-linear" is a regular
expression that must match the whole name; "all-linear" is every linear layer of the decoder (not lm_head).
Adapters are stacked over layers, so a target must select a module kind in every layer or in none.

Initialisation as PEFT: B = 0 (the adapted model starts equal to the base); A kaiming-uniform with a = sqrt(5),
i.e. U(-1/sqrt(in), 1/sqrt(in)) (init "kaiming"), or N(0, 1/r) (init "gaussian").
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.errors import ConfigError
from sftjax.model.config import ModelConfig
from sftjax.model.transformer import Params, param_shapes
from sftjax.peft import quant
from sftjax.peft.adapted import AdaptedLinear
from sftjax.peft.spec import ALL_LINEAR, INITS, TRAINABLE_MODULES, LoraSpec  # noqa: F401 (re-exported; JAX-free)

Module = tuple[str, ...]  # a Dense module's path in the param tree, e.g. ("layers", "self_attn", "q_proj")


def model_config(cfg: ModelConfig, spec: LoraSpec | None = None) -> ModelConfig:
    """The model settings under which Dense layers apply their adapters (and 4-bit kernels) with this spec's scale
    and dropout. spec None: for a tree with 4-bit kernels and no adapters (a quantized base alone; adapters in it
    are refused)."""
    if spec is None:
        return cfg.replace(linear=AdaptedLinear())
    spec.check()
    return cfg.replace(linear=AdaptedLinear(spec.scale, spec.dropout))


# ----------------------------------------------------------------------------------------------------------------
# Targets


def linear_modules(cfg: ModelConfig) -> list[Module]:
    """The Dense modules of the decoder layers, in tree order (lm_head is not a Dense: it may tie embeddings)."""
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg)["layers"])[0]
    return [("layers", *(k.key for k in path[:-1])) for path, _ in flat if path[-1].key == "kernel"]


def hf_module_name(module: Module, layer: int) -> str:
    """("layers", "self_attn", "q_proj"), 3 -> "model.layers.3.self_attn.q_proj" (the HF / PEFT module name)."""
    return ".".join(("model", "layers", str(layer), *module[1:]))


def _matches(name: str, targets: tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(cfg: ModelConfig, target_modules: tuple[str, ...] | list[str] | str) -> list[Module]:
    """The modules that get adapters; ConfigError (one line) if none match or a match is not in every layer."""
    modules = linear_modules(cfg)
    if target_modules == ALL_LINEAR:
        return modules
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ConfigError(f"method.lora.target_modules={target_modules!r}: not a regular expression ({e})") \
                from None
    else:
        target_modules = tuple(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ConfigError(f"method.lora.target_modules={list(target_modules)!r}: give module names, a regex "
                              "or all-linear")
    selected = []
    for module in modules:
        layers = [i for i in range(cfg.num_layers) if _matches(hf_module_name(module, i), target_modules)]
        if layers and len(layers) != cfg.num_layers:
            raise ConfigError(f"method.lora.target_modules={target_modules!r}: selects {module[-1]} in layers "
                              f"{layers} of {cfg.num_layers}; adapters are stacked over layers, so select a module "
                              "kind in every layer or in none")
        if layers:
            selected.append(module)
    if not selected:
        available = ", ".join(m[-1] for m in modules)
        raise ConfigError(f"method.lora.target_modules={target_modules!r} matches no module; available: "
                          f"{available} (names as in model.layers.0.self_attn.q_proj), or all-linear")
    return selected


def subtree(tree: Params, path: Module) -> Any:
    """tree[path[0]][path[1]]...: the node at a module path."""
    for key in path:
        tree = tree[key]
    return tree


def with_subtree(tree: Params, path: Module, value: Any) -> Params:
    """A copy of the dict tree with tree[path] = value (the containers on the path are copied)."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: with_subtree(tree.get(path[0], {}), path[1:], value)}


def _pop(tree: Params, path: Module) -> Params:
    """A copy of the dict tree without tree[path]; emptied containers are dropped."""
    rest = {k: v for k, v in tree.items() if k != path[0]}
    if len(path) > 1:
        inner = _pop(tree[path[0]], path[1:])
        if inner:
            rest[path[0]] = inner
    return rest


# ----------------------------------------------------------------------------------------------------------------
# Adapters


def check_spec(cfg: ModelConfig, spec: LoraSpec) -> list[Module]:
    """Validate the spec against the model; return the targeted modules."""
    spec.check()
    for name in spec.trainable_modules:
        if name == "lm_head" and cfg.tie_word_embeddings:
            raise ConfigError("method.lora.trainable_modules: lm_head is tied to embed_tokens in this model; "
                              "train embed_tokens instead")
    targets = select_targets(cfg, spec.target_modules)
    shapes = param_shapes(cfg)
    for module in targets:
        _, d_in, d_out = subtree(shapes, module)["kernel"].shape
        if spec.rank > min(d_in, d_out):
            raise ConfigError(f"method.lora.rank={spec.rank}: larger than {'/'.join(module)} allows "
                              f"(kernel {d_in} x {d_out}: rank <= {min(d_in, d_out)})")
    return targets


def init_adapters(cfg: ModelConfig, spec: LoraSpec, rng: jax.Array) -> Params:
    """Fresh float32 adapters for every targeted module: lora_a per spec.init, lora_b = 0."""
    adapters: Params = {}
    shapes = param_shapes(cfg)
    for index, module in enumerate(check_spec(cfg, spec)):
        L, d_in, d_out = subtree(shapes, module)["kernel"].shape
        key = jax.random.fold_in(rng, index)
        if spec.init == "kaiming":  # torch kaiming_uniform_(a=sqrt(5)) on a [R, in] weight: bound 1 / sqrt(in)
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (L, d_in, spec.rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(key, (L, d_in, spec.rank), jnp.float32) / spec.rank
        b = jnp.zeros((L, spec.rank, d_out), jnp.float32)
        adapters = with_subtree(adapters, module, {"lora_a": a, "lora_b": b})
    return adapters


def split(params: Params, spec: LoraSpec, adapters: Params) -> tuple[Params, Params]:
    """(frozen, trainable): the base without its fully trained modules; those modules plus the adapters."""
    frozen, trainable = params, adapters
    for name in spec.trainable_modules:
        if name in params:
            frozen = _pop(frozen, (name,))
            trainable = {**trainable, name: jax.tree.map(lambda x: x.astype(jnp.float32), params[name])}
    return frozen, trainable


def without_adapters(tree: Params) -> Params:
    """The tree with every lora_a / lora_b left out: what the model computes with its adapters switched off (the
    reference policy of DPO under LoRA; nothing is copied)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: without_adapters(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}  # no empty modules left


def adapter_modules(params: Params) -> list[Module]:
    """The Dense modules of a (merged or adapter) tree that hold lora_a / lora_b."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [tuple(k.key for k in path[:-1]) for path, _ in flat if path[-1].key == "lora_a"]


def count(tree: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------------
# Merging


def _kind(qkernel: dict) -> str:
    """"nf4" or "int4": the code table of a (layer-stacked) quantized kernel."""
    table = np.asarray(qkernel["table"]).reshape(-1, 16)[0]
    return "nf4" if np.array_equal(table, quant.NF4_TABLE) else "int4"


def merge(params: Params, scale: float, requantize: bool = False) -> tuple[Params, dict[str, float]]:
    """Fold every adapter of `params` (a merged tree) into its kernel: W + scale * A B, computed in float32.

    A quantized kernel is dequantized first (merging into 4-bit codes directly would lose the update: peft #1043)
    and the result is a float kernel in float32. With requantize=True the merged kernel is quantized again in the
    base's format. Returns (params without adapters, {module: relative re-quantization error}), where the error is
    ||Q(W') - W'|| / ||W'|| of the merged weight (empty unless the base was quantized).
    """
    errors: dict[str, float] = {}
    for module in adapter_modules(params):
        node = dict(subtree(params, module))
        a, b = node.pop("lora_a"), node.pop("lora_b")
        delta = scale * jnp.einsum("LiR,LRo->Lio", a.astype(jnp.float32), b.astype(jnp.float32))
        if "qkernel" in node:
            qkernel = node.pop("qkernel")
            kernel = quant.dequantize_params({"k": {"qkernel": qkernel}})["k"]["kernel"] + delta
            requant = quant.quantize_params({"k": {"kernel": kernel}}, _kind(qkernel), "absmax_codes" in qkernel,
                                            targets=lambda _: True)
            back = quant.dequantize_params(requant)["k"]["kernel"]
            errors["/".join(module)] = float(jnp.linalg.norm(back - kernel) / jnp.linalg.norm(kernel))
            if requantize:
                node["qkernel"] = requant["k"]["qkernel"]
            else:
                node["kernel"] = kernel
        else:
            kernel = node["kernel"]
            node["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        params = with_subtree(params, module, node)
    return params, errors
