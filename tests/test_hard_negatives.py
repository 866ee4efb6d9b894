"""Hard-negative sampling (vlmo_fast.hard_negatives, op torch.ops.vlmo_fast.hard_negatives).

Distribution tests draw many samples of one row by repeating it over many rows (each row gets
its own counter-based random numbers) and compare the counts with the exact renormalised
softmax by a chi-square test. Seeds are fixed, so every test is deterministic; the p-value
threshold (1e-4) only decides whether a fixed outcome is plausible under the exact law.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from vlmo_fast import backends
from vlmo_fast.hard_negatives import (HARD_NEGATIVE_CODES, hard_negative_row_codes,
                                      sample_global_hard_negatives, sample_hard_negatives)

P_MIN = 1e-4
BACKENDS = ["ext", "torch"]


def exact_probs(row: torch.Tensor, positive: int, excluded=None) -> np.ndarray:
    """softmax(row) with the positive (and excluded columns) removed, renormalised (float64)."""
    logits = row.double().clone()
    logits[positive] = float("-inf")
    if excluded is not None:
        logits[excluded] = float("-inf")
    return torch.softmax(logits, 0).numpy()


def chi_square_p(counts: np.ndarray, probs: np.ndarray, draws: int, min_expected: float = 5.0):
    """p-value of the counts under probs, pooling low-expectation columns (sorted by
    probability) into bins of at least `min_expected` expected draws."""
    assert counts[probs == 0].sum() == 0, "drew a column of probability 0"
    order = np.argsort(probs)
    obs_bins, exp_bins = [], []
    obs_acc = exp_acc = 0.0
    for j in order:
        if probs[j] == 0:
            continue
        obs_acc += counts[j]
        exp_acc += probs[j] * draws
        if exp_acc >= min_expected:
            obs_bins.append(obs_acc)
            exp_bins.append(exp_acc)
            obs_acc = exp_acc = 0.0
    if exp_acc > 0:  # remainder joins the last bin
        if obs_bins:
            obs_bins[-1] += obs_acc
            exp_bins[-1] += exp_acc
        else:
            obs_bins.append(obs_acc)
            exp_bins.append(exp_acc)
    if len(obs_bins) < 2:
        return 1.0
    return stats.chisquare(np.array(obs_bins), np.array(exp_bins)).pvalue


def draw_repeated(row, positive, draws, backend, seed, excluded=None, dtype=torch.float32):
    logits = row.to(dtype).unsqueeze(0).expand(draws, -1)  # stride-0 rows: no copy
    pos = torch.full((draws,), positive, dtype=torch.int64)
    mask = None
    if excluded is not None:
        mask = torch.zeros(row.shape[0], dtype=torch.bool)
        mask[excluded] = True
        mask = mask.unsqueeze(0).expand(draws, -1)
    out = sample_hard_negatives(logits, pos, exclude_mask=mask, seed=seed, backend=backend)
    return np.bincount(out.numpy(), minlength=row.shape[0])


def _rows():
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(40, generator=g)
    rows = {
        "t=0.3": base / 0.3,      # peaked
        "t=1": base,
        "t=5": base / 5.0,        # flat-ish
        "uniform": torch.zeros(40),
        # nearly one-hot among the allowed columns: column 7 takes ~99.9% of the mass, and the
        # positive (column 3) is even larger, which must not squash the others to zero.
        "one-hot": torch.cat([torch.full((3,), -2.0), torch.tensor([50.0]), torch.full((3,), -2.0),
                              torch.tensor([7.0]), torch.full((32,), -2.0)]),
    }
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_rows()))
def test_distribution_matches_softmax(case, backend):
    row = _rows()[case]
    draws = 20000
    counts = draw_repeated(row, 3, draws, backend, seed=11)
    probs = exact_probs(row, 3)
    assert counts[3] == 0
    assert chi_square_p(counts, probs, draws) > P_MIN


@pytest.mark.parametrize("backend", BACKENDS)
def test_distribution_long_row_with_exclusions(backend):
    # Several 256-column chunks of the CPU kernel's two-level search, plus -inf and excluded
    # columns.
    g = torch.Generator().manual_seed(5)
    row = torch.randn(1500, generator=g) * 2.0
    row[100:110] = float("-inf")
    excluded = torch.arange(700, 1500, 7)
    draws = 30000
    counts = draw_repeated(row, 1234, draws, backend, seed=3, excluded=excluded)
    probs = exact_probs(row, 1234, excluded)
    assert counts[1234] == 0 and counts[excluded].sum() == 0 and counts[100:110].sum() == 0
    assert chi_square_p(counts, probs, draws) > P_MIN


def test_detects_a_wrong_distribution():
    # The chi-square check has power at these draw counts: the same counts are rejected
    # against a law only 10% away from the exact one (mixed with uniform over the allowed).
    row = _rows()["t=1"]
    draws = 20000
    counts = draw_repeated(row, 3, draws, "ext", seed=11)
    exact = exact_probs(row, 3)
    uniform = (np.arange(40) != 3) / 39.0
    assert chi_square_p(counts, exact, draws) > P_MIN
    assert chi_square_p(counts, 0.9 * exact + 0.1 * uniform, draws) < P_MIN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_and_strides_read_the_same_values(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g).to(dtype)
    pos = torch.randint(0, 300, (64,), generator=g)
    ref = sample_hard_negatives(logits.float(), pos, seed=9, backend="ext")
    assert torch.equal(sample_hard_negatives(logits, pos, seed=9, backend="ext"), ref)
    transposed = logits.float().t().contiguous().t()  # same values, column-major strides
    assert torch.equal(sample_hard_negatives(transposed, pos, seed=9, backend="ext"), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_and_excluded_never_drawn(backend):
    g = torch.Generator().manual_seed(2)
    rows, cols = 512, 96
    # Peaked rows whose positive is the largest logit: the most tempting column is forbidden.
    logits = torch.randn(rows, cols, generator=g) * 3
    pos = torch.randint(0, cols, (rows,), generator=g)
    logits[torch.arange(rows), pos] = 30.0
    mask = torch.rand(rows, cols, generator=g) < 0.5
    mask[torch.arange(rows), (pos + 1) % cols] = False  # at least one allowed column per row
    for seed in range(4):
        out = sample_hard_negatives(logits, pos, exclude_mask=mask, seed=seed, backend=backend)
        assert out.dtype == torch.int64 and out.shape == (rows,)
        assert (out != pos).all()
        assert not mask[torch.arange(rows), out].any()


def test_single_allowed_candidate_and_extreme_logits():
    logits = torch.tensor([[0.0, -1e30, 5.0, float("-inf")],
                           [1e4, -1e4, float("-inf"), float("-inf")],
                           [-80.0, -200.0, 30.0, -1e30]])
    pos = torch.tensor([2, 0, 2])
    mask = torch.tensor([[False, True, False, False], [False] * 4, [False] * 4])
    for seed in range(20):
        out = sample_hard_negatives(logits, pos, exclude_mask=mask, seed=seed, backend="ext")
        # row 0: only column 0 is allowed and finite; row 1: only column 1 is finite;
        # row 2: column 0 has e^120 times the weight of column 1 and column 3 is ~0.
        assert out.tolist() == [0, 1, 0]


def test_determinism_seed_and_generator():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 500, generator=g)
    pos = torch.randint(0, 500, (300,), generator=g)
    a = sample_hard_negatives(logits, pos, seed=123)
    assert torch.equal(a, sample_hard_negatives(logits, pos, seed=123))
    assert not torch.equal(a, sample_hard_negatives(logits, pos, seed=124))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b1 = sample_hard_negatives(logits, pos, generator=g1)
    assert torch.equal(b1, sample_hard_negatives(logits, pos, generator=g2))
    # The generator advanced: the next draw differs.
    assert not torch.equal(sample_hard_negatives(logits, pos, generator=g1), b1)
    torch.manual_seed(42)
    c1 = sample_hard_negatives(logits, pos)
    torch.manual_seed(42)
    assert torch.equal(c1, sample_hard_negatives(logits, pos))
    # Seeds fold to 64 bits: a huge Python int works, and seed s and s + 2**64 agree.
    assert torch.equal(sample_hard_negatives(logits, pos, seed=2**64 + 5),
                       sample_hard_negatives(logits, pos, seed=5))


def test_independent_of_thread_count():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(257, 3000, generator=g)
    pos = torch.randint(0, 3000, (257,), generator=g)
    mask = torch.rand(257, 3000, generator=g) < 0.1
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_hard_negatives(logits, pos, exclude_mask=mask, seed=77, backend="ext")
        torch.set_num_threads(2)
        two = sample_hard_negatives(logits, pos, exclude_mask=mask, seed=77, backend="ext")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_row_offset_keys_rows_globally():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 200, generator=g)
    pos = torch.randint(0, 200, (64,), generator=g)
    full = sample_hard_negatives(logits, pos, seed=5, backend="ext")
    tail = sample_hard_negatives(logits[16:], pos[16:], seed=5, row_offset=16, backend="ext")
    assert torch.equal(full[16:], tail)
    other_stream = sample_hard_negatives(logits, pos, seed=5, stream=1, backend="ext")
    assert not torch.equal(full, other_stream)


def test_backend_is_recorded():
    logits = torch.randn(4, 8)
    pos = torch.arange(4)
    sample_hard_negatives(logits, pos, seed=0, backend="torch")
    assert backends.last_used()["hard_negatives@cpu"] == "torch"
    sample_hard_negatives(logits, pos, seed=0)
    assert backends.last_used()["hard_negatives@cpu"] == "ext"  # auto prefers the extension


# ------------------------------------------------------------------------------ global helper

def test_global_helper_offsets_positives_by_rank():
    g = torch.Generator().manual_seed(8)
    local, world, rank = 6, 3, 1
    sim_i2t = torch.randn(local, local * world, generator=g)
    sim_t2i = torch.randn(local, local * world, generator=g)
    # Make the positives by far the most likely columns: only the masking keeps them out.
    sim_i2t[torch.arange(local), rank * local + torch.arange(local)] = 40.0
    sim_t2i[torch.arange(local), rank * local + torch.arange(local)] = 40.0
    for seed in range(10):
        t_neg, i_neg = sample_global_hard_negatives(sim_i2t, sim_t2i, rank=rank, seed=seed)
        positives = rank * local + torch.arange(local)
        assert (t_neg != positives).all() and (i_neg != positives).all()
        assert ((t_neg >= 0) & (t_neg < local * world)).all()
    # Rows are keyed by their global index: rank 1's draw equals rows 6..11 of the same
    # problem seen as one process, whatever the other ranks hold.
    full = torch.randn(local * world, local * world, generator=g)
    full[rank * local:(rank + 1) * local] = sim_i2t
    whole = sample_hard_negatives(full, torch.arange(local * world), seed=1, backend="ext")
    mine, _ = sample_global_hard_negatives(sim_i2t, sim_t2i, rank=rank, seed=1, backend="ext")
    assert torch.equal(whole[rank * local:(rank + 1) * local], mine)


def test_global_helper_square_reads_columns_in_place():
    g = torch.Generator().manual_seed(9)
    sim = torch.randn(50, 50, generator=g)
    excl = torch.rand(50, 50, generator=g) < 0.2
    excl.fill_diagonal_(False)
    t_a, i_a = sample_global_hard_negatives(sim, exclude_i2t=excl, seed=4, backend="ext")
    t_b, i_b = sample_global_hard_negatives(sim, sim.t().contiguous(), exclude_i2t=excl,
                                            exclude_t2i=excl.t().contiguous(), seed=4,
                                            backend="ext")
    assert torch.equal(t_a, t_b) and torch.equal(i_a, i_b)
    assert not excl[torch.arange(50), t_a].any()
    assert not excl[i_a, torch.arange(50)].any()  # text j's negative image i: excl[i, j] False
    assert not torch.equal(t_a, i_a)  # the two directions use separate streams


def test_global_helper_argument_errors():
    sim = torch.randn(4, 12)
    with pytest.raises(ValueError, match="sim_t2i is required"):
        sample_global_hard_negatives(sim)
    with pytest.raises(ValueError, match="sim_t2i must have the shape"):
        sample_global_hard_negatives(sim, torch.randn(4, 8))
    with pytest.raises(ValueError, match="rank must satisfy"):
        sample_global_hard_negatives(sim, sim, rank=3)


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("backend", BACKENDS)
def test_row_errors(backend):
    logits = torch.randn(3, 5)
    pos = torch.tensor([0, 1, 2])
    cases = [
        (lambda l, p, m: p.__setitem__(1, 5), r"positive_index\[1\] = 5 is outside \[0, 5\)"),
        (lambda l, p, m: p.__setitem__(0, -1), r"positive_index\[0\] = -1 is outside"),
        (lambda l, p, m: l.__setitem__((2, 4), float("nan")), r"logits\[2\] contains NaN"),
        (lambda l, p, m: l.__setitem__((1, 0), float("inf")), r"logits\[1\] contains \+inf"),
        (lambda l, p, m: m.__setitem__(1, True), r"logits\[1\] has no allowed candidate"),
        (lambda l, p, m: l.__setitem__((0, slice(1, 5)), float("-inf")),
         r"logits\[0\] has no allowed candidate"),
    ]
    for corrupt, message in cases:
        l, p, m = logits.clone(), pos.clone(), torch.zeros(3, 5, dtype=torch.bool)
        corrupt(l, p, m)
        with pytest.raises(ValueError, match=message):
            sample_hard_negatives(l, p, exclude_mask=m, seed=0, backend=backend)
        codes = sample_hard_negatives(l, p, exclude_mask=m, seed=0, backend=backend, check=False)
        expected = hard_negative_row_codes(l, p, m)
        assert torch.equal(codes.clamp(max=0), expected), (message, codes, expected)
        assert set(expected.tolist()) - {0} <= set(HARD_NEGATIVE_CODES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_candidate_is_the_positive(backend):
    with pytest.raises(ValueError, match="no allowed candidate"):
        sample_hard_negatives(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), seed=0,
                              backend=backend)


def test_argument_errors():
    logits = torch.randn(3, 5)
    pos = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        sample_hard_negatives(torch.randn(3, 5, 2), pos)
    with pytest.raises(TypeError, match=r"logits must be a floating-point"):
        sample_hard_negatives(torch.ones(3, 5, dtype=torch.long), pos)
    with pytest.raises(ValueError, match=r"positive_index must have shape \(3,\)"):
        sample_hard_negatives(logits, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"positive_index must be an integer tensor"):
        sample_hard_negatives(logits, pos.float())
    with pytest.raises(ValueError, match=r"positive_index is on meta but logits is on cpu"):
        sample_hard_negatives(logits, pos.to("meta"))
    with pytest.raises(TypeError, match=r"exclude_mask must be a bool tensor"):
        sample_hard_negatives(logits, pos, exclude_mask=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"exclude_mask must have the shape of logits \(3, 5\)"):
        sample_hard_negatives(logits, pos, exclude_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"exclude_mask is on meta"):
        sample_hard_negatives(logits, pos, exclude_mask=torch.zeros(3, 5, dtype=torch.bool,
                                                                    device="meta"))
    with pytest.raises(ValueError, match="either generator or seed"):
        sample_hard_negatives(logits, pos, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="row_offset must be a non-negative int"):
        sample_hard_negatives(logits, pos, row_offset=-1)
    with pytest.raises(ValueError, match="check must be"):
        sample_hard_negatives(logits, pos, check="yes")
    with pytest.raises(ValueError, match="unknown"):
        sample_hard_negatives(logits, pos, backend="nope")


def test_op_checks_its_arguments_directly():
    # The compiled op validates on its own too (callers of torch.ops.vlmo_fast.hard_negatives).
    from vlmo_fast import _ext
    _ext.load()
    op = torch.ops.vlmo_fast.hard_negatives
    seed = torch.tensor([1])
    with pytest.raises(RuntimeError, match="positive must be int64"):
        op(torch.randn(2, 3), torch.tensor([0, 1], dtype=torch.int32), None, seed)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        op(torch.randn(2, 3), torch.tensor([0, 1]), None, torch.tensor([1, 2]))
    # Shapes pass through the Meta kernel (torch.compile / fake tensors).
    out = op(torch.empty(5, 7, device="meta"), torch.empty(5, dtype=torch.long, device="meta"),
             None, seed)
    assert out.shape == (5,) and out.dtype == torch.int64


def test_empty_batch():
    out = sample_hard_negatives(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), seed=0)
    assert out.shape == (0,) and out.dtype == torch.int64


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLMO_FAST_TEST_JIT") != "1",
                    reason="JIT build takes ~1 min; set VLMO_FAST_TEST_JIT=1 to run it")
def test_jit_build_fallback(tmp_path):
    # A fresh process (the installed vlmo_fast._C must not be loaded beside the JIT build: both
    # would register the same ops) builds csrc/ into a private cache and samples with it.
    code = (
        "import torch, vlmo_fast._ext as e\n"
        "m = e._jit_build()\n"
        "out = torch.ops.vlmo_fast.hard_negatives(torch.zeros(3, 4), torch.arange(3), None,\n"
        "                                         torch.tensor([1]))\n"
        "assert ((out >= 0) & (out < 4) & (out != torch.arange(3))).all(), out\n"
        "print('jit ok', m.__file__)\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "jit ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------ CUDA

@pytest.mark.gpu
def test_cuda_distribution_determinism_and_no_sync():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(40, generator=g)
    for row in (base / 0.3, base, base / 5.0, torch.zeros(40), _rows()["one-hot"]):
        draws = 100000
        logits = row.to(dev).unsqueeze(0).expand(draws, -1)
        pos = torch.full((draws,), 3, dtype=torch.int64, device=dev)
        out = sample_hard_negatives(logits, pos, seed=17, backend="ext")
        counts = np.bincount(out.cpu().numpy(), minlength=40)
        assert counts[3] == 0
        assert chi_square_p(counts, exact_probs(row, 3), draws) > P_MIN
    # A long row over several thousand columns, with exclusions, in bf16.
    row = torch.randn(5000, generator=g) * 2
    excluded = torch.arange(0, 5000, 3)
    draws = 20000
    mask = torch.zeros(5000, dtype=torch.bool)
    mask[excluded] = True
    out = sample_hard_negatives(row.to(dev, torch.bfloat16).unsqueeze(0).expand(draws, -1),
                                torch.full((draws,), 4000, device=dev),
                                exclude_mask=mask.to(dev).unsqueeze(0).expand(draws, -1),
                                seed=5, backend="ext")
    counts = np.bincount(out.cpu().numpy(), minlength=5000)
    probs = exact_probs(row.bfloat16().float(), 4000, excluded)
    assert chi_square_p(counts, probs, draws) > P_MIN
    # Reproducible from a seed, a CUDA generator, and keyed by global row.
    logits = torch.randn(300, 2000, device=dev)
    pos = torch.randint(0, 2000, (300,), device=dev)
    a = sample_hard_negatives(logits, pos, seed=3)
    assert torch.equal(a, sample_hard_negatives(logits, pos, seed=3))
    assert torch.equal(a[100:], sample_hard_negatives(logits[100:], pos[100:], seed=3,
                                                      row_offset=100))
    # The transposed-view kernel (stride0 == 1) computes the same keys as the row kernel.
    square = torch.randn(700, 700, device=dev)
    excl = torch.rand(700, 700, device=dev) < 0.3
    diag = torch.arange(700, device=dev)
    for view, mask_view in ((square.t(), excl.t()), (square.t().bfloat16(), None)):
        contiguous = view.contiguous()
        mask_c = None if mask_view is None else mask_view.contiguous()
        assert torch.equal(
            sample_hard_negatives(view, diag, exclude_mask=mask_view, seed=21, stream=1),
            sample_hard_negatives(contiguous, diag, exclude_mask=mask_c, seed=21, stream=1))
    g1 = torch.Generator(device=dev).manual_seed(8)
    g2 = torch.Generator(device=dev).manual_seed(8)
    assert torch.equal(sample_hard_negatives(logits, pos, generator=g1),
                       sample_hard_negatives(logits, pos, generator=g2))
    # No host sync on the hot path: seed from the CUDA default generator, async check.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_hard_negatives(logits, pos)
        sample_hard_negatives(logits, pos, generator=g1)
        sample_global_hard_negatives(logits[:, :300])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert backends.last_used()["hard_negatives@cuda"] == "ext"


@pytest.mark.gpu
def test_cuda_error_codes():
    dev = torch.device("cuda")
    logits = torch.randn(4, 5, device=dev)
    logits[1, 2] = float("nan")
    logits[2, :] = float("-inf")
    pos = torch.tensor([0, 1, 2, 7], device=dev)
    codes = sample_hard_negatives(logits, pos, seed=0, check=False, backend="ext")
    assert codes.tolist()[1:] == [-2, -1, -3] and 0 <= codes[0] < 5 and codes[0] != 0
    with pytest.raises(ValueError, match=r"logits\[1\] contains NaN"):
        sample_hard_negatives(logits, pos, seed=0, check="sync", backend="ext")


# ------------------------------------------------------------------------------ precision, rescaling

@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_large_common_offset_keeps_its_differences(backend):
    """1e10 + [0, 5, 0] with column 2 the positive: column 1 has probability e^5 / (1 + e^5)
    = 0.9933 (in fp32 the offset swallows the 5 and gives 0.5)."""
    row = torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64) + 1e10
    draws = 20000
    counts = draw_repeated(row, 2, draws, backend, seed=4, dtype=torch.float64)
    probs = exact_probs(row - 1e10, 2)
    assert probs[1] == pytest.approx(0.99331, abs=1e-5)
    assert chi_square_p(counts, probs, draws) > P_MIN


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_beyond_float_range_is_finite_on_both_backends(backend):
    """Finite fp64 values beyond fp32's range are ordinary logits on both backends (no error
    on one and a draw on the other); NaN is the same error on both."""
    logits = torch.tensor([[0.0, 1e39, 1e39, -1e300], [1e300, -1e300, 1e300, 0.0]],
                          dtype=torch.float64)
    pos = torch.tensor([0, 3])
    seen = set()
    for seed in range(40):
        out = sample_hard_negatives(logits, pos, seed=seed, backend=backend).tolist()
        assert out[0] in (1, 2) and out[1] in (0, 2)
        seen.add(tuple(out))
    assert len(seen) > 1  # ties split both ways
    logits[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1\] contains NaN"):
        sample_hard_negatives(logits, pos, seed=0, backend=backend)


def test_running_max_jumps_across_chunks():
    """The CPU kernel takes each chunk's exponentials against the running max and raises it
    (rescaling the total) only when a chunk's max exceeds it by more than 64: rows whose later
    chunks jump by 30 (no raise) and by 200 (raise; e^200 would overflow fp32) must still draw
    the exact softmax, in fp32 and in fp64."""
    g = torch.Generator().manual_seed(9)
    row = torch.randn(1800, generator=g)
    row[600:1200] += 30.0    # second and third 512-column chunks: +30
    row[1300:] += 200.0      # the last chunks: +200, several columns within a few units of the max
    row[1300:] = row[1300:] * 0.5 + 100.0
    draws = 30000
    probs = exact_probs(row, 1500)
    for dtype in (torch.float32, torch.float64):
        counts = draw_repeated(row, 1500, draws, "ext", seed=21, dtype=dtype)
        assert counts[:1300].sum() == 0  # e^-100 relative weight
        assert chi_square_p(counts, probs, draws) > P_MIN, dtype


def test_integer_arguments_are_integers():
    logits = torch.randn(4, 12)
    pos = torch.arange(4)
    a = sample_hard_negatives(logits, pos, seed=np.int64(3), row_offset=np.int32(2))
    assert torch.equal(a, sample_hard_negatives(logits, pos, seed=3, row_offset=2))
    with pytest.raises(TypeError, match=r"seed must be an integer.*1\.7"):
        sample_hard_negatives(logits, pos, seed=1.7)
    with pytest.raises(TypeError, match="seed must be an integer"):
        sample_hard_negatives(logits, pos, seed=True)
    with pytest.raises(TypeError, match="row_offset must be an integer"):
        sample_hard_negatives(logits, pos, row_offset=1.0)
    sim = torch.randn(4, 12)
    t2i = torch.randn(4, 12)
    got = sample_global_hard_negatives(sim, t2i, rank=np.int64(1), seed=5)
    want = sample_global_hard_negatives(sim, t2i, rank=1, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    with pytest.raises(TypeError, match="rank must be an integer"):
        sample_global_hard_negatives(sim, t2i, rank=1.0)
    with pytest.raises(TypeError, match="seed must be an integer"):
        sample_global_hard_negatives(sim, t2i, rank=1, seed=2.5)


def test_cpu_vector_path_is_reported():
    from vlmo_fast import _ext
    module = _ext.load()
    assert module.cpu_vector_path() in ("avx2", "portable")


def test_portable_vector_build_draws_the_same_law():
    """The baseline (non-AVX2) build of the chunk primitives, forced in a fresh process, draws
    from the same distribution (exp_u20 and the portable exp differ only in the last bits)."""
    code = (
        "import numpy as np, torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_hard_negatives import _rows, chi_square_p, draw_repeated, exact_probs, P_MIN\n"
        "from vlmo_fast import _ext\n"
        "assert _ext.load().cpu_vector_path() == 'portable'\n"
        "row = torch.cat([_rows()['t=1'] * 3 for _ in range(30)])\n"
        "counts = draw_repeated(row, 3, 20000, 'ext', seed=11)\n"
        "p = chi_square_p(counts, exact_probs(row, 3), 20000)\n"
        "assert p > P_MIN, p\n")
    env = dict(os.environ, VLMO_FAST_CPU_VECTOR="portable")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- CUDA scan logic
# torch.ops.vlmo_fast._gumbel_scan runs the CUDA kernel's per-element decisions
# (csrc/gumbel_scan.h: noise, skip of elements that cannot win, key order, merges over
# threads and column chunks) on the CPU, so they are checked here without a GPU.

def _gumbel_scan(logits, positive, mask=None, seed=0, chunks=1, threads=8, skip=True, row_offset=0):
    return torch.ops.vlmo_fast._gumbel_scan(logits, positive, mask, seed, row_offset, 0, chunks,
                                            threads, skip)


def _scan_inputs(rows=48, n=700, scale=60.0, seed=0, dtype=torch.float32):
    """ITC-like rows (scale x cosine): a wide logit range, so the skip fires often."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(rows + n, 16, generator=g), dim=-1)
    logits = (scale * feats[:rows] @ feats[rows:].T).to(dtype)
    positive = torch.randint(0, n, (rows,), generator=g)
    mask = torch.rand(rows, n, generator=g) < 0.1
    return logits, positive, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_scan_skip_and_column_chunks_do_not_change_draws(dtype):
    """Skipping elements whose logit + the noise bound cannot beat the best key, and splitting
    the columns in chunks merged in order, give the same draws as the plain Gumbel-max scan,
    row for row (including rows whose chunks hold only excluded / -inf columns)."""
    logits, positive, mask = _scan_inputs(dtype=dtype)
    logits[3, :400] = float("-inf")          # the first chunks of row 3 have no candidate
    mask[5, 350:] = True                     # the last chunks of row 5 are all excluded
    for seed in (0, 1, 2):
        plain = _gumbel_scan(logits, positive, mask, seed, chunks=1, threads=1, skip=False)
        assert (plain >= 0).all()
        for chunks, threads in ((1, 8), (2, 8), (3, 32), (7, 256), (700, 1)):
            got = _gumbel_scan(logits, positive, mask, seed, chunks=chunks, threads=threads, skip=True)
            assert torch.equal(got, plain), (dtype, seed, chunks, threads)


def test_cuda_scan_follows_the_softmax():
    """The scan's draws follow softmax(logits) over the allowed columns (chi-square), with the
    skip on, for a peaked ITC-like row (where most elements are skipped) and a flat one."""
    g = torch.Generator().manual_seed(5)
    for row in (40.0 * torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=-1)[:, 0],
                torch.randn(60, generator=g)):
        draws = 20000
        logits = row.unsqueeze(0).expand(draws, -1)
        pos = torch.full((draws,), 7, dtype=torch.int64)
        out = _gumbel_scan(logits, pos, None, seed=11, chunks=2, threads=4)
        counts = np.bincount(out.numpy(), minlength=60)
        assert chi_square_p(counts, exact_probs(row, 7), draws) > P_MIN


def test_cuda_scan_keeps_fp64_differences():
    """fp64 keys: 1e10 + [0, 5, 0] (positive 2) draws column 1 with probability 0.9933; fp32
    keys would see a tie."""
    row = torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64) + 1e10
    draws = 20000
    out = _gumbel_scan(row.unsqueeze(0).expand(draws, -1), torch.full((draws,), 2), None, seed=3)
    counts = np.bincount(out.numpy(), minlength=3)
    assert chi_square_p(counts, exact_probs(row - 1e10, 2), draws) > P_MIN


def test_cuda_scan_error_codes_survive_the_merge():
    """NaN/+inf anywhere (in any chunk), no candidate, and a positive out of range give the
    op's codes after the chunk merge, as the CUDA kernel reports them."""
    logits, positive, _ = _scan_inputs(rows=4, n=64)
    logits[0, 50] = float("nan")
    logits[1, :] = float("-inf")
    positive[2] = 64
    logits[3, 1] = float("inf")
    for chunks in (1, 4):
        out = _gumbel_scan(logits, positive, None, chunks=chunks).tolist()
        assert out == [-2, -1, -3, -2]
        assert all(code in HARD_NEGATIVE_CODES for code in out)
