"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2, byte-level BPE), through the real loader."""
    from plait.runtime.model_loader import resolve_model

    return resolve_model(None).tokenizer
