"""sftjax: supervised fine-tuning of decoder language models in JAX/Flax.

    import sftjax
    cfg, params = sftjax.load_pretrained(path, dtype="float32")      # local HF directory or a preset name
    logits = sftjax.forward(cfg, params, tokens)                     # int32 [B, T] -> float [B, T, V]
    out = sftjax.generate(cfg, params, prompts, max_new_tokens=32)   # list of token-id lists -> new token lists
    sftjax.save_pretrained(path, cfg, params)                        # transformers' from_pretrained loads it

LoRA / QLoRA by hand (what `sftjax-train method=qlora` does):

    spec = sftjax.LoraSpec(rank=16, alpha=32, target_modules="all-linear")
    adapters = sftjax.init_adapters(cfg, spec, jax.random.key(0))    # lora_a / lora_b per targeted module
    base4 = sftjax.quantize_params(params, "nf4", double_quant=True)  # frozen 4-bit base (bitsandbytes-exact)
    logits = sftjax.forward(sftjax.lora_model_config(cfg, spec), sftjax.merge_params(base4, adapters), tokens)
    sftjax.save_adapter("adapter/", cfg, spec, adapters)             # peft.PeftModel.from_pretrained loads it
"""

from sftjax.errors import CheckpointError, ConfigError, UserError
from sftjax.model.config import PRESETS, ModelConfig, from_hf_dict, to_hf_dict
from sftjax.model.generate import generate
from sftjax.model.hf import load_pretrained, save_pretrained
from sftjax.model.transformer import forward, init_params, param_shapes
from sftjax.peft.lora import LoraSpec, init_adapters
from sftjax.peft.lora import merge as merge_lora
from sftjax.peft.lora import model_config as lora_model_config
from sftjax.peft.peft_io import load_adapter, save_adapter
from sftjax.peft.quant import dequantize_params, quantize_params
from sftjax.train.state import merge_params

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "LoraSpec", "ModelConfig", "PRESETS", "UserError", "dequantize_params",
    "forward", "from_hf_dict", "generate", "init_adapters", "init_params", "load_adapter", "load_pretrained",
    "lora_model_config", "merge_lora", "merge_params", "param_shapes", "quantize_params", "save_adapter",
    "save_pretrained", "to_hf_dict",
]
