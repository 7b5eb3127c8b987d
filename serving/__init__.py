"""Ray Serve application of raytrain models (OpenAI-compatible API)."""
