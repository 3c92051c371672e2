"""Transparent huge pages for the CPU allocator (plait.runtime.huge_pages)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from torch import nn

from plait.runtime import huge_pages
from plait.runtime.cpu import kernels
from plait.runtime.cpu.kernels import WeightFormat
from plait.runtime.cpu.linear import CpuEmbedding, CpuLinear, StoredWeight, gather_stored


def _mode_file(tmp_path, text: str) -> str:
    path = tmp_path / "enabled"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, asked", [
    ("always [madvise] never\n", True),
    ("[always] madvise never\n", True),
    ("always madvise [never]\n", False),
])
def test_asks_for_huge_pages_where_the_kernel_offers_them(tmp_path, text, asked):
    env: dict[str, str] = {}
    assert huge_pages.request_huge_pages(env, _mode_file(tmp_path, text)) is asked
    assert env == ({huge_pages.ENV: "1"} if asked else {})


def test_leaves_a_users_setting_and_a_kernel_without_huge_pages_alone(tmp_path):
    offered = _mode_file(tmp_path, "always [madvise] never\n")
    for value, asked in (("0", False), ("1", True), ("", False)):
        env = {huge_pages.ENV: value}
        assert huge_pages.request_huge_pages(env, offered) is asked
        assert env == {huge_pages.ENV: value}
    env = {}
    assert huge_pages.request_huge_pages(env, str(tmp_path / "missing")) is False and env == {}
    assert huge_pages.kernel_mode(str(tmp_path / "missing")) is None


_PROBE = """
import plait.runtime, torch
from plait.runtime.huge_pages import huge_page_bytes
x = torch.ones(32 * 2**20)  # 128 MiB, written
print(huge_page_bytes())
"""


@pytest.mark.skipif(huge_pages.kernel_mode() not in ("always", "madvise"), reason="the kernel offers no huge pages")
def test_importing_the_runtime_puts_large_tensors_on_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != huge_pages.ENV}

    def probe(extra: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE], env={**env, **extra}, capture_output=True, text=True,
                             check=True, timeout=120)
        return int(out.stdout.split()[-1])

    assert probe({}) >= 64 * 2**20
    if huge_pages.kernel_mode() == "madvise":  # with "always" the kernel uses them regardless
        assert probe({huge_pages.ENV: "0"}) == 0


# A small model's weights are each under 2 MiB: gathered into one buffer, they are one allocation on huge pages.
@pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built or no AVX2 here")
def test_gathered_weights_are_views_of_one_buffer_with_the_same_products():
    torch.manual_seed(0)
    raw = torch.from_numpy(np.ascontiguousarray(quantize(torch.randn(96, 64).numpy(), GGMLQuantizationType.Q4_1)))
    raw = raw.view(torch.uint8)
    fmt, data = kernels.float_constants(WeightFormat.Q4_1, raw)
    q41 = StoredWeight(data, fmt, 96, 64)
    tied = StoredWeight.from_float(torch.randn(40, 64))
    model = nn.ModuleList([CpuLinear(q41), CpuLinear(StoredWeight.from_float(torch.randn(24, 64).bfloat16().float())),
                           CpuEmbedding(tied), CpuLinear(StoredWeight(tied.data, tied.fmt, 40, 64)), CpuLinear(tied)])
    x = torch.randn(3, 64)
    before = [m(x) for m in model if isinstance(m, CpuLinear)]
    total = gather_stored(model)
    weights = [m.stored.data for m in model]
    base = weights[0].untyped_storage().data_ptr()
    assert all(w.untyped_storage().data_ptr() == base and w.data_ptr() % 64 == 0 for w in weights)
    assert all(m.packed.data_ptr() == m.stored.data.data_ptr() for m in model)  # no buffer keeps the old bytes
    assert weights[2].data_ptr() == weights[3].data_ptr() == weights[4].data_ptr()  # tied weights keep sharing
    assert total >= sum(w.numel() * w.element_size() for w in weights[:3])
    after = [m(x) for m in model if isinstance(m, CpuLinear)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
