"""Ray Data pipelines: each stage is plain NumPy/PyTorch; Ray runs them over records (see common.py)."""
