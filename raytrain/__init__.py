"""raytrain: train, compress, serve and generate data for research models on Ray."""

__version__ = "0.1.0"
