"""Build facd_fast: the Python package, the Triton kernels in kernels/ (installed
as facd_fast.kernels) and the C++ extension in csrc/ (facd_fast._C).

Install with the torch you will run against already present:
    pip install --no-build-isolation -e .
Without torch at build time the extension is skipped and facd_fast JIT-builds
it on first use (torch.utils.cpp_extension.load, cached).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpp_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("facd_fast: torch is not importable at build time; the C++ extension will be JIT-built on first use")
        return [], {}
    from facd_build import cxx_flags  # noqa: E402  (csrc/facd_build.py, shared with the JIT loader)

    ext = CppExtension("facd_fast._C", sources, extra_compile_args={"cxx": cxx_flags()})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.join(HERE, "csrc"))
    ext_modules, cmdclass = cpp_extension()
    setup(
        packages=find_packages(include=["facd_fast", "facd_fast.*"]) + ["facd_fast.kernels"],
        package_dir={"facd_fast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
