"""The "chunked" contrastive backend (vlmo_fast/losses/contrastive_chunked.py): against a float64
materialised loss with tiles smaller than the batch (edge tiles, targets split across tiles),
fp32/bf16/fp16 features, gradient subsets, no n x N tensor, and
the automatic choice between reference and chunked.

The numerical helpers come from test_contrastive.py (same tolerances as the other backends).
"""
import math

import pytest
import torch

from test_contrastive import _assert_close, _features, _float64_loss, _run
from vlmo_fast import backends
from vlmo_fast.losses import contrastive as closs
from vlmo_fast.losses import contrastive_chunked as chunked
from vlmo_fast.losses import contrastive_loss


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 rows x 5 columns: every case spans many tiles, partial tiles at both edges,
    and target (diagonal) runs that cross tile boundaries."""
    monkeypatch.setattr(chunked, "BLOCK_ROWS", 7)
    monkeypatch.setattr(chunked, "BLOCK_COLS", 5)


CASES = [(1, 32, 1.0), (2, 32, 100.0), (37, 40, 1.0 / 0.07), (50, 64, 100.0), (19, 1024, 30.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,scale", CASES)
def test_matches_float64_reference(n, d, scale, dtype, small_tiles):
    img, txt = _features(n, d, dtype, device="cpu", match=1.0)
    ls = torch.tensor(math.log(scale))
    got = _run(img, txt, ls, "chunked")
    ref = _float64_loss(img, txt, ls)
    _assert_close(got, ref, dtype, f"chunked n={n} d={d} scale={scale}")
    assert got["stats"].backend == "chunked"
    torch.testing.assert_close(got["stats"].row_lse.double(), ref["row_lse"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got["stats"].col_lse.double(), ref["col_lse"], atol=1e-4, rtol=1e-5)
    assert got["img"].dtype == dtype and got["txt"].dtype == dtype


def test_fp16_and_unnormalised_large_span(small_tiles):
    """fp16 features; unnormalised rows at scale 1000 (logit spans of thousands: every tile
    needs its own shifts, which logsumexp per row and per column gives)."""
    img, txt = _features(23, 48, torch.float16, device="cpu", match=0.5)
    ls = torch.tensor(math.log(1 / 0.07))
    _assert_close(_run(img, txt, ls, "chunked"), _float64_loss(img, txt, ls), torch.bfloat16, "fp16")
    img, txt = _features(33, 32, device="cpu", match=0.3)
    img = img * torch.linspace(0.2, 3.0, 33)[:, None]
    ls = torch.tensor(math.log(1000.0))
    _assert_close(_run(img, txt, ls, "chunked"), _float64_loss(img, txt, ls), torch.float32, "span")


def test_accuracy_and_gradient_subsets(small_tiles):
    img, txt = _features(48, 32, device="cpu", match=0.9, seed=3)
    ls = torch.tensor(math.log(1 / 0.07))
    ref = _float64_loss(img, txt, ls)
    assert 0.0 < float(ref["i2t"]) < 1.0
    stats = _run(img, txt, ls, "chunked")["stats"]
    assert float(stats.i2t_accuracy) == pytest.approx(float(ref["i2t"]), abs=1.5 / 48)
    assert float(stats.t2i_accuracy) == pytest.approx(float(ref["t2i"]), abs=1.5 / 48)
    # Only some inputs need a gradient: the others stay None, the rest match.
    for need in ("img", "txt", "scale"):
        i = img.clone().requires_grad_(need == "img")
        t = txt.clone().requires_grad_(need == "txt")
        s = ls.clone().requires_grad_(need == "scale")
        contrastive_loss(i, t, s, backend="chunked").backward()
        grads = {"img": i.grad, "txt": t.grad, "scale": s.grad}
        for key, grad in grads.items():
            assert (grad is not None) == (key == need), key
        torch.testing.assert_close(grads[need].double(), ref[need], atol=1e-6, rtol=2e-4)


def test_never_builds_an_n_by_n_tensor(monkeypatch, small_tiles):
    """Every GEMM output is at most one tile, and autograd saves only O(N D) tensors."""
    n, d = 64, 16
    img, txt = _features(n, d, device="cpu", match=0.5)
    sizes = []
    real_mm = torch.mm

    def counting_mm(a, b, *args, **kwargs):
        out = real_mm(a, b, *args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "mm", counting_mm)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        got = _run(img, txt, torch.tensor(math.log(20.0)), "chunked")
    assert sizes and max(sizes) <= chunked.BLOCK_ROWS * chunked.BLOCK_COLS
    assert max(saved) <= n * d
    _assert_close(got, _float64_loss(img, txt, torch.tensor(math.log(20.0))), torch.float32)


def test_automatic_choice_by_materialised_size(monkeypatch):
    monkeypatch.delenv("VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB", raising=False)
    monkeypatch.delenv("VLMO_FAST_CONTRASTIVE_BACKEND", raising=False)
    img, txt = _features(16, 8, device="cpu")
    ls = torch.tensor(2.0)
    assert contrastive_loss(img, txt, ls, return_stats=True)[1].backend == "reference"
    big_img, big_txt = _features(300, 8, device="cpu")
    assert contrastive_loss(big_img, big_txt, ls, return_stats=True)[1].backend == "chunked"
    assert backends.last_used()["contrastive@cpu"] == "chunked"
    monkeypatch.setenv("VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB", "0")
    assert contrastive_loss(img, txt, ls, return_stats=True)[1].backend == "chunked"
    monkeypatch.setenv("VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB", "lots")
    with pytest.raises(ValueError, match="VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB"):
        contrastive_loss(img, txt, ls)
    monkeypatch.delenv("VLMO_FAST_CONTRASTIVE_REFERENCE_MAX_MB")
    # CUDA order (no GPU needed to ask): Triton first, then by size.
    assert backends.preference_order("contrastive", "cuda", n=64, n_global=64)[0] == "triton"
    huge = backends.preference_order("contrastive", "cuda", n=65536, n_global=65536)
    assert huge == ["triton", "chunked", "reference"]
    assert closs.reference_materialised_mb({"n": 1024, "n_global": 2048}) == pytest.approx(48.0)

# The 2-process gloo global batch of every backend, chunked included, is tested in
# tests/test_contrastive.py (test_two_process_gloo_equals_single_process_global_batch).
