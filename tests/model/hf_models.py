"""Tiny random Hugging Face models built locally with transformers (no hub), one per family and attention kind.

Every parameter is randomised after construction, biases and norm weights included: HF initialises biases to 0
and norms to 1, which would hide a mis-mapped bias or norm.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 128
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> config keys that make it that family as real checkpoints use it
FAMILY_KWARGS = {
    # Llama 3.2 style: Llama-3 RoPE scaling (original length 64 < test lengths), tied embeddings, biases on.
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64},
                  tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    # Sliding window shorter than the test sequences, so the window is exercised.
    "mistral": dict(sliding_window=8, tie_word_embeddings=False),
    # q/k/v bias; sliding window on layers >= 1 only.
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True),
    # q/k norm; head_dim != hidden / heads.
    "qwen3": dict(head_dim=24, tie_word_embeddings=False),
    # GeGLU, sqrt(D) embedding scale, (1 + w) norms, head_dim != hidden / heads, tied.
    "gemma": dict(head_dim=24, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True),
}
FAMILIES = tuple(FAMILY_KWARGS)
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def hf_config(family: str, attention: str = "gqa", **overrides) -> transformers.PretrainedConfig:
    kwargs = {**_BASE, "num_key_value_heads": KV_HEADS[attention], **FAMILY_KWARGS[family], **overrides}
    return transformers.AutoConfig.for_model(family, **kwargs)


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Random weights everywhere: matrices ~ N(0, std); norm weights ~ 1 + N(0, 0.1) (Gemma: N(0, 0.1))."""
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type == "gemma"
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(0.1 * noise + (0.0 if gemma else 1.0))
            else:
                p.copy_(std * noise)


def build(directory: Path, family: str, attention: str = "gqa", seed: int = 0, **overrides):
    """Save a tiny random model of `family` to `directory`; return the (eval-mode, float32) torch model."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, attention, **overrides),
                                                          attn_implementation="eager")
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(directory)
    return model


def load_hf(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def hf_logits(model, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
