"""The SFT data pipeline: read, validate, tokenize, mask, pack, batch and mix datasets (see each module)."""
