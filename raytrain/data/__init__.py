"""Data: tokenizers, corpora and Ray Data pipelines that feed the trainers."""
