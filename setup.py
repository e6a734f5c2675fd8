"""Build facd_fast: the Python package, the Triton kernels in kernels/ (installed
as facd_fast.kernels), the C++ extension in csrc/ (facd_fast._C: the ops'
schemas and CPU kernels) and the package data: the shipped configs
(facd_fast/configs/), the demo teacher (facd_fast/checkpoints/) and a copy of
the C++ sources (installed as facd_fast/csrc/, for the JIT fallback).

Install with the torch you will run against already present:
    pip install --no-build-isolation -e .
Without torch at build time the extension is skipped and facd_fast JIT-builds
it on first use (torch.utils.cpp_extension.load, cached).
"""
import os
import runpy

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
#: csrc/facd_build.py, shared with the JIT loader: sources in link order, flags.
BUILD = runpy.run_path(os.path.join(HERE, "csrc", "facd_build.py"))


def cpp_extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("facd_fast: torch is not importable at build time; the C++ extension will be JIT-built on first use")
        return [], {}
    ext = CppExtension(
        "facd_fast._C",
        BUILD["sources"](relative_to=HERE),
        extra_compile_args={"cxx": BUILD["cxx_flags"]()},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = cpp_extension()
    setup(
        packages=find_packages(include=["facd_fast", "facd_fast.*"]) + ["facd_fast.kernels", "facd_fast.csrc"],
        package_dir={"facd_fast.kernels": "kernels", "facd_fast.csrc": "csrc"},
        package_data={
            "facd_fast": ["configs/*.toml", "checkpoints/*.pth", "checkpoints/*.json", "checkpoints/README.md"],
            "facd_fast.csrc": ["*.cpp", "*.h"],
        },
        include_package_data=False,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
