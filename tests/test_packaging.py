"""Packaging: what a user who only wants the block installs and imports, and the build's
CUDA-toolkit detection (setup.py must not fail to link when nvcc's guessed home lacks
libcudart)."""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _setup_functions() -> dict:
    """The helper functions of setup.py, without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    namespace = {"glob": glob, "os": os, "shutil": shutil}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            exec(compile(ast.Module([node], []), "setup.py", "exec"), namespace)
    return namespace


def _toolkit(root: Path, nvcc: bool, cudart_dir: str | None) -> Path:
    if nvcc:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "nvcc").write_text("")
    if cudart_dir is not None:
        (root / cudart_dir).mkdir(parents=True)
        (root / cudart_dir / "libcudart.so.13").write_text("")
    return root


def test_cuda_toolkit_detection_skips_incomplete_guesses(tmp_path):
    find = _setup_functions()["find_cuda_toolkit"]
    guessed = _toolkit(tmp_path / "usr_local", nvcc=True, cudart_dir=None)   # nvcc, no cudart
    no_nvcc = _toolkit(tmp_path / "runtime_only", nvcc=False, cudart_dir="lib64")
    real = _toolkit(tmp_path / "cuda", nvcc=True, cudart_dir="lib")
    targets = _toolkit(tmp_path / "cuda_targets", nvcc=True, cudart_dir="targets/x86_64-linux/lib")
    assert find([str(guessed), None, str(no_nvcc), str(real)]) == str(real)
    assert find([str(guessed), str(targets)]) == str(targets)
    assert find([str(guessed), str(no_nvcc), None]) is None


def test_candidates_start_with_the_guess_and_include_the_conventional_home():
    candidates = _setup_functions()["cuda_toolkit_candidates"]("/guessed")
    assert candidates[0] == "/guessed"
    assert "/usr/local/cuda" in candidates


def test_core_dependencies_are_minimal():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
             for dep in meta["dependencies"]}
    assert names == {"torch", "triton", "safetensors", "numpy"}
    extras = meta["optional-dependencies"]
    for needed in ("deepspeed>=0.16", "tokenizers>=0.19"):
        assert needed in extras["train"]


def test_importing_the_package_pulls_no_training_dependencies():
    # (tqdm is not listed: torch itself imports it through torch.hub)
    code = ("import sys, vlmo_fast, vlmo_fast.model; "
            "heavy = [m for m in ('deepspeed', 'tokenizers', 'tensorboard', 'matplotlib', "
            "'timm', 'onnx', 'triton') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert out.stdout.strip() == "", f"import vlmo_fast imported {out.stdout.strip()}"


def test_compile_time_constant_sets_the_marker_of_torchs_public_decorator():
    from vlmo_fast.env import compile_time_constant

    def ours():
        return 1

    def theirs():
        return 1
    marked = torch.compiler.assume_constant_result(theirs)
    assert compile_time_constant(ours) is ours
    added = set(vars(marked)) - set(vars(lambda: None))
    assert added == set(vars(ours)) - set(vars(lambda: None)) == {"_dynamo_marked_constant"}


def test_every_subpackage_is_listed_for_wheels():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vlmo_fast").rglob("__init__.py")
             if p.parent.name != "kernels"}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert "vlmo_fast.kernels" in listed
