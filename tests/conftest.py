"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2, byte-level BPE), through the real loader."""
    from plait.runtime.model_loader import resolve_model

    return resolve_model(None).tokenizer


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """The kernels on AVX2, then on AVX-512 where the CPU has it: products of more than 8 rows, decode
    products with int16 x (with VNNI), attention tasks of more than 3 rows a KV head."""
    from plait.runtime.cpu import kernels

    if request.param == "avx512" and not kernels.avx512_products():
        pytest.skip("no AVX-512 products here")
    before = kernels.avx512_products(request.param == "avx512")
    yield request.param
    kernels.avx512_products(before)
