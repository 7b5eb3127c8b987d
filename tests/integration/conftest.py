"""Fixtures of the integration tests (which start Ray)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> str:
    """The session's small BPE saved as a tokenizer directory (`data.tokenizer=`)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)
