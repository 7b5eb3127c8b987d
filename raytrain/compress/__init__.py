"""Weight compression (plain PyTorch, no Ray): SeedLM seeds, the RTN baseline, palettization (k-means look-up
tables), the file format, GPU kernels."""
