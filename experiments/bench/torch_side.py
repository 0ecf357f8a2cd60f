"""The peer: transformers + PEFT (+ bitsandbytes NF4 for QLoRA) on torch (CPU or CUDA), set up as a user of those
libraries would set it up, and its train step.

    full   LlamaForCausalLM.from_pretrained(dir, dtype=float32); every parameter trained
    lora   + peft.get_peft_model(LoraConfig(r, alpha, dropout 0, target_modules)); only adapters trained
    qlora  from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit, nf4, double quant,
           compute float32)): transformers accepts bitsandbytes on CPU and puts bnb.nn.Linear4bit in every decoder
           linear layer (lm_head and embeddings stay float32), then the same LoRA wrapping

precision "bf16" is what the HF Trainer does with `bf16=True`: the forward pass under
`torch.autocast(device, torch.bfloat16)`. Full fine-tuning keeps float32 weights (the master copy AdamW updates);
LoRA and QLoRA load the frozen base in bfloat16 (`dtype=bfloat16`; QLoRA's compute dtype bfloat16) and PEFT keeps
the adapters in float32 (its `autocast_adapter_dtype`). sftjax's bf16 setting is the same (jax_side.py).

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


def build(hf_dir: str, mode: str, rank: int, alpha: float, lr: float, precision: str = "float32",
          device: str = "cpu") -> tuple[Any, torch.optim.Optimizer, dict]:
    """(model in train mode on `device`, AdamW over its trainable parameters, facts about the setup)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base_dtype = torch.bfloat16 if precision == "bf16" and mode != "full" else torch.float32
    kwargs: dict[str, Any] = {"dtype": base_dtype}
    if mode == "qlora" or device != "cpu":
        kwargs["device_map"] = device
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=base_dtype)
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
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "precision": precision,
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


def step(model, optimizer: torch.optim.Optimizer, tokens: np.ndarray, targets: np.ndarray,
         precision: str = "float32") -> float:
    """One optimizer step on tokens / targets [b, T] (targets = next tokens, all trained). Returns the loss, which
    waits for the step to finish (on CUDA too: reading it synchronises the stream the whole step ran on)."""
    device = model.device
    ids = torch.from_numpy(tokens).long().to(device)
    labels = torch.from_numpy(targets).long().to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        # shift_labels: the targets are already the next tokens, so every one of the T positions is trained (as
        # in sftjax); `labels` only switches the loss on.
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


def memory(model, optimizer: torch.optim.Optimizer) -> dict[str, int | None]:
    """Bytes of trainable parameters, frozen parameters (4-bit codes + quantization constants under QLoRA),
    optimizer state, and on CUDA the peak of device memory allocated (torch.cuda.max_memory_allocated)."""
    trainable = frozen = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size + (_quant_state_bytes(p.quant_state) if getattr(p, "quant_state", None) else 0)
    opt = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
              if isinstance(t, torch.Tensor))
    device_peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else None
    return {"trainable_bytes": trainable, "frozen_bytes": frozen, "opt_state_bytes": opt,
            "device_peak_bytes": device_peak}


def matmul_peak(n: int, reps: int, dtype: str = "float32", device: str = "cpu") -> float:
    """Median GFLOP/s of [n, n] @ [n, n] in `dtype` (float32 | bfloat16) through torch on `device`."""
    import time

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    for _ in range(2):
        torch.mm(a, b)
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times)) / 1e9
