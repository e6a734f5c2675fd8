"""How to build the facd_fast._C extension: its sources in link order and its compiler flags.

Used by setup.py and by the JIT loader (facd_fast/ops.py), which load this
file by path (it is build configuration; installed packages carry a copy of
csrc/ as facd_fast/csrc/ so that the JIT fallback can rebuild there).

No ``-march``: the extension must run on any x86-64 (or other) CPU it is
installed on. The AVX2 and AVX-512 kernels enable their instructions with a
``#pragma GCC target`` in their own source file and run only when the CPU has
them (checked at run time); everything else is portable code.
"""
import os
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))

#: Link order matters for the first entry: facd_cpu.cpp compiles the portable
#: (DEFAULT) kernels, and where an inline function of a shared header is also
#: compiled in an AVX2/AVX-512 unit the linker keeps the first copy it meets,
#: which must be the portable one.
SOURCES = ("facd_cpu.cpp", "facd_kernels_avx2.cpp", "facd_kernels_avx512.cpp", "facd_ops.cpp")


def sources(relative_to=None):
    """The extension's C++ sources in link order, as paths relative to ``relative_to`` (absolute if None)."""
    paths = [os.path.join(CSRC, name) for name in SOURCES]
    return paths if relative_to is None else [os.path.relpath(p, relative_to) for p in paths]


def cxx_flags():
    """Flags for every source: optimised, OpenMP for at::parallel_for."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"]
    # at::parallel_for is OpenMP code inlined into the extension (torch's CPU
    # builds use OpenMP): without -fopenmp it would silently run on one thread.
    # No -ffast-math: the kernels' results must be reproducible bit for bit.
    # -g0 overrides the -g of Python's own CFLAGS: debug info made the library 15 MB instead of 0.7 MB.
    return ["-O3", "-fopenmp", "-g0"]


def ld_flags():
    """Linker flags: the OpenMP runtime (resolved to the libgomp torch already loaded)."""
    return [] if sys.platform == "win32" else ["-fopenmp"]
