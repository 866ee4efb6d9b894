"""Build script: package metadata lives in pyproject.toml; this file adds the compiled
extension `vlmo_fast._C` built from every source in csrc/ with torch's cpp_extension + ninja.

- C++ sources (csrc/*.cpp) always; CUDA sources (csrc/*.cu) when torch has CUDA and nvcc is
  found (CUDA_HOME), so a CUDA build error fails here, on CPU-only machines too.
- Without torch at build time (an isolated build), the package installs pure-Python and
  `vlmo_fast._ext` JIT-builds the extension on first use.
- VLMO_FAST_NO_EXT=1 skips the extension; VLMO_FAST_NO_CUDA=1 builds the CPU part only.
- The CUDA toolkit must have both nvcc and libcudart. cpp_extension guesses CUDA_HOME from
  the nvcc on PATH; with /usr/local/bin/nvcc it guesses /usr/local, where the link fails
  (`cannot find -lcudart`). `find_cuda_toolkit` checks the guess and the usual locations,
  uses the first complete toolkit, and otherwise builds the CPU part with a warning.
"""
import glob
import os
import shutil
import warnings

from setuptools import setup


def find_cuda_toolkit(candidates):
    """The first directory of `candidates` holding bin/nvcc and a libcudart shared library
    (lib64/, lib/ or targets/*/lib/), or None. Duplicates and None are skipped."""
    seen = set()
    for root in candidates:
        if not root or root in seen:
            continue
        seen.add(root)
        has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
        has_cudart = any(glob.glob(os.path.join(root, sub, "libcudart.so*"))
                         for sub in ("lib64", "lib", os.path.join("targets", "*", "lib")))
        if has_nvcc and has_cudart:
            return root
    return None


def cuda_toolkit_candidates(guess):
    """cpp_extension's guess first, then the environment, the real path of the nvcc on
    PATH, and the conventional install locations (newest versioned one first)."""
    nvcc = shutil.which("nvcc")
    from_nvcc = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    return ([guess, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), from_nvcc,
             "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
            + ["/opt/cuda"])

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
            and os.environ.get("VLMO_FAST_NO_CUDA") != "1"
        )
        if with_cuda:
            toolkit = find_cuda_toolkit(cuda_toolkit_candidates(cpp_extension.CUDA_HOME))
            if toolkit is None:
                warnings.warn("vlmo_fast: no complete CUDA toolkit (bin/nvcc + libcudart) found "
                              f"(cpp_extension guessed CUDA_HOME={cpp_extension.CUDA_HOME}); "
                              "building the CPU part of vlmo_fast._C only. Set CUDA_HOME to "
                              "the toolkit root to build the CUDA kernels.")
                with_cuda = False
            elif toolkit != cpp_extension.CUDA_HOME:
                warnings.warn(f"vlmo_fast: CUDA_HOME={cpp_extension.CUDA_HOME} has no libcudart; "
                              f"building with the toolkit at {toolkit}")
                # cpp_extension reads its module global at build time
                cpp_extension.CUDA_HOME = toolkit
                os.environ["CUDA_HOME"] = toolkit
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
