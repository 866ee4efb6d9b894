import os

# Triton kernels run on CPU through the interpreter; it must be set before triton imports.
import torch  # noqa: E402  (torch does not import triton eagerly)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.py on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset in eval mode without drop path, with non-default LayerNorm, bias and
    table values so that every parameter matters."""
    from vlmo_fast import VLMo
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
