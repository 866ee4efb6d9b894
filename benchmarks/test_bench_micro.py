"""The micro-benchmarks as pytest-benchmark cases, at small sizes that run on CPU in seconds:

    pytest benchmarks/ --benchmark-only                       # run and print the table
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # save under .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare   # compare with the last save

Same implementations as the scripts (their functions are imported from bench_*.py); the scripts
remain the way to produce benchmarks/results/ (big sizes, floors, ratios, JSON + tables).
`make test` runs `pytest tests` only, so these are never collected by the test suite.
On a CUDA machine the same cases run on the GPU (pytest-benchmark times with a host clock,
so each case synchronises the device).
"""
import math

import pytest
import torch
from bench_contrastive import _backend_fn, _features, naive_loss
from bench_hardneg import batched, ext
from bench_mome import Case, expert_weights, make_fn

from vlmo_fast import _ext

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _synced(fn):
    def run():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    return run


# ----------------------------------------------------------------------------- contrastive

CONTRASTIVE = {"naive": naive_loss, "reference": _backend_fn("reference"),
               "chunked": _backend_fn("chunked")}


@pytest.mark.benchmark(group="contrastive fwd+bwd N=1024 D=256 fp32")
@pytest.mark.parametrize("impl", list(CONTRASTIVE))
def test_contrastive(benchmark, impl):
    img, txt = _features(1024, 256, torch.float32, DEVICE)
    logit_scale = torch.tensor(math.log(1 / 0.07), device=DEVICE, requires_grad=True)
    fn = CONTRASTIVE[impl]

    def step():
        img.grad = txt.grad = logit_scale.grad = None
        loss = fn(img, txt, logit_scale)
        loss.backward()
        return loss

    loss = benchmark(_synced(step))
    assert math.isfinite(float(loss))


# ----------------------------------------------------------------------------- hard negatives

@pytest.mark.benchmark(group="hard negatives B=256 N=8192 fp32")
@pytest.mark.parametrize("impl", ["batched", "ext", "read_floor"])
def test_hard_negatives(benchmark, impl):
    if impl == "ext" and _ext.unavailable_reason(DEVICE) is not None:
        pytest.skip(_ext.unavailable_reason(DEVICE))
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(256, 8192, device=DEVICE, generator=gen) * 5.0
    positive = torch.randint(0, 8192, (256,), device=DEVICE, generator=gen)
    fn = {"batched": lambda: batched(logits, positive), "ext": lambda: ext(logits, positive),
          "read_floor": lambda: logits.sum()}[impl]
    out = benchmark(_synced(fn))
    if impl != "read_floor":
        assert bool((out != positive).all())


# ----------------------------------------------------------------------------- MoME FFN

@pytest.mark.benchmark(group="mome fwd+bwd pairs T~1k d=128 h=512 fp32")
@pytest.mark.parametrize("impl", ["reference_slice", "expert_loop", "grouped_mm", "dense"])
def test_mome_ffn(benchmark, impl):
    d, h = 128, 512
    case = Case("pairs", 1024)
    gen = torch.Generator().manual_seed(0)
    w, gamma = expert_weights(d, h, gen, DEVICE)
    x = torch.randn(case.tokens, d, generator=gen).to(DEVICE).requires_grad_()
    ids = torch.tensor(case.ids_list, device=DEVICE)
    grad_out = torch.randn(case.tokens, d, generator=gen).to(DEVICE)
    fn = make_fn(impl, case, w)
    leaves = [x, gamma, *w.values()]
    grads = benchmark(_synced(lambda: torch.autograd.grad(fn(x, ids, gamma), leaves, grad_out,
                                                          allow_unused=True)))
    assert grads[0].shape == x.shape
