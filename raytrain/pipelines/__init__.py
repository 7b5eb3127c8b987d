"""Ray pipelines and jobs at the edge: they fan plain-PyTorch library code out over a cluster."""
