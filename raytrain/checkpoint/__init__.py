"""Checkpoint formats shared by training, generation and serving."""
