"""Parameter-efficient fine-tuning: the LoRA settings (spec.py), adapters (lora.py), the adapted linear layer the model
runs them with (adapted.py), 4-bit quantization (quant.py), PEFT files (peft_io.py)."""
