"""Builds Plait's CPU kernels (a C++ extension; project metadata is in pyproject.toml).

The extension is optional: where it cannot be built (no C++ compiler, not x86-64), Plait runs its
CPU models through PyTorch operations instead, and says so when a model loads.
"""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64"):
    sources = ["module.cpp", "linear_avx2.cpp", "linear_amx.cpp", "linear_amx_int8.cpp", "linear_avx512.cpp", "attention_avx2.cpp", "attention_avx512.cpp", "attention_amx.cpp", "ops_avx2.cpp", "stack_avx2.cpp"]
    ext_modules.append(
        Extension(
            "plait.runtime.cpu._kernels",
            sources=[f"plait/runtime/cpu/csrc/{name}" for name in sources],
            depends=[f"plait/runtime/cpu/csrc/{name}" for name in ("kernels.h", "simd_avx2.h", "simd_avx512.h", "stack.h", "team.h", "amx_tiles.h", "amx_config.h")],
            language="c++",
            # The kernels pick their instruction set per file (`#pragma GCC target`); the module
            # itself stays baseline x86-64 so importing it never faults.
            extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wall"],
            # libgomp.so.1: the OpenMP runtime PyTorch loads too (same soname), so one thread pool serves both.
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
