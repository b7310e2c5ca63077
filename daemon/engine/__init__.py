"""The image engine: one pipeline for every runtime, NumPy schedulers, noise, tokenizer, previews, PNG output."""
