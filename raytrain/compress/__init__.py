"""Weight compression (plain PyTorch, no Ray): SeedLM seeds, the RTN baseline, the file format, GPU kernels."""
