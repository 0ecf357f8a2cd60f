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

Task heads and objectives (what `sftjax-train objective=heads | distill` trains; sftjax/objectives/):

    heads = sftjax.load_heads("exported/")                           # {task: (kernel [D, C], classes)}
    cfg, params, kernel, classes = sftjax.load_classifier("clf/")    # `sftjax-export --head TASK` output
    logits = sftjax.classify(cfg, params, kernel, tokens, segment_ids)  # [B, C] from each row's last token
    loss = sftjax.divergence(student_logits, teacher_logits, "jsd", beta=0.5)  # per position, as TRL's GKD
    rm = sftjax.load_reward_model("reward_model/")                   # `objective=reward`, exported or its run
    rewards = rm.score(["2+2="], [" 4"])                             # float32 [N], read at each sequence's end
"""

import importlib

# name -> (module, attribute). Loaded on first use (PEP 562), so the command-line entry points start without JAX.
_EXPORTS = {
    "CheckpointError": ("sftjax.errors", "CheckpointError"),
    "ConfigError": ("sftjax.errors", "ConfigError"),
    "UserError": ("sftjax.errors", "UserError"),
    "PRESETS": ("sftjax.model.config", "PRESETS"),
    "ModelConfig": ("sftjax.model.config", "ModelConfig"),
    "from_hf_dict": ("sftjax.model.config", "from_hf_dict"),
    "to_hf_dict": ("sftjax.model.config", "to_hf_dict"),
    "generate": ("sftjax.model.generate", "generate"),
    "load_pretrained": ("sftjax.model.hf", "load_pretrained"),
    "save_pretrained": ("sftjax.model.hf", "save_pretrained"),
    "forward": ("sftjax.model.transformer", "forward"),
    "init_params": ("sftjax.model.transformer", "init_params"),
    "param_shapes": ("sftjax.model.transformer", "param_shapes"),
    "classify": ("sftjax.model.classifier", "classify"),
    "load_classifier": ("sftjax.model.classifier", "load_classifier"),
    "load_heads": ("sftjax.model.classifier", "load_heads"),
    "save_classifier": ("sftjax.model.classifier", "save_classifier"),
    "load_reward_model": ("sftjax.model.reward_model", "load_reward_model"),
    "RewardModel": ("sftjax.model.reward_model", "RewardModel"),
    "Objective": ("sftjax.objectives.base", "Objective"),
    "divergence": ("sftjax.objectives.distill", "divergence"),
    "LoraSpec": ("sftjax.peft.lora", "LoraSpec"),
    "init_adapters": ("sftjax.peft.lora", "init_adapters"),
    "merge_lora": ("sftjax.peft.lora", "merge"),
    "lora_model_config": ("sftjax.peft.lora", "model_config"),
    "load_adapter": ("sftjax.peft.peft_io", "load_adapter"),
    "save_adapter": ("sftjax.peft.peft_io", "save_adapter"),
    "dequantize_params": ("sftjax.peft.quant", "dequantize_params"),
    "quantize_params": ("sftjax.peft.quant", "quantize_params"),
    "merge_params": ("sftjax.train.state", "merge_params"),
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sftjax' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)
