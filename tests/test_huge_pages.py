"""Transparent huge pages for the CPU allocator (plait.runtime.huge_pages)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from plait.runtime import huge_pages


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
