"""sftjax: supervised fine-tuning of decoder language models in JAX/Flax.

    import sftjax
    cfg, params = sftjax.load_pretrained(path, dtype="float32")      # local HF directory or a preset name
    logits = sftjax.forward(cfg, params, tokens)                     # int32 [B, T] -> float [B, T, V]
    out = sftjax.generate(cfg, params, prompts, max_new_tokens=32)   # list of token-id lists -> new token lists
    sftjax.save_pretrained(path, cfg, params)                        # transformers' from_pretrained loads it
"""

from sftjax.errors import CheckpointError, ConfigError, UserError
from sftjax.model.config import PRESETS, ModelConfig, from_hf_dict, to_hf_dict
from sftjax.model.generate import generate
from sftjax.model.hf import load_pretrained, save_pretrained
from sftjax.model.transformer import forward, init_params, param_shapes

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "PRESETS", "UserError", "forward", "from_hf_dict", "generate",
    "init_params", "load_pretrained", "param_shapes", "save_pretrained", "to_hf_dict",
]
