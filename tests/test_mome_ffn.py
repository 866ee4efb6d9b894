"""Grouped MoME FFN backends ("triton", "grouped_mm") against the per-expert reference.

On CPU the Triton kernels run through TRITON_INTERPRET=1 (set by conftest.py), so shapes are
tiny; the interpreter uses 16x32x16 blocks, so d/h of 40..72 and T up to ~100 already cover
multi-tile groups and ragged edges. GPU-marked tests repeat the checks at real sizes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmo_fast import backends
from vlmo_fast.mome import (MoMEFeedForward, mome_ffn, mome_ffn_grouped_mm, mome_ffn_reference,
                            mome_ffn_triton)

IMPLS = {"triton": mome_ffn_triton, "grouped_mm": mome_ffn_grouped_mm}
PARAMS = ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
# (forward, gradient) max-abs tolerances relative to the reference's own scale.
TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 6e-2)}


def make_weights(d, h, num_experts, dtype, device="cpu"):
    """Expert weights with non-trivial LN params and biases, so every gradient is exercised."""
    g = torch.Generator().manual_seed(1)
    w = {
        "norm_weight": 1 + 0.3 * torch.randn(num_experts, d, generator=g),
        "norm_bias": 0.3 * torch.randn(num_experts, d, generator=g),
        "fc1_weight": torch.randn(num_experts, d, h, generator=g) / d ** 0.5,
        "fc1_bias": 0.3 * torch.randn(num_experts, h, generator=g),
        "fc2_weight": torch.randn(num_experts, h, d, generator=g) / h ** 0.5,
        "fc2_bias": 0.3 * torch.randn(num_experts, d, generator=g),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in w.items()}


def run(fn, x, ids, weights, gamma=None, dps=None, grad_out=None, **kw):
    """Output and gradients (x, every weight, gamma) of fn, all as fresh leaves."""
    x = x.detach().clone().requires_grad_()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in weights.items()}
    gam = gamma.detach().clone().requires_grad_() if gamma is not None else None
    out = fn(x, ids, *(leaves[k] for k in PARAMS), gam, dps, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(grad_out)
    grads = {"x": x.grad, **{k: v.grad for k, v in leaves.items()}}
    if gam is not None:
        grads["gamma"] = gam.grad
    return out.detach(), grads


def reference_fp32(x, ids, weights, gamma, dps, grad_out):
    """The reference in fp32 on the same (possibly bf16-rounded) inputs."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return run(mome_ffn_reference, up(x), ids, {k: up(v) for k, v in weights.items()}, up(gamma),
               dps, grad_out.float())


def assert_close_to_reference(impl, x, ids, weights, gamma=None, dps=None, **kw):
    dtype = x.dtype
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, grads = run(IMPLS[impl], x, ids, weights, gamma, dps, grad_out, **kw)
    ref_out, ref_grads = reference_fp32(x, ids, weights, gamma, dps, grad_out)
    f_tol, g_tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == x.shape
    scale = ref_out.abs().max().clamp_min(1.0)
    err = (out.float() - ref_out).abs().max()
    assert err <= f_tol * scale, f"{impl} forward error {err:.3g} (scale {scale:.3g})"
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        got = grads[name]
        assert got is not None, f"{impl}: no gradient for {name}"
        assert got.shape == ref.shape and got.dtype == dtype, (name, got.shape, got.dtype)
        scale = ref.abs().max().clamp_min(1e-3)
        err = (got.float() - ref).abs().max()
        assert err <= g_tol * scale, f"{impl} grad {name}: error {err:.3g} vs scale {scale:.3g}"


def inputs(t, d, dtype, ids=None, num_experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, d, generator=g) * 2 + 0.5).to(dtype)
    if ids is None:
        ids = torch.randint(0, num_experts, (t,), generator=g)
    return x, ids


# ---------------------------------------------------------------- forward + every gradient
@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_dps", [False, True])
def test_matches_reference_all_grads(impl, dtype, with_dps):
    # d=40, h=72: neither is a multiple of the blocks; T=53 is odd and spans several tiles.
    t, d, h = 53, 40, 72
    x, ids = inputs(t, d, dtype)
    gamma = (0.5 + torch.randn(d)).to(dtype)
    dps = torch.rand(t) * 2 if with_dps else None
    assert_close_to_reference(impl, x, ids, make_weights(d, h, 3, dtype), gamma, dps)


@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
@pytest.mark.parametrize("case", ["T=1", "empty_expert", "one_expert", "two_experts",
                                  "blocks_of_ids", "no_gamma"])
def test_edge_cases(impl, case):
    d, h, dtype = 32, 48, torch.float32
    gamma = torch.randn(d)
    num_experts = 3
    if case == "T=1":
        x, ids = inputs(1, d, dtype, ids=torch.tensor([2]))
    elif case == "empty_expert":  # no language tokens at all
        x, ids = inputs(41, d, dtype, ids=torch.tensor([0, 2] * 20 + [0]))
    elif case == "one_expert":  # every token to the VL expert (the VL layers)
        x, ids = inputs(37, d, dtype, ids=torch.full((37,), 2))
    elif case == "two_experts":  # a dual-modality block (E = 2)
        num_experts = 2
        x, ids = inputs(45, d, dtype, num_experts=2)
    elif case == "blocks_of_ids":  # [text ; image] as in the published pair layout
        x, ids = inputs(50, d, dtype, ids=torch.tensor([1] * 13 + [0] * 37))
    else:
        gamma = None
        x, ids = inputs(29, d, dtype)
    assert_close_to_reference(impl, x, ids, make_weights(d, h, num_experts, dtype), gamma)


def test_triton_recompute_preact_matches_keep():
    t, d, h = 45, 32, 64
    x, ids = inputs(t, d, torch.float32)
    w = make_weights(d, h, 3, torch.float32)
    gamma, dps = torch.randn(d), torch.rand(t)
    out_a, grads_a = run(mome_ffn_triton, x, ids, w, gamma, dps, recompute_preact=False)
    out_b, grads_b = run(mome_ffn_triton, x, ids, w, gamma, dps, recompute_preact=True)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-5)


def test_triton_batched_noncontiguous_input():
    # x [B, L, d] as a transposed view (non-contiguous), ids int32 non-contiguous, gamma scalar-ish.
    b, l, d, h = 3, 11, 32, 40
    base = torch.randn(l, b, d)
    x = base.transpose(0, 1)
    assert not x.is_contiguous()
    ids = torch.randint(0, 3, (l, b), dtype=torch.int32).t()
    w = make_weights(d, h, 3, torch.float32)
    gamma = torch.randn(d)
    out, grads = run(mome_ffn_triton, x, ids, w, gamma)
    ref, ref_grads = run(mome_ffn_reference, x, ids, w, gamma)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-4)


def test_triton_reductions_over_many_row_blocks(monkeypatch):
    # One program walking every row block: the dgamma and dLN partial sums accumulate across
    # chunks and across expert boundaries inside a program.
    from vlmo_fast.kernels import mome_ffn as K
    monkeypatch.setattr(K, "MAX_REDUCTION_PROGRAMS", 1)
    monkeypatch.setattr(K, "_row_block", lambda d: (4, triton_next_pow2(d)))
    x, ids = inputs(31, 24, torch.float32)
    assert_close_to_reference("triton", x, ids, make_weights(24, 32, 3, torch.float32),
                              torch.randn(24), torch.rand(31))


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


# ---------------------------------------------------------------- backward reductions, chunked
# MAX_REDUCTION_PROGRAMS=3 with 4-row blocks: T=41..45 gives 3 programs of 4 blocks each (the
# last one partial), so every program walks several blocks and expert boundaries fall inside
# blocks and programs. (At real sizes T >= 8k does this with 1024 programs.)
REDUCTION_COUNTS = [[13, 17, 11], [21, 0, 24], [0, 30, 15], [45, 0, 0], [2, 40, 3]]


@pytest.fixture
def chunked_reductions(monkeypatch):
    """Kernel module with 3 reduction programs of 4-row blocks; float buffers the launchers
    allocate start as NaN, so a partial-sum slot or output row left unwritten fails."""
    from vlmo_fast.kernels import mome_ffn as K
    monkeypatch.setattr(K, "MAX_REDUCTION_PROGRAMS", 3)
    monkeypatch.setattr(K, "_row_block", lambda d: (4, triton_next_pow2(d)))
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(empty_like(*a, **k)))
    return K


def _sorted_problem(counts, d, dtype, seed):
    """perm/offsets for `counts` rows per expert in a random token order, plus fresh data."""
    g = torch.Generator().manual_seed(seed)
    t = sum(counts)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(t, generator=g)]
    perm = torch.argsort(ids, stable=True).to(torch.int32)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return ids, perm, _offsets(counts), rand


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", REDUCTION_COUNTS)
def test_ln_backward_scatter_over_chunked_programs(chunked_reductions, dtype, counts):
    """dx = dout + LN_e'(dz) in token order and dLN weight/bias per expert (fp32 sums of
    every expert's rows, zero for an empty expert) when programs walk several blocks; odd d;
    two runs agree bit for bit (fixed order of partial sums)."""
    K = chunked_reductions
    d = 37
    _, perm, offsets, rand = _sorted_problem(counts, d, dtype, seed=len(counts) + counts[0])
    t, num_experts = sum(counts), len(counts)
    x = (rand(t, d) * 2 + 0.5).to(dtype)
    dout = rand(t, d).to(dtype)
    dz = rand(t, d)                                 # the dgrad GEMM writes it in fp32
    weight = (1 + 0.3 * rand(num_experts, d)).to(dtype)
    xs = x[perm.long()].double()
    mean = xs.mean(1)
    rstd = (xs.var(1, unbiased=False) + 1e-6).rsqrt()
    dx, dw, db = K.layernorm_backward_scatter(dz, x, dout, perm, offsets, weight,
                                              mean.float(), rstd.float())
    again = K.layernorm_backward_scatter(dz, x, dout, perm, offsets, weight, mean.float(),
                                         rstd.float())
    assert all(torch.equal(a, b) for a, b in zip((dx, dw, db), again))
    assert dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    # Reference in float64 on the same (rounded) inputs.
    xhat = (xs - mean[:, None]) * rstd[:, None]
    e = torch.repeat_interleave(torch.arange(num_experts), torch.tensor(counts))
    gx = dz.double() * weight.double()[e]
    dxs = (gx - gx.mean(1, keepdim=True) - xhat * (gx * xhat).mean(1, keepdim=True)) * rstd[:, None]
    ref_dx = dout.double().clone()
    ref_dx[perm.long()] += dxs
    ref_dw = torch.zeros(num_experts, d, dtype=torch.float64).index_add_(0, e, dz.double() * xhat)
    ref_db = torch.zeros(num_experts, d, dtype=torch.float64).index_add_(0, e, dz.double())
    dx_tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert (dx.double() - ref_dx).abs().max() <= dx_tol * ref_dx.abs().max()
    for got, ref in ((dw, ref_dw), (db, ref_db)):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max().clamp_min(1.0)
    for empty in (i for i, c in enumerate(counts) if c == 0):
        assert not dw[empty].any() and not db[empty].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[13, 17, 11], [0, 30, 15]])
@pytest.mark.parametrize("gamma_dps", [True, False])
def test_gather_grad_over_chunked_programs(chunked_reductions, dtype, counts, gamma_dps):
    """dY = dout[perm] * dps * gamma (sorted) and dgamma = sum dout[perm] * dps * y (fp32)
    when programs walk several blocks; odd d; bit-identical reruns."""
    K = chunked_reductions
    d = 37
    _, perm, _, rand = _sorted_problem(counts, d, dtype, seed=counts[1])
    t = sum(counts)
    dout, y = rand(t, d).to(dtype), rand(t, d).to(dtype)
    gamma = (0.5 + rand(d)).to(dtype) if gamma_dps else None
    dps = 2 * torch.rand(t) if gamma_dps else None
    dy, dgamma = K.gather_grad(dout, perm, gamma, dps, y)
    dy2, dgamma2 = K.gather_grad(dout, perm, gamma, dps, y)
    assert torch.equal(dy, dy2) and torch.equal(dgamma, dgamma2)
    assert dy.dtype == dtype and dgamma.dtype == torch.float32
    g = dout[perm.long()].double()
    if gamma_dps:
        g = g * dps[perm.long()].double()[:, None]
    ref_dgamma = (g * y.double()).sum(0)
    ref_dy = g * gamma.double() if gamma_dps else g
    dy_tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert (dy.double() - ref_dy).abs().max() <= dy_tol * ref_dy.abs().max()
    assert (dgamma.double() - ref_dgamma).abs().max() <= 1e-5 * ref_dgamma.abs().max()
    dy_only, none = K.gather_grad(dout, perm, gamma, dps, None)
    assert none is None and torch.equal(dy_only, dy)


# ---------------------------------------------------------------- split weight gradient
def _offsets(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)


def _wgrad_chunks(count, split, min_chunk):
    """The documented policy: n = clamp(count // min_chunk, 1, SPLIT) chunks of ceil(count/n)."""
    n = max(1, min(split, count // min_chunk))
    rows = -(-count // n) if count else 0
    return [(c * rows, min(count, (c + 1) * rows)) for c in range(n)]


@pytest.fixture
def wgrad_split(monkeypatch):
    """Sets the interpreter's fixed wgrad SPLIT (rows split in chunks of >= 8 there)."""
    from vlmo_fast.kernels import mome_ffn as K

    def set_split(split):
        monkeypatch.setattr(K, "_INTERP_WGRAD", dict(K._INTERP_BLOCKS, SPLIT=split))
        return K
    return set_split


# Uneven experts: an empty one, one below the 8-row chunk minimum, one split in 2 and one in
# 3 chunks (SPLIT=3), every expert split in 2 (the workspace bound min(E*SPLIT, T//8) is
# tight), and one 2-row remainder chunk next to full ones.
WGRAD_COUNTS = [[45, 0, 7], [0, 19, 33], [16, 16, 16], [26]]


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", WGRAD_COUNTS)
def test_wgrad_split_matches_reference(wgrad_split, split, dtype, counts):
    K = wgrad_split(split)
    kd, nd = 40, 72  # ragged against the interpreter's 16 x 32 tiles
    g = torch.Generator().manual_seed(sum(counts) + split)
    x = torch.randn(sum(counts), kd, generator=g).to(dtype)
    dy = torch.randn(sum(counts), nd, generator=g).to(dtype)
    offsets = _offsets(counts)
    out = K.grouped_wgrad_buffers(x, dy, offsets, len(counts), True, dtype)
    assert out.dw.dtype == dtype and out.db.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for e, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        ref_w = x[a:b].double().T @ dy[a:b].double()
        ref_b = dy[a:b].double().sum(0)
        scale = max(1.0, ref_w.abs().max().item())
        assert (out.dw[e].double() - ref_w).abs().max() <= tol * scale, (e, counts)
        assert (out.db[e].double() - ref_b).abs().max() <= tol * scale, (e, counts)
    assert not out.counters.any(), "the last chunk of each tile resets its counter"
    if split == 1:
        assert out.partials.numel() == 0


@pytest.mark.parametrize("counts", WGRAD_COUNTS)
def test_wgrad_split_sums_chunk_partials_in_order(wgrad_split, counts):
    """Each split expert's partial slots hold x_c^T g_c of its chunks (the policy's row
    ranges, slots packed over split experts), and dW is their fp32 sum in slot order, bit for
    bit, whichever chunk arrived last; two runs agree bit for bit."""
    K = wgrad_split(3)
    kd, nd = 40, 72
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(counts), kd, generator=g)
    dy = torch.randn(sum(counts), nd, generator=g)
    offsets = _offsets(counts)
    out = K.grouped_wgrad_buffers(x, dy, offsets, len(counts), True, torch.float32)
    again = K.grouped_wgrad_buffers(x, dy, offsets, len(counts), True, torch.float32)
    assert torch.equal(out.dw, again.dw) and torch.equal(out.db, again.db)
    slot = 0
    for e, count in enumerate(counts):
        start = offsets[e].item()
        chunks = _wgrad_chunks(count, 3, K._INTERP_MIN_CHUNK)
        if len(chunks) == 1:
            continue
        total_w, total_b = out.partials[slot].clone(), out.bias_partials[slot].clone()
        for c, (lo, hi) in enumerate(chunks):
            rows = slice(start + lo, start + hi)
            torch.testing.assert_close(out.partials[slot + c], x[rows].T @ dy[rows],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.bias_partials[slot + c], dy[rows].sum(0),
                                       rtol=1e-5, atol=1e-5)
            if c:
                total_w += out.partials[slot + c]
                total_b += out.bias_partials[slot + c]
        assert torch.equal(out.dw[e], total_w) and torch.equal(out.db[e], total_b)
        slot += len(chunks)
    assert slot <= out.partials.shape[0] <= len(counts) * 3


def test_triton_unsplit_wgrad_matches_reference(wgrad_split):
    wgrad_split(1)
    x, ids = inputs(53, 40, torch.float32)
    assert_close_to_reference("triton", x, ids, make_weights(40, 72, 3, torch.float32),
                              torch.randn(40), torch.rand(53))


def test_wgrad_split_policy_is_a_function_of_the_autotune_bucket(monkeypatch):
    """On CUDA the largest split (and so the workspace and the configs the autotuner may
    time) depends on T only through the autotune key's bucket, and splits only where an
    expert can hold two chunks; pruning keeps no split larger than the workspace holds."""
    from vlmo_fast.kernels import mome_ffn as K
    monkeypatch.setattr(K, "INTERPRET", False)
    by_bucket = {}
    for t in list(range(1, 70000, 97)) + [4096, 4097, 8192, 8193]:
        split = K._wgrad_max_split(t)
        assert by_bucket.setdefault(K._t_bucket(t), split) == split, t
        assert split == 1 or t >= 2 * K.WGRAD_MIN_CHUNK, t
    assert set(by_bucket.values()) == {1, max(K.WGRAD_SPLITS)}
    configs = K._wgrad_configs()
    for arch in (80, 90):
        for size in (2, 4):
            for max_split in (1, 2, 4):
                kept = K.prune_wgrad_configs(configs, arch, size, MAX_SPLIT=max_split)
                splits = {c.kwargs["SPLIT"] for c in kept}
                assert splits == {s for s in (1,) + K.WGRAD_SPLITS if s <= max_split}


def test_triton_inference_path_no_grad():
    x, ids = inputs(40, 32, torch.bfloat16)
    w = make_weights(32, 48, 3, torch.bfloat16)
    gamma = torch.randn(32).bfloat16()
    with torch.no_grad():
        out = mome_ffn_triton(x, ids, *(w[k] for k in PARAMS), gamma)
        ref = mome_ffn_reference(x.float(), ids, *(w[k].float() for k in PARAMS), gamma.float())
    assert out.dtype == torch.bfloat16 and not out.requires_grad
    assert (out.float() - ref).abs().max() <= 3e-2 * ref.abs().max()


@pytest.mark.parametrize("t,num_experts", [(1, 3), (300, 3), (2200, 2), (517, 1)])
def test_routing_is_stable_counting_sort(t, num_experts):
    # Routing blocks are 128 tokens under the interpreter and the counts are summed 16 blocks
    # at a time: 2200 tokens span 18 blocks (two scan steps), 300 a partial last block.
    from vlmo_fast.kernels import mome_ffn as K
    ids = torch.randint(0, num_experts, (t,))
    ids[: t // 3] = num_experts - 1  # a long run, then random
    perm, offsets = K.route(ids, num_experts)
    expected = torch.argsort(ids, stable=True)
    assert torch.equal(perm.long(), expected)
    counts = torch.bincount(ids, minlength=num_experts)
    assert offsets.tolist() == [0] + counts.cumsum(0).tolist()


# ---------------------------------------------------------------- property-based
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.integers(1, 70), d=st.integers(16, 48), h=st.integers(16, 64),
       num_experts=st.integers(1, 3), seed=st.integers(0, 2**16), use_dps=st.booleans())
def test_property_random_shapes_triton(t, d, h, num_experts, seed, use_dps):
    g = torch.Generator().manual_seed(seed)
    x, ids = inputs(t, d, torch.float32, seed=seed, num_experts=num_experts)
    # Random interleavings, including runs and absent experts.
    ids = torch.randint(0, num_experts, (t,), generator=g)
    gamma = torch.randn(d, generator=g)
    dps = torch.rand(t, generator=g) if use_dps else None
    assert_close_to_reference("triton", x, ids, make_weights(d, h, num_experts, torch.float32),
                              gamma, dps)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 60), d=st.integers(3, 40), h=st.integers(3, 40),
       num_experts=st.integers(1, 3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_random_shapes_grouped_mm(t, d, h, num_experts, seed, dtype):
    # Odd d/h exercise the zero padding to _grouped_mm's 16-byte stride alignment.
    g = torch.Generator().manual_seed(seed)
    x, _ = inputs(t, d, dtype, seed=seed)
    ids = torch.randint(0, num_experts, (t,), generator=g)
    assert_close_to_reference("grouped_mm", x, ids, make_weights(d, h, num_experts, dtype),
                              torch.randn(d, generator=g).to(dtype), torch.rand(t, generator=g))


# ---------------------------------------------------------------- dispatch and errors
def test_dispatch_cpu_auto_and_override():
    m = MoMEFeedForward(32, 64, 3)
    x, ids = torch.randn(2, 5, 32), torch.randint(0, 3, (2, 5))
    m(x, ids)
    auto = backends.last_used()["ffn@cpu"]
    assert auto in ("reference", "grouped_mm")
    assert "backend=auto" in repr(m)
    m.backend = "grouped_mm"
    torch.testing.assert_close(m(x, ids), mome_ffn_reference(
        x, ids, *(getattr(m, k) for k in PARAMS)), rtol=1e-5, atol=1e-5)
    assert backends.last_used()["ffn@cpu"] == "grouped_mm"
    assert "backend=grouped_mm" in repr(m)
    m.backend = "triton"  # TRITON_INTERPRET=1 in tests: allowed explicitly, never chosen by auto
    m(x, ids)
    assert backends.last_used()["ffn@cpu"] == "triton"


def test_triton_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        backends.resolve("ffn", "triton", "cpu")


@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
def test_bad_inputs_raise_clear_errors(impl):
    w = make_weights(32, 48, 3, torch.float32)
    args = [w[k] for k in PARAMS]
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"modality_ids must be in \[0, 2\]"):
        mome_ffn(x, torch.tensor([0, 1, 3, 0]), *args, backend=impl)
    with pytest.raises(ValueError, match=r"modality_ids must be in \[0, 2\]"):
        mome_ffn(x, torch.tensor([0, -1, 2, 0]), *args, backend=impl)
    with pytest.raises(TypeError, match="integer"):
        mome_ffn(x, torch.zeros(4), *args, backend=impl)
    with pytest.raises(ValueError, match="shape"):
        mome_ffn(x, torch.zeros(5, dtype=torch.long), *args, backend=impl)
    with pytest.raises(TypeError, match="bfloat16"):
        mome_ffn(x.bfloat16(), torch.zeros(4, dtype=torch.long), *args, backend=impl)
    with pytest.raises(ValueError, match="hidden size"):
        mome_ffn(torch.randn(4, 30), torch.zeros(4, dtype=torch.long), *args, backend=impl)
    with pytest.raises(ValueError, match="drop_path_scale"):
        mome_ffn(x, torch.zeros(4, dtype=torch.long), *args, drop_path_scale=torch.ones(3),
                 backend=impl)


# ---------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "grouped_mm"])
@pytest.mark.parametrize("d,h", [(768, 3072), (1024, 4096)])
@pytest.mark.parametrize("layout", ["pairs", "packed", "one_expert"])
def test_gpu_real_sizes_bf16(impl, d, h, layout):
    dev = "cuda"
    if layout == "pairs":  # 24 samples of [40 text ; 197 image]
        ids = torch.tensor([1] * 40 + [0] * 197).repeat(24)
    elif layout == "packed":
        ids = torch.cat([torch.tensor([1] * 40 + [0] * 197).repeat(8), torch.zeros(197 * 8),
                         torch.ones(33 * 8)]).long()
    else:
        ids = torch.full((4099,), 2)
    ids = ids.to(dev)
    x = torch.randn(ids.numel(), d, device=dev).bfloat16()
    w = make_weights(d, h, 3, torch.bfloat16, dev)
    gamma = (0.1 * torch.randn(d, device=dev)).bfloat16()
    dps = torch.rand(ids.numel(), device=dev) * 2
    assert_close_to_reference(impl, x, ids, w, gamma, dps)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_gpu_triton_fp32_recompute(recompute):
    dev = "cuda"
    ids = torch.randint(0, 3, (3001,), device=dev)
    x = torch.randn(3001, 768, device=dev)
    w = make_weights(768, 3072, 3, torch.float32, dev)
    assert_close_to_reference("triton", x, ids, w, torch.randn(768, device=dev),
                              torch.rand(3001, device=dev), recompute_preact=recompute)


@pytest.mark.gpu
def test_gpu_triton_no_host_sync():
    dev = "cuda"
    w = make_weights(768, 3072, 3, torch.bfloat16, dev)
    x = torch.randn(2048, 768, device=dev).bfloat16().requires_grad_()
    ids = torch.randint(0, 3, (2048,), device=dev)
    mome_ffn_triton(x, ids, *(w[k] for k in PARAMS)).sum().backward()  # warm up / autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mome_ffn_triton(x, ids, *(w[k] for k in PARAMS))
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- torch.compile, device guard
def test_triton_under_torch_compile_fullgraph():
    """The Triton path traces into one graph (custom ops with fake implementations inside an
    autograd.Function), forward and backward equal to eager, with and without gradients."""
    t, d, h = 37, 32, 48
    x, ids = inputs(t, d, torch.float32)
    w = make_weights(d, h, 3, torch.float32)
    gamma, dps = torch.randn(d), torch.rand(t)

    def ffn(x, ids, gamma, dps, *weights):
        return mome_ffn_triton(x, ids, *weights, gamma, dps)

    torch._dynamo.reset()
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    out, grads = run(lambda x, ids, *a: compiled(x, ids, a[6], a[7], *a[:6]), x, ids, w, gamma, dps)
    ref, ref_grads = run(mome_ffn_triton, x, ids, w, gamma, dps)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ids, gamma, dps, *(w[k] for k in PARAMS)), ref)


def test_every_launch_is_inside_the_tensors_device_guard(monkeypatch):
    """Forward and backward launch each kernel inside device_guard(tensor) (on CUDA that is
    torch.cuda.device(tensor.device), see test_contrastive's mock of it)."""
    from vlmo_fast.kernels import common
    from vlmo_fast.kernels import mome_ffn as K
    active, launched = [], []

    class Guard:
        def __init__(self, tensor):
            self.device = tensor.device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            assert active == [torch.device("cpu")], f"{self.name} launched outside the guard"
            launched.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(common, "device_guard", Guard)
    for name in ("_route_count_kernel", "_route_scatter_kernel", "_gather_ln_kernel", "_gemm", "_wgrad", "_gather_grad_kernel",
                 "_ln_bwd_scatter_kernel"):
        monkeypatch.setattr(K, name, Spy(name, getattr(K, name)))
    x, ids = inputs(20, 32, torch.float32)
    run(mome_ffn_triton, x, ids, make_weights(32, 48, 3, torch.float32), torch.randn(32))
    # forward: route (count, scatter), gather+LN, 2 GEMMs; backward: gather_grad, 2 wgrads,
    # 2 GEMMs, LN bwd
    assert sorted(launched) == sorted(["_route_count_kernel", "_route_scatter_kernel",
                                       "_gather_ln_kernel", "_gemm", "_gemm",
                                       "_gather_grad_kernel", "_wgrad", "_gemm", "_wgrad", "_gemm",
                                       "_ln_bwd_scatter_kernel"])


@pytest.mark.gpu
def test_gpu_second_device_while_current_is_first():
    """Tensors on cuda:1 with cuda:0 current: the same result as on cuda:0 (no peer reads,
    no launch on the wrong device, autotuning on the right one)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x, ids = inputs(1000, 768, torch.bfloat16)
    w = make_weights(768, 3072, 3, torch.bfloat16)
    gamma = (0.1 * torch.randn(768)).bfloat16()
    torch.cuda.set_device(0)
    results = []
    for dev in ("cuda:0", "cuda:1"):
        out, grads = run(mome_ffn_triton, x.to(dev), ids.to(dev),
                         {k: v.to(dev) for k, v in w.items()}, gamma.to(dev))
        results.append((out.cpu(), {k: v.cpu() for k, v in grads.items()}))
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for k in results[0][1]:
        torch.testing.assert_close(results[1][1][k], results[0][1][k], rtol=1e-2, atol=1e-2)
