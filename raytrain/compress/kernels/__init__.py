"""Triton GPU kernels over compressed weights (need `triton`; run on CPU only under TRITON_INTERPRET=1)."""
