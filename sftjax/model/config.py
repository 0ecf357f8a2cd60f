"""ModelConfig: one frozen dataclass describing a Llama-family decoder, and its round trip to HF `config.json`.

Families (HF `model_type`) and what sets them apart:
  llama    Llama 2 / 3 / 3.1 / 3.2: RoPE (optionally Llama-3 scaled), optional attention / MLP bias, tied or not.
  mistral  Llama plus a sliding attention window.
  qwen2    bias on q/k/v (not on o); optional sliding window on the upper layers.
  qwen3    RMSNorm on each query / key head (before RoPE); explicit head_dim.
  gemma    GeGLU (tanh GELU), embeddings scaled by sqrt(D), RMSNorm weight used as (1 + w), tied embeddings.

Axis letters used across sftjax.model: B batch, T query positions, S key positions, D model width, N query heads,
K key/value heads, G = N // K query heads per key/value head, H head width, F feed-forward width, V vocabulary,
L layers.

The config also holds the runtime policy (dtype, param_dtype, scan_layers, remat, attention_block, padding_free,
dropout_rate, linear). These are not part of the architecture and never reach config.json, except `param_dtype`,
written as the checkpoint's `torch_dtype`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sftjax.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_BLOCK = 128  # query rows per causal block of training attention, by default (attention.causal_attention)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
}

# HF class defaults for keys a config.json may omit (transformers 5.x `configuration_<family>.py`).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1,
                  eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False, head_dim=None),
    "mistral": dict(max_position_embeddings=4096 * 32, tie_word_embeddings=False, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, pad_token_id=None, num_key_value_heads=8,
                    sliding_window=4096, head_dim=None),
    "qwen2": dict(max_position_embeddings=32768, tie_word_embeddings=False, hidden_act="silu", bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, num_key_value_heads=32, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, head_dim=None),
    "qwen3": dict(max_position_embeddings=32768, tie_word_embeddings=False, hidden_act="silu", bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, num_key_value_heads=32, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, head_dim=128, attention_bias=False),
    "gemma": dict(max_position_embeddings=8192, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                  bos_token_id=2, eos_token_id=1, pad_token_id=0, num_key_value_heads=16, head_dim=256,
                  attention_bias=False),
}
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder plus the dtype / memory policy used to run it."""

    family: str = "llama"  # HF model_type: llama | mistral | qwen2 | qwen3 | gemma
    vocab_size: int = 512  # V
    hidden_size: int = 128  # D
    intermediate_size: int = 384  # F
    num_layers: int = 4  # L
    num_heads: int = 4  # N (query heads)
    num_kv_heads: int = 2  # K (key/value heads; N % K == 0; K == N is MHA, K == 1 is MQA)
    head_dim: int = 32  # H (may differ from D // N: Qwen3, Gemma)
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # gate activation of the MLP; Gemma uses the tanh GELU
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens
    # RoPE
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0  # linear and llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3
    # family switches
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) instead of w (Gemma)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(D) (Gemma)
    sliding_window: int | None = None  # attend to at most this many previous positions (Mistral, Qwen2 option)
    first_sliding_layer: int = 0  # layers before this one attend globally (Qwen2 max_window_layers)
    # special tokens (informational: generation stops at eos_token_ids)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # runtime policy (not architecture)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = True  # lax.scan over layers: compile time stays flat as depth grows
    remat: str = "none"  # none | full (recompute each layer) | dots (save matmul outputs only)
    attention_block: int = ATTENTION_BLOCK  # training attention: queries in causal blocks of this many rows
    padding_free: bool = False  # objectives pass `sft.token_index`: the layers skip the padding slots
    dropout_rate: float = 0.0  # dropout on each residual branch (attention and MLP outputs) when training
    linear: Any = None  # a plug-in that reads and applies the linear layers (layers.LinearPlugin); None: plain

    def __post_init__(self):
        self.validate()

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_groups(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field."""
        def bad(key, why):
            raise ConfigError(f"model config: {key}={getattr(self, key)!r} {why}")

        if self.family not in FAMILIES:
            bad("family", f"is not supported (supported: {', '.join(FAMILIES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                bad(key, "must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            bad("head_dim", "must be even (RoPE rotates pairs of features)")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"is not supported (supported: {', '.join(ROPE_TYPES)})")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"is not supported (supported: {', '.join(ACTIVATIONS)})")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, f"is not a supported dtype ({', '.join(DTYPES)})")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"is not one of {', '.join(REMAT_POLICIES)}")
        if not isinstance(self.attention_block, int) or self.attention_block <= 0:
            bad("attention_block", "must be a positive integer")
        if not 0.0 <= self.dropout_rate < 1.0:
            bad("dropout_rate", "must be in [0, 1)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad("sliding_window", "must be a positive integer or None")
        if not isinstance(self.eos_token_ids, tuple):
            bad("eos_token_ids", "must be a tuple of ints")

    def layer_windows(self) -> list[int]:
        """Attention window per layer; 0 means unlimited."""
        window = self.sliding_window or 0
        return [window if i >= self.first_sliding_layer else 0 for i in range(self.num_layers)]

    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        D, F, N, K, H, V = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                            self.head_dim, self.vocab_size)
        attn = D * N * H + 2 * D * K * H + N * H * D
        attn += (N * H + 2 * K * H) * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
        mlp = 3 * D * F + (2 * F + D) * self.mlp_bias
        per_layer = attn + mlp + 2 * D
        return V * D * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + D


# ----------------------------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig


def from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the contents of an HF config.json (transformers 4.x or 5.x layout)."""
    family = hf.get("model_type")
    if family is None:
        raise ConfigError(f"{source}: missing key 'model_type'")
    if family not in FAMILIES:
        raise ConfigError(f"{source}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    for key in _REQUIRED_HF_KEYS:
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r}")
    defaults = _HF_DEFAULTS[family]

    def get(key, fallback=None):
        value = hf.get(key, defaults.get(key, fallback))
        return defaults.get(key, fallback) if value is None and key in defaults else value

    num_heads = hf["num_attention_heads"]
    head_dim = get("head_dim") or hf["hidden_size"] // num_heads
    hidden_act = get("hidden_act", "silu")
    if family == "gemma":
        # Gemma checkpoints carry "gelu" (or hidden_activation) but were trained with the tanh approximation.
        hidden_act = hf.get("hidden_activation") or hidden_act
        hidden_act = "gelu_pytorch_tanh" if hidden_act == "gelu" else hidden_act
    attention_bias = bool(get("attention_bias", False))

    sliding_window, first_sliding_layer = None, 0
    if family == "mistral":
        sliding_window = get("sliding_window")
    elif family in ("qwen2", "qwen3") and get("use_sliding_window"):
        sliding_window, first_sliding_layer = get("sliding_window"), get("max_window_layers")

    eos = get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    try:
        return ModelConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            hidden_act=hidden_act,
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias and family != "mistral",
            o_bias=attention_bias and family not in ("qwen2", "mistral"),
            mlp_bias=bool(get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            norm_plus_one=family == "gemma",
            scale_embeddings=family == "gemma",
            sliding_window=sliding_window,
            first_sliding_layer=first_sliding_layer,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=get("pad_token_id"),
            param_dtype=_checkpoint_dtype(hf),
            **_rope_from_hf(hf, source),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _checkpoint_dtype(hf: dict[str, Any]) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def _rope_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Read RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ConfigError(f"{source}: rope scaling {rope_type!r} needs key 'factor'")
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key, field in (("low_freq_factor", "rope_low_freq_factor"), ("high_freq_factor", "rope_high_freq_factor"),
                           ("original_max_position_embeddings", "rope_original_max_position_embeddings")):
            if key not in params:
                raise ConfigError(f"{source}: rope scaling 'llama3' needs key {key!r}")
            out[field] = params[key]
    return out


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json that transformers (4.x and 5.x) loads as the same architecture."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    eos = list(cfg.eos_token_ids)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope,  # transformers 5.x
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": cfg.param_dtype,  # transformers 4.x
        "dtype": cfg.param_dtype,  # transformers 5.x
    }
    if cfg.rope_type != "default":
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}  # transformers 4.x
    if cfg.family != "qwen2":  # Qwen2 always uses hidden_size // num_attention_heads
        hf["head_dim"] = cfg.head_dim
    if cfg.family in ("llama", "qwen3", "gemma"):
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        hf["max_window_layers"] = cfg.first_sliding_layer if cfg.sliding_window else cfg.num_layers
    _check_family_switches(cfg)
    return hf


def _check_family_switches(cfg: ModelConfig) -> None:
    """Refuse configs that config.json of their family cannot express (they would load as something else)."""
    expected = {
        "qk_norm": cfg.family == "qwen3",
        "norm_plus_one": cfg.family == "gemma",
        "scale_embeddings": cfg.family == "gemma",
    }
    if cfg.family == "qwen2":
        expected.update(qkv_bias=True, o_bias=False)
    elif cfg.family == "mistral":
        expected.update(qkv_bias=False, o_bias=False)
    elif cfg.qkv_bias != cfg.o_bias:
        raise ConfigError(f"model config: family {cfg.family!r} has one attention_bias for q/k/v and o")
    for key, value in expected.items():
        if getattr(cfg, key) != value:
            raise ConfigError(f"model config: {key}={getattr(cfg, key)} cannot be expressed for family {cfg.family!r}")
    if cfg.family == "qwen2" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ConfigError(f"model config: head_dim={cfg.head_dim} must be hidden_size / num_heads for family 'qwen2'")
    if cfg.family != "llama" and cfg.mlp_bias:
        raise ConfigError(f"model config: mlp_bias cannot be expressed for family {cfg.family!r}")
    if cfg.family in ("llama", "gemma") and cfg.sliding_window is not None:
        raise ConfigError(f"model config: sliding_window cannot be expressed for family {cfg.family!r}")


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read `<path>/config.json`."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file}: not found (a model directory needs config.json)")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return from_hf_dict(hf, source=str(file))


# ----------------------------------------------------------------------------------------------------------------
# Built-in presets (random weights; architecture only).

PRESETS: dict[str, ModelConfig] = {
    # A few MB: demos and smoke tests.
    "tiny-llama": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                              num_kv_heads=2, head_dim=32, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0),
    # The benchmark configuration of REFERENCE.md (issue: benchmarks).
    "bench-llama": ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                               num_heads=8, num_kv_heads=2, head_dim=64, bos_token_id=1, eos_token_ids=(2,)),
    # Llama 3.2 1B architecture (random weights): the 1B-class GPU configuration.
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                                max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=500000.0,
                                rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                                rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192,
                                bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]
