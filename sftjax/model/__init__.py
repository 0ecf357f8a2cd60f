"""The Llama-family decoder: config, layers, attention, transformer, HF checkpoint I/O, generation."""
