"""Parameter-efficient fine-tuning: LoRA adapters (lora.py), 4-bit quantization (quant.py), PEFT files (peft_io.py)."""
