"""Model definitions in plain PyTorch; nothing here imports Ray."""
