"""Ray pipelines and jobs at the edge: each stage or shard is plain NumPy/PyTorch library code; Ray fans it out
over a cluster (see common.py for the shared record plumbing)."""
