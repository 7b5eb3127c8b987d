"""Training on Ray Train with DeepSpeed: the driver (`trainer.py`) and the per-worker loop (`loop.py`)."""
