"""The peer: transformers + PEFT (+ bitsandbytes NF4 for QLoRA) on torch CPU, set up as a user of those libraries
would set it up, and its train step.

    full   LlamaForCausalLM.from_pretrained(dir, dtype=float32); every parameter trained
    lora   + peft.get_peft_model(LoraConfig(r, alpha, dropout 0, target_modules)); only adapters trained
    qlora  from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit, nf4, double quant,
           compute float32)): transformers accepts bitsandbytes on CPU and puts bnb.nn.Linear4bit in every decoder
           linear layer (lm_head and embeddings stay float32), then the same LoRA wrapping

No `prepare_model_for_kbit_training` (it would switch on gradient checkpointing; the weights are float32
already). Optimizer: torch.optim.AdamW(fused=True), the default of the HF Trainer on torch >= 2.8 (fused AdamW has
a CPU kernel). The step is forward with labels (transformers' own causal-LM loss), backward, optimizer.step(),
zero_grad(set_to_none=True). No gradient clipping, as on the sftjax side (optim.max_grad_norm = 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hf_dir: str, mode: str, rank: int, alpha: float, lr: float) -> tuple[Any, torch.optim.Optimizer, dict]:
    """(model in train mode, AdamW over its trainable parameters, facts about the setup)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    model = LlamaForCausalLM.from_pretrained(hf_dir, **kwargs)
    model.config.use_cache = False  # training: no KV cache
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    linear = _first_linear(model)
    facts = {
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "q_proj_class": f"{type(linear).__module__}.{type(linear).__name__}",
        "optimizer": "torch.optim.AdamW(fused=True)",
    }
    return model, optimizer, facts


def _first_linear(model) -> torch.nn.Module:
    """The base linear layer of layer 0's q_proj (inside the LoRA wrapper when there is one)."""
    for name, module in model.named_modules():
        if name.endswith("layers.0.self_attn.q_proj"):
            return getattr(module, "base_layer", module)
    raise LookupError("no layers.0.self_attn.q_proj")


def step(model, optimizer: torch.optim.Optimizer, tokens: np.ndarray, targets: np.ndarray) -> float:
    """One optimizer step on tokens / targets [b, T] (targets = next tokens, all trained). Returns the loss."""
    ids = torch.from_numpy(tokens).long()
    labels = torch.from_numpy(targets).long()
    # shift_labels: the targets are already the next tokens, so every one of the T positions is trained (as in
    # sftjax); `labels` only switches the loss on.
    loss = model(input_ids=ids, labels=labels, shift_labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (absmax, code, offset, and the nested state's)."""
    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    return total + (_quant_state_bytes(nested) if nested is not None else 0)


def memory(model, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of trainable parameters, frozen parameters (4-bit codes + quantization constants under QLoRA) and
    optimizer state."""
    trainable = frozen = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size + (_quant_state_bytes(p.quant_state) if getattr(p, "quant_state", None) else 0)
    opt = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
              if isinstance(t, torch.Tensor))
    return {"trainable_bytes": trainable, "frozen_bytes": frozen, "opt_state_bytes": opt}


def matmul_peak(n: int, reps: int) -> float:
    """Median GFLOP/s of float32 [n, n] @ [n, n] through torch."""
    import time

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e9
