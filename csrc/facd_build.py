"""Compiler flags of the facd_fast._C extension, shared by setup.py and the JIT loader.

No ``-march``: the extension must run on any x86-64 (or other) CPU it is
installed on. The AVX2 and AVX-512 kernels enable their instructions with a
``#pragma GCC target`` in their own source file and run only when the CPU has
them (checked at run time); everything else is portable code.
"""
import sys


def cxx_flags():
    """Flags for every csrc/*.cpp source: optimised, OpenMP for at::parallel_for."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"]
    # at::parallel_for is OpenMP code inlined into the extension (torch's CPU
    # builds use OpenMP): without -fopenmp it would silently run on one thread.
    # No -ffast-math: the kernels' results must be reproducible bit for bit.
    return ["-O3", "-fopenmp"]


def ld_flags():
    """Linker flags: the OpenMP runtime (resolved to the libgomp torch already loaded)."""
    return [] if sys.platform == "win32" else ["-fopenmp"]
