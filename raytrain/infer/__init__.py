"""Inference (plain PyTorch, no Ray): KV-cached generation and sampling, shared by the CLI and serving."""
