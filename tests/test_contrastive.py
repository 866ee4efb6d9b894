"""Contrastive (ITC) loss: Triton kernels (CPU interpreter here) and the PyTorch reference
against a float64 materialised loss; 2-process gloo global batch; dispatch; argument errors.

Interpreted shapes stay small (tiles are 16 x 16 under the interpreter, so they still span
many tiles and D-chunks); the `gpu`-marked tests run real sizes on a CUDA device.
"""
import math
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from vlmo_fast import backends
from vlmo_fast.losses import ContrastiveLoss, contrastive_loss
from vlmo_fast.losses import contrastive as closs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _features(n, d, dtype=torch.float32, device=DEVICE, match=0.0, seed=0):
    """L2-normalised pairs; `match` > 0 makes text i resemble image i (accuracy tests)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(match * img + torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return img.to(device, dtype), txt.to(device, dtype)


def _float64_loss(img, txt, logit_scale, row_weight=None, col_weight=None):
    """Materialised symmetric InfoNCE in float64 on the given (already rounded) values.
    Optional per-row / per-column weights generalise the two means (distributed test)."""
    img = img.detach().double().requires_grad_()
    txt = txt.detach().double().requires_grad_()
    ls = logit_scale.detach().double().reshape(()).requires_grad_()
    n = img.shape[0]
    logits = ls.exp() * img @ txt.t()
    target = torch.arange(n, device=img.device)
    row_terms = F.cross_entropy(logits, target, reduction="none")
    col_terms = F.cross_entropy(logits.t(), target, reduction="none")
    rw = torch.ones(n, dtype=torch.float64, device=img.device) if row_weight is None else row_weight
    cw = torch.ones(n, dtype=torch.float64, device=img.device) if col_weight is None else col_weight
    loss = ((rw * row_terms).sum() + (cw * col_terms).sum()) / (2 * n)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": ls.grad,
            "row_lse": logits.detach().logsumexp(1), "col_lse": logits.detach().logsumexp(0),
            "i2t": (logits.argmax(1) == target).double().mean(),
            "t2i": (logits.argmax(0) == target).double().mean()}


def _run(img, txt, logit_scale, backend, **kw):
    img = img.detach().clone().requires_grad_()
    txt = txt.detach().clone().requires_grad_()
    ls = logit_scale.detach().clone().requires_grad_()
    loss, stats = contrastive_loss(img, txt, ls, backend=backend, return_stats=True, **kw)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": ls.grad, "stats": stats}


# Gradient tolerances are relative to the largest reference gradient entry. bf16 inputs are
# compared with float64 on the SAME bf16 values, so what remains is fp32 accumulation and the
# bf16 rounding of dL/dS before the gradient GEMMs (as in flash attention), plus bf16 outputs.
# When the loss saturates (near-perfect pairs at a large scale), dL/dS = p - 1 cancels in the
# working precision: the absolute floor is that rounding, eps * scale / N per feature entry.
TOL = {torch.float32: dict(loss=2e-5, grad=2e-4, eps=1.2e-7),
       torch.bfloat16: dict(loss=2e-4, grad=3e-2, eps=8e-3)}


def _assert_close(got, ref, dtype, what="", check_loss=True):
    tol = TOL[dtype]
    assert not check_loss or abs(float(got["loss"]) - float(ref["loss"])) <= tol["loss"] * max(1.0, abs(float(ref["loss"]))), what
    floor = tol["eps"] * float(ref["row_lse"].abs().max()) / ref["img"].shape[0]
    for key in ("img", "txt"):
        err = (got[key].double() - ref[key]).abs().max()
        assert err <= tol["grad"] * ref[key].abs().max() + floor, f"{what} d{key}: {float(err)}"
    assert abs(float(got["scale"]) - float(ref["scale"])) <= tol["grad"] * max(1.0, abs(float(ref["scale"]))), what


CASES = [  # (n, D, scale): n off the tile size, n = 1 and 2, D from 32 to 1024, scale 1..100
    (1, 32, 1.0), (2, 32, 100.0), (37, 40, 1.0 / 0.07), (50, 64, 100.0), (19, 1024, 30.0),
    (45, 96, 1.0),
]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,scale", CASES)
def test_matches_float64_reference(n, d, scale, dtype, backend):
    img, txt = _features(n, d, dtype, match=1.0)
    ls = torch.tensor(math.log(scale), device=DEVICE)
    got = _run(img, txt, ls, backend)
    ref = _float64_loss(img, txt, ls)
    _assert_close(got, ref, dtype, f"{backend} n={n} d={d} scale={scale}")
    assert got["stats"].backend == backend
    torch.testing.assert_close(got["stats"].row_lse.double(), ref["row_lse"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got["stats"].col_lse.double(), ref["col_lse"], atol=1e-4, rtol=1e-5)
    assert got["img"].dtype == dtype and got["txt"].dtype == dtype


@pytest.mark.parametrize("span", [-1.0, 1e9], ids=["two-exp-path", "one-exp-path"])
def test_each_exponential_path_alone(monkeypatch, span):
    """Force every tile onto one path: -1 never takes the single-shift shortcut, 1e9 always
    does (safe here: normalised features at scale 50 keep spans far below fp32 range)."""
    from vlmo_fast.kernels import contrastive as kern
    monkeypatch.setattr(kern, "SAFE_SPAN2", span)
    img, txt = _features(40, 48, match=0.5)
    ls = torch.tensor(math.log(50.0), device=DEVICE)
    _assert_close(_run(img, txt, ls, "triton"), _float64_loss(img, txt, ls), torch.float32, f"span {span}")


def test_extreme_scale_and_unnormalised_features():
    """Logit spans of thousands: fp32 exp would underflow or overflow with a shared shift,
    so tiles must switch to per-row / per-column shifts."""
    img, txt = _features(33, 32, match=0.3)
    img = img * torch.linspace(0.2, 3.0, 33, device=DEVICE)[:, None]
    ls = torch.tensor(math.log(1000.0), device=DEVICE)
    got = _run(img, txt, ls, "triton")
    ref = _float64_loss(img, txt, ls)
    assert torch.isfinite(got["loss"]) and torch.isfinite(got["img"]).all()
    _assert_close(got, ref, torch.float32, "scale 1000")


@pytest.mark.parametrize("max_programs", [1, 3, 64])
def test_forward_partials_any_program_split(max_programs):
    """Rectangular blocks with a target offset (a rank's view): persistent row loops (few
    programs) and column splits (many programs) give the same statistics."""
    from vlmo_fast.kernels import contrastive as kern
    x, _ = _features(35, 32, seed=1)
    _, y = _features(70, 32, seed=2)
    ls = torch.tensor(math.log(20.0), device=DEVICE)
    out = kern.contrastive_forward(x, y, ls, target_offset=35, track_max=True, max_programs=max_programs)
    s = ls.double().exp() * x.double() @ y.double().t()
    torch.testing.assert_close(out.row_lse.double(), s.logsumexp(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.col_lse.double(), s.logsumexp(0), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.row_max.double(), s.amax(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.col_max.double(), s.amax(0), atol=1e-4, rtol=1e-5)
    rows = torch.arange(35)
    torch.testing.assert_close(out.diag.double(), s[rows, rows + 35], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("max_programs", [1, 64])
def test_backward_column_split_matches_float64(max_programs):
    """Few rows against many columns (one rank's view): with spare programs the backward
    splits the columns and sums fp32 partials in a fixed order; either way dX and
    d(logit_scale) equal the float64 gradient of the rows' and columns' terms."""
    from vlmo_fast.kernels import contrastive as kern
    x, _ = _features(20, 32, seed=1)
    _, y = _features(90, 32, seed=2)
    ls = torch.tensor(math.log(20.0), device=DEVICE)
    offset = 30
    x64 = x.double().requires_grad_()
    s64 = ls.double().exp().requires_grad_()
    s = s64 * x64 @ y.double().t()
    rows = torch.arange(20)
    row_w = torch.rand(20, dtype=torch.float64) + 0.5
    col_w = torch.rand(90, dtype=torch.float64) + 0.5
    # sum_i w_i (LSE_row_i - S_i,t(i)) + sum_j w_j (LSE_col_j(over these rows) - S_t^-1(j),j)
    cols_hit = rows + offset
    loss = (row_w * (s.logsumexp(1) - s[rows, cols_hit])).sum() \
        + (col_w * s.logsumexp(0)).sum() - (col_w[cols_hit] * s[rows, cols_hit]).sum()
    loss.backward()
    stats = kern.contrastive_forward(x, y, ls, target_offset=offset)
    dx, dscale = kern.contrastive_backward_operand(
        x, y, ls, stats.row_lse, stats.col_lse, row_w.float(), col_w.float(),
        target_offset=offset, compute_dscale=True, max_programs=max_programs)
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-5, rtol=1e-4)
    # d/dlogit_scale = scale * dL/dscale
    torch.testing.assert_close(dscale.double(), s64.grad * s64.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_accuracy_outputs(backend):
    img, txt = _features(48, 32, match=0.9, seed=3)  # partly matched: accuracy strictly in (0, 1)
    ls = torch.tensor(math.log(1 / 0.07), device=DEVICE)
    ref = _float64_loss(img, txt, ls)
    assert 0.0 < float(ref["i2t"]) < 1.0
    stats = _run(img, txt, ls, backend)["stats"]
    assert float(stats.i2t_accuracy) == pytest.approx(float(ref["i2t"]), abs=1.5 / 48)
    assert float(stats.t2i_accuracy) == pytest.approx(float(ref["t2i"]), abs=1.5 / 48)


def test_dispatch_auto_and_explicit():
    img, txt = _features(8, 32)
    ls = torch.tensor(math.log(10.0), device=DEVICE)
    _, stats = contrastive_loss(img, txt, ls, return_stats=True)
    assert stats.backend == ("triton" if DEVICE == "cuda" else "reference")
    assert backends.last_used()[f"contrastive@{torch.device(DEVICE).type}"] == stats.backend
    _, stats = contrastive_loss(img, txt, ls, backend="triton", return_stats=True)
    assert stats.backend == "triton"
    with pytest.raises(ValueError, match="unknown"):
        contrastive_loss(img, txt, ls, backend="cuda_magic")


def test_module_owns_learnable_logit_scale():
    loss_fn = ContrastiveLoss(backend="triton")
    assert float(loss_fn.logit_scale) == pytest.approx(math.log(1 / 0.07))
    img, txt = _features(12, 32, device="cpu")
    loss_fn.to(DEVICE)
    loss = loss_fn(img.to(DEVICE), txt.to(DEVICE))
    loss.backward()
    ref = _float64_loss(img, txt, torch.tensor(math.log(1 / 0.07)))
    assert float(loss) == pytest.approx(float(ref["loss"]), rel=1e-5)
    assert float(loss_fn.logit_scale.grad) == pytest.approx(float(ref["scale"]), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="logit_scale is required"):
        ContrastiveLoss(learn_logit_scale=False)(img, txt)


def test_argument_errors_name_the_argument():
    img, txt = _features(8, 32)
    ls = torch.tensor(2.0, device=DEVICE)
    with pytest.raises(ValueError, match="image_features has N=8 rows but text_features has N=7"):
        contrastive_loss(img, txt[:7], ls)
    with pytest.raises(ValueError, match="D=32 but text_features has D=16"):
        contrastive_loss(img, txt[:, :16], ls)
    with pytest.raises(ValueError, match="text_features must be 2-D"):
        contrastive_loss(img, txt[None], ls)
    with pytest.raises(TypeError, match=r"image_features \(torch.float32\) and text_features \(torch.bfloat16\)"):
        contrastive_loss(img, txt.bfloat16(), ls)
    with pytest.raises(TypeError, match="image_features has unsupported dtype torch.float64"):
        contrastive_loss(img.double(), txt.double(), ls)
    with pytest.raises(ValueError, match="logit_scale must be a single"):
        contrastive_loss(img, txt, torch.ones(2, device=DEVICE))
    bad = txt.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="text_features contains non-finite"):
        contrastive_loss(img, bad, ls, check_finite=True)
    with pytest.raises(ValueError, match="gather must be"):
        contrastive_loss(img, txt, ls, gather="yes")


@pytest.mark.parametrize("upstream", [1.5e-5, 1e-3])
def test_fp16_gradient_tile_does_not_underflow(upstream):
    """dL/dS ~ upstream / (2N) * p is far below fp16's smallest subnormal at large N (emulated
    here at N = 128 by a small upstream gradient): the kernel scales G by a power of two before
    rounding it to fp16. Without the scaling the image-gradient error is 0.41 (1.5e-5) and
    0.018 (1e-3); with it, only the fp16 rounding of the result itself remains."""
    from vlmo_fast.kernels import contrastive as kern
    img, txt = _features(128, 32, torch.float16, match=1.0, seed=4)
    ls = torch.tensor([math.log(1 / 0.07)], device=DEVICE)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    (kern.fused_contrastive(a, b, ls)[0] * upstream).backward()
    ref = _float64_loss(img, txt, ls)
    for got, want in ((a.grad, ref["img"] * upstream), (b.grad, ref["txt"] * upstream)):
        scale = want.abs().max()
        rounding = (want.half().double() - want).abs().max() / scale
        err = (got.double() - want).abs().max() / scale
        assert err <= rounding + 5e-3, f"fp16 gradient relative error {float(err):.3g}"


def test_fused_op_under_torch_compile_fullgraph():
    """The Triton op traces into one graph (custom ops with fake implementations inside an
    autograd.Function): loss and all three gradients equal the eager kernels'."""
    from vlmo_fast.kernels import contrastive as kern
    img, txt = _features(21, 32, match=0.5)
    ls = torch.tensor([math.log(20.0)], device=DEVICE)

    def loss_and_grads(fn):
        a, b, s = (t.clone().requires_grad_() for t in (img, txt, ls))
        share, row_lse, col_lse, i2t, t2i = fn(a, b, s)
        share.backward()
        return share.detach(), row_lse, col_lse, i2t, a.grad, b.grad, s.grad

    def fused(a, b, s):
        return kern.fused_contrastive(a, b, s, None, True)

    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    for got, want in zip(loss_and_grads(compiled), loss_and_grads(fused)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_config_fits_the_device_shared_memory():
    """The launch config follows the device's opt-in shared memory: a 99 KB part (sm_86/89)
    gets a config whose estimate fits where an H100 keeps larger resident tiles.
    tests/test_compile_matrix.py checks the estimates against the compiled kernels."""
    from vlmo_fast.kernels import common, contrastive as kern
    chosen = {}
    for arch in (80, 86, 90):
        facts = common.arch_facts(arch)
        with common.offline_target(facts):
            for d, dtype in ((256, torch.bfloat16), (128, torch.float32), (768, torch.float16)):
                size = torch.empty((), dtype=dtype).element_size()
                fp32 = dtype == torch.float32
                fwd = kern.forward_config(d, dtype, torch.device("meta"))
                bwd = kern.backward_config(d, dtype, torch.device("meta"))
                assert kern.estimate_shared_memory(fwd, size, False, arch, fp32) <= facts.shared_memory
                assert kern.estimate_shared_memory(bwd, size, True, arch, fp32) <= facts.shared_memory
                chosen[arch, d, dtype] = fwd
    # bf16 D=256: three stages of resident tiles on H100, fewer on the 99 KB part.
    assert chosen[90, 256, torch.bfloat16].num_stages == 3 and chosen[90, 256, torch.bfloat16].RESIDENT
    assert chosen[86, 256, torch.bfloat16] != chosen[90, 256, torch.bfloat16]


def test_config_rejected_by_the_device_falls_back(monkeypatch):
    """If a device refuses a config at launch (OutOfResources: shared memory on an arch the
    compile matrix does not cover), the launcher remembers it and uses the next candidate;
    results are unchanged."""
    from triton.runtime.errors import OutOfResources
    from vlmo_fast.kernels import common, contrastive as kern
    img, txt = _features(24, 32, torch.bfloat16, match=0.5)  # 16-bit: 128-row configs first
    ls = torch.tensor([math.log(20.0)], device=DEVICE)
    want = kern.contrastive_forward(img, txt, ls)
    tried = []
    real_launch = common.launch

    def picky_launch(kernel, grid, *args, **meta):
        tried.append(meta["BLOCK_M"])
        if meta["BLOCK_M"] == 128:  # this "device" refuses the 128-row tiles
            raise OutOfResources(200000, 101376, "shared memory")
        return real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(kern, "launch", picky_launch)
    monkeypatch.setattr(kern, "_REJECTED", {})
    with common.offline_target(common.arch_facts(90)):  # GPU configs, run by the interpreter
        got = kern.contrastive_forward(img, txt, ls)
        again = kern.contrastive_forward(img, txt, ls)
    # Two 128-row candidates refused, then the 64-row one; the second call starts there.
    assert tried == [128, 128, 64, 64]
    for a, b, c in zip(got, again, want):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)


def test_launches_enter_the_tensors_device(monkeypatch):
    """Every kernel launch of forward and both backward operands runs inside the device
    guard of its tensors (on CUDA: torch.cuda.device(tensor.device))."""
    from vlmo_fast.kernels import common, contrastive as kern
    active, entered = [], []

    class Guard:
        def __init__(self, tensor):
            self.device = tensor.device

        def __enter__(self):
            active.append(self.device)
            entered.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert active == [torch.device(DEVICE)], "launch outside the device guard"
            launched.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(common, "device_guard", Guard)
    for name in ("_contrastive_fwd_kernel", "_contrastive_bwd_kernel"):
        monkeypatch.setattr(kern, name, Spy(getattr(kern, name)))
    img, txt = _features(9, 32)
    ls = torch.tensor([1.0], device=DEVICE, requires_grad=True)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    kern.fused_contrastive(a, b, ls)[0].backward()
    assert len(launched) == 3 and len(entered) == 3


def test_device_guard_selects_the_tensors_cuda_device(monkeypatch):
    """device_guard(t) for a tensor on cuda:1 is torch.cuda.device(cuda:1) (mocked: no GPU)."""
    from vlmo_fast.kernels import common
    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: made.append(device) or "guard")

    class OnCuda1:
        device = torch.device("cuda", 1)

    assert common.device_guard(OnCuda1()) == "guard" and made == [torch.device("cuda", 1)]
    assert common.device_guard(torch.zeros(1)).__class__.__name__ == "nullcontext"


@pytest.mark.gpu
def test_gpu_second_device_while_current_is_first():
    """Tensors on cuda:1 with cuda:0 current: same loss and gradients as on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    img, txt = _features(300, 256, torch.bfloat16, device="cuda:0", match=1.0)
    ls = torch.tensor(math.log(1 / 0.07), device="cuda:0")
    on0 = _run(img, txt, ls, "triton")
    torch.cuda.set_device(0)
    on1 = _run(img.to("cuda:1"), txt.to("cuda:1"), ls.to("cuda:1"), "triton")
    for key in ("loss", "img", "txt", "scale"):
        torch.testing.assert_close(on1[key].to("cuda:0"), on0[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2-process gloo

WORLD = 2
LOCAL_N = 21  # not a tile multiple; global batch 42


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GLOO_BACKENDS = ("triton", "chunked", "reference")


def _gloo_worker(rank, port, data_path, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    data = torch.load(data_path)
    rows = slice(rank * LOCAL_N, (rank + 1) * LOCAL_N)
    from vlmo_fast.losses import contrastive_chunked
    contrastive_chunked.BLOCK_ROWS, contrastive_chunked.BLOCK_COLS = 4, 9  # tiles straddle ranks
    results = {}
    for backend in GLOO_BACKENDS:
        for reduction, weighted in (("sum", False), ("mean", False), ("sum", True)):
            upstream = float(rank + 1) if weighted else 1.0
            img = data["img"][rows].clone().requires_grad_()
            txt = data["txt"][rows].clone().requires_grad_()
            ls = data["ls"].clone().requires_grad_()
            loss, stats = contrastive_loss(img, txt, ls, backend=backend, return_stats=True,
                                           rank_grad_reduction=reduction)
            (loss * upstream).backward()
            results[(backend, reduction, weighted)] = {
                "loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": ls.grad,
                "row_lse": stats.row_lse, "col_lse": stats.col_lse,
                "i2t": stats.i2t_accuracy, "t2i": stats.t2i_accuracy}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_single_process_global_batch():
    import torch.multiprocessing as mp
    img, txt = _features(WORLD * LOCAL_N, 48, device="cpu", match=0.8, seed=5)
    ls = torch.tensor(math.log(30.0))
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.pt")
        torch.save({"img": img, "txt": txt, "ls": ls}, data_path)
        mp.spawn(_gloo_worker, args=(_free_port(), data_path, tmp), nprocs=WORLD, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    ref = _float64_loss(img, txt, ls)
    # Rank r's upstream gradient r + 1 weights the terms of the rows and columns it owns.
    owner_weight = torch.arange(1, WORLD + 1, dtype=torch.float64).repeat_interleave(LOCAL_N)
    ref_weighted = _float64_loss(img, txt, ls, owner_weight, owner_weight)
    for backend in GLOO_BACKENDS:
        for reduction, weighted in (("sum", False), ("mean", False), ("sum", True)):
            res = [r[(backend, reduction, weighted)] for r in per_rank]
            want = ref_weighted if weighted else ref
            multiplier = WORLD if reduction == "mean" else 1
            got = {"loss": res[0]["loss"],
                   "img": torch.cat([r["img"] for r in res]) / multiplier,
                   "txt": torch.cat([r["txt"] for r in res]) / multiplier,
                   "scale": sum(r["scale"] for r in res) / multiplier}
            what = f"{backend} {reduction} weighted={weighted}"
            # Every rank reports the global (unweighted) loss value.
            for r in res:
                assert float(r["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5), what
            # (the weighted objective has no reported value: only its gradients are compared)
            _assert_close(got, want, torch.float32, what, check_loss=not weighted)
        res = [r[(backend, "sum", False)] for r in per_rank]
        torch.testing.assert_close(torch.cat([r["row_lse"] for r in res]).double(), ref["row_lse"],
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r["col_lse"] for r in res]).double(), ref["col_lse"],
                                   atol=1e-4, rtol=1e-5)
        assert float(res[0]["i2t"]) == pytest.approx(float(ref["i2t"]), abs=1.5 / (WORLD * LOCAL_N))
        assert float(res[1]["t2i"]) == pytest.approx(float(ref["t2i"]), abs=1.5 / (WORLD * LOCAL_N))


def test_without_process_group_gather_is_plain_loss():
    img, txt = _features(10, 32)
    ls = torch.tensor(math.log(10.0), device=DEVICE)
    a = contrastive_loss(img, txt, ls, gather=True, backend="reference")
    b = contrastive_loss(img, txt, ls, gather=False, backend="reference")
    assert float(a) == float(b) == pytest.approx(float(_float64_loss(img, txt, ls)["loss"]), rel=1e-6)


# ----------------------------------------------------------------------------- GPU, real sizes

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d", [(4096, 256), (3000, 768), (1024, 1024)])
def test_gpu_real_sizes_match_float64(n, d, dtype):
    img, txt = _features(n, d, dtype, device="cuda", match=1.0)
    for scale in (1.0 / 0.07, 100.0):
        ls = torch.tensor(math.log(scale), device="cuda")
        _assert_close(_run(img, txt, ls, "triton"), _float64_loss(img, txt, ls), dtype, f"{n} {d} {scale}")


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_batch():
    """N = 32k bf16: the fused loss must stay far below one N x N fp32 logits matrix (4 GiB)."""
    n, d = 32768, 256
    img, txt = _features(n, d, torch.bfloat16, device="cuda")
    img.requires_grad_()
    txt.requires_grad_()
    ls = torch.tensor(math.log(1 / 0.07), device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    contrastive_loss(img, txt, ls, backend="triton").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.05 * n * n * 4, f"peak {peak / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- scale bounds, NaN

@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_largest_representable_scale_gives_a_finite_loss(backend):
    """logit_scale up to log(float32 max) ~ 88.72 keeps the loss finite (normalised features);
    above it exp() is inf and the call raises instead of returning NaN."""
    img, txt = _features(12, 16, device="cpu", match=0.5)
    got = _run(img, txt, torch.tensor(88.0), backend)
    assert math.isfinite(float(got["loss"]))
    # The case: identical features (the loss itself stays small) at the very limit.
    got = _run(img, img, torch.tensor(closs.LOG_FLOAT32_MAX - 1e-3), backend)
    assert math.isfinite(float(got["loss"]))
    for value in (89.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="logit_scale must be finite and <= 88.72.*max_logit_scale"):
            contrastive_loss(img, txt, torch.tensor(value), backend=backend)


def test_max_logit_scale_clamps_like_clip():
    img, txt = _features(12, 16, device="cpu", match=0.5)
    cap = math.log(100.0)
    ls = torch.tensor(89.0, requires_grad=True)
    loss = contrastive_loss(img, txt, ls, max_logit_scale=cap)
    assert float(loss) == pytest.approx(float(_float64_loss(img, txt, torch.tensor(cap))["loss"]), rel=1e-5)
    loss.backward()
    assert float(ls.grad) == 0.0  # clamped: no gradient above the bound, as after CLIP's clamp_
    below = torch.tensor(2.0)
    assert float(contrastive_loss(img, txt, below, max_logit_scale=cap)) == float(contrastive_loss(img, txt, below))
    for bad in (100.0, float("nan"), "4.6", True):
        with pytest.raises(ValueError, match="max_logit_scale must be None or a finite number"):
            contrastive_loss(img, txt, below, max_logit_scale=bad)
    module = ContrastiveLoss(max_logit_scale=cap)
    with torch.no_grad():
        module.logit_scale.fill_(10.0)
    assert float(module(img, txt)) == pytest.approx(float(loss), rel=1e-6)
    assert "max_logit_scale" in repr(module)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_nan_features_report_no_accuracy(backend):
    img, txt = _features(10, 16, device="cpu", match=1.0)
    txt[4, 2] = float("nan")
    loss, stats = contrastive_loss(img, txt, torch.tensor(math.log(20.0)), backend=backend,
                                   return_stats=True)
    assert math.isnan(float(loss))
    assert math.isnan(float(stats.i2t_accuracy)) and math.isnan(float(stats.t2i_accuracy))


@pytest.mark.parametrize("temperature", [0, 0.0, -0.07, float("inf"), float("nan"), "0.07", 1e-40])
def test_init_temperature_must_be_positive_finite(temperature):
    with pytest.raises(ValueError, match="init_temperature"):
        ContrastiveLoss(init_temperature=temperature)
