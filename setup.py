"""Build script: package metadata lives in pyproject.toml; this file adds the compiled
extension `vlmo_fast._C` built from every source in csrc/ with torch's cpp_extension + ninja.

- C++ sources (csrc/*.cpp) always; CUDA sources (csrc/*.cu) when torch has CUDA and nvcc is
  found (CUDA_HOME), so a CUDA build error fails here, on CPU-only machines too.
- Without torch at build time (an isolated build), the package installs pure-Python and
  `vlmo_fast._ext` JIT-builds the extension on first use.
- VLMO_FAST_NO_EXT=1 skips the extension; VLMO_FAST_NO_CUDA=1 builds the CPU part only.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}

_sources_cpp = sorted(glob.glob("csrc/*.cpp"))
_sources_cu = sorted(glob.glob("csrc/*.cu"))

if _sources_cpp and os.environ.get("VLMO_FAST_NO_EXT") != "1":
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # isolated build without torch: JIT fallback at run time
        torch = None
    if torch is not None:
        with_cuda = (
            bool(_sources_cu)
            and torch.version.cuda is not None
            and cpp_extension.CUDA_HOME is not None
            and os.environ.get("VLMO_FAST_NO_CUDA") != "1"
        )
        define_macros = [("VLMO_FAST_WITH_CUDA", "1")] if with_cuda else []
        # at::parallel_for inlines OpenMP pragmas: compile and link with -fopenmp. No -std flag:
        # cpp_extension adds the one the installed torch needs (C++17 up to torch 2.11, C++20
        # for 2.14, whose headers refuse C++17).
        extra = {"cxx": ["-O3", "-fopenmp"]}
        if with_cuda:
            # sm_80 (A100) and sm_90 (H100/H200) plus PTX for newer parts.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
            extra["nvcc"] = ["-O3", "--use_fast_math"]
            ext = cpp_extension.CUDAExtension(
                "vlmo_fast._C", _sources_cpp + _sources_cu,
                define_macros=define_macros, extra_compile_args=extra,
                extra_link_args=["-fopenmp"])
        else:
            ext = cpp_extension.CppExtension(
                "vlmo_fast._C", _sources_cpp,
                define_macros=define_macros, extra_compile_args={"cxx": extra["cxx"]},
                extra_link_args=["-fopenmp"])
        ext_modules.append(ext)
        cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
