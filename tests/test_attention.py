"""Attention cores (reference, sdpa, flex, flash) against the materialised fp32 reference:
forward and backward (q, k, v and the shared bias table), with padding, packing, lazy and
dense biases, fp32 and bf16; the automatic choice; input errors. GPU-marked tests run the
compiled FlexAttention and flash-attn paths at VLMo-Base sizes."""
import importlib.util

import pytest
import torch

from vlmo_fast import backends
from vlmo_fast.attention import (MultiHeadSelfAttention, attention_core, attention_facts,
                                 attention_reference, choose_attention_backend,
                                 register_attention_impl)
from vlmo_fast.attention.flex import flex_block_mask, flex_compiled_call, flex_score_mod
from vlmo_fast.embeddings import RelativeBias, RelativePositionBias, token_layout
from vlmo_fast.packing import PackedSequences

CPU_BACKENDS = ["reference", "sdpa", "flex"]
HEADS, DH = 4, 16


pair_layout = token_layout   # (is_text, positions) of [text ; image]


def make_case(kind, dtype, device="cpu", grid=2, text_len=6, batch=2, seed=0):
    """q, k, v [B, H, L, Dh] (q scaled), bias, key padding mask, packing, the table."""
    g = torch.Generator().manual_seed(seed)
    rel = RelativePositionBias(grid, 8, HEADS, depth=3).to(device)
    with torch.no_grad():
        rel.relative_position_bias_table.copy_(torch.randn(rel.relative_position_bias_table.shape, generator=g))
    n_img = grid * grid + 1
    pad, packing = None, None
    if kind == "packed":
        # image-only, text-only (two lengths) and a pair, back to back in one row
        layouts = [pair_layout(0, n_img), pair_layout(3, 0), pair_layout(text_len, 0),
                   pair_layout(4, n_img)]
        is_text = torch.cat([t for t, _ in layouts])
        positions = torch.cat([p for _, p in layouts])
        packing = PackedSequences.from_lengths([t.numel() for t, _ in layouts], device,
                                               is_text.to(device), positions.to(device))
        batch = 1
    else:
        is_text, positions = pair_layout(text_len, n_img)
        pad = torch.zeros(batch, is_text.numel(), dtype=torch.bool)
        pad[1, 4:text_len] = True             # padded text tokens inside the row
        pad = pad.to(device)
    length = is_text.numel()
    bias = rel.layer_biases(is_text.to(device), positions.to(device))[1]
    if kind == "dense_bias":
        bias = torch.randn(batch, HEADS, length, length, generator=g).to(device)
    if kind == "no_bias":
        bias = None
    q, k, v = (torch.randn(batch, HEADS, length, DH, generator=g).to(device, dtype) for _ in range(3))
    q = q * DH ** -0.5
    return q, k, v, bias, pad, packing, rel


def run(name, q, k, v, bias, pad, packing, rel, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().clone().requires_grad_(True)
    rel.relative_position_bias_table.grad = None
    out = attention_core(name).fn(q, k, v, bias, pad, packing)
    out.backward(grad_out.to(out.dtype))
    table_grad = rel.relative_position_bias_table.grad
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    if isinstance(bias, RelativeBias):
        grads["table"] = table_grad
    elif bias is not None:
        grads["bias"] = bias.grad
    return out.detach(), grads


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["relative_padded", "packed", "dense_bias", "no_bias"])
@pytest.mark.parametrize("name", ["sdpa", "flex", "flex:shared_bias_grad"])
def test_backend_matches_reference_forward_and_backward(name, kind, dtype, monkeypatch):
    if name == "flex:shared_bias_grad":   # one [H, N] gradient buffer instead of per-sequence copies
        if kind not in ("relative_padded", "packed"):
            pytest.skip("only the relative bias has gradient copies")
        monkeypatch.setenv("VLMO_FAST_FLEX_BIAS_GRAD", "shared")
        name = "flex"
    case = make_case(kind, dtype)
    grad_out = torch.randn(case[0].shape)
    want_out, want = run("reference", *case, grad_out)
    got_out, got = run(name, *case, grad_out)
    tol = TOL[dtype]
    torch.testing.assert_close(got_out.float(), want_out.float(), **tol)
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key].float(), want[key].float()
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **tol, msg=f"grad of {key}")
        else:   # bf16 gradients: compare relative to the gradient's scale
            rel_err = (a - b).norm() / b.norm().clamp_min(1e-6)
            assert rel_err < 4e-2, f"grad of {key}: relative error {rel_err:.3g}"


def test_relative_bias_gradient_is_the_sum_over_pairs():
    """The table gradient of the lazy bias equals that of the materialised bias (fp64)."""
    q, k, v, bias, pad, packing, rel = make_case("relative_padded", torch.float64)
    rel.double()
    bias = rel.layer_biases(bias.is_text, bias.positions)[2]
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    _, lazy = run("reference", q, k, v, bias, pad, None, rel, grad_out)
    table = rel.relative_position_bias_table
    dense = rel(rel.index(bias.is_text, bias.positions))[2]
    dense.retain_grad()
    table.grad = None
    attention_reference(q, k, v, dense, pad).backward(grad_out)
    torch.testing.assert_close(lazy["table"], table.grad)
    cols = table.grad.view(table.shape[0], 3, HEADS)
    assert cols[:, 2].abs().sum() > 0 and cols[:, [0, 1]].abs().sum() == 0  # only layer 2's columns


def test_packed_attention_equals_separate_sequences():
    q, k, v, bias, _, packing, rel = make_case("packed", torch.float32)
    out = attention_reference(q, k, v, bias, None, packing)
    for i, (s, e) in enumerate(zip(packing.cu_seqlens[:-1].tolist(), packing.cu_seqlens[1:].tolist())):
        sub = RelativeBias(rel, bias.layer, bias.is_text[s:e], bias.positions[s:e])
        alone = attention_reference(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], sub)
        torch.testing.assert_close(out[:, :, s:e], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_module_runs_each_backend_and_reports_it(name):
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, backend=name)
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    ref = MultiHeadSelfAttention(32, 4, backend="reference")
    ref.load_state_dict(attn.state_dict())
    got = attn(x, key_padding_mask=pad)
    assert backends.last_used()["attention@cpu"] == name
    torch.testing.assert_close(got, ref(x, key_padding_mask=pad), rtol=1e-4, atol=1e-5)
    assert attn.last_backend == name and f"last ran: {name}" in repr(attn)


def test_auto_choice_on_cpu_is_reference():
    q = torch.randn(1, 2, 4, 16)
    assert choose_attention_backend(None, q, None, None) == "reference"
    assert backends.resolve("attention", None, "cpu") == "reference"


def _unsupported(name, q, bias, packing):
    return backends.rejection_reason("attention", name, **attention_facts(q, bias, packing))


def test_input_support_reasons():
    q32 = torch.randn(1, 2, 4, 16)
    bias = torch.zeros(2, 4, 4)
    assert "bias" in _unsupported("flash", q32.bfloat16(), bias, None)
    assert "fp16/bf16" in _unsupported("flash", q32, None, None)
    assert _unsupported("flash", q32.bfloat16(), None, None) is None
    assert _unsupported("sdpa", q32, bias, None) is None
    assert "CUDA only" in backends.rejection_reason("attention", "flash", "cpu")


def test_explicit_backend_that_cannot_run_raises():
    attn = MultiHeadSelfAttention(32, 4, backend="flash")
    with pytest.raises(RuntimeError, match="flash.*cannot run on cpu"):
        attn(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="unknown"):
        MultiHeadSelfAttention(32, 4, backend="nope")(torch.randn(1, 3, 32))
    backends.set_backend("attention", "sdpa")
    try:
        attn = MultiHeadSelfAttention(32, 4)
        attn(torch.randn(1, 3, 32))
        assert attn.last_backend == "sdpa"
    finally:
        backends.set_backend("attention", None)


def test_automatic_order_depends_on_the_input():
    order = lambda **facts: backends.preference_order("attention", "cuda", **facts)   # noqa: E731
    assert order(bias="relative", packed=False) == ["flex", "sdpa", "reference"]
    assert order(bias="none", packed=False) == ["flash", "sdpa", "reference"]
    assert order(bias="none", packed=True) == ["flash", "flex", "sdpa", "reference"]
    assert backends.preference_order("attention", "cpu", bias="none") == ["reference"]
    report = backends.backend_report("cpu")["attention"]
    assert report["auto"] == "reference" and report["sdpa"] == "ok"


def test_registered_core_is_dispatched_and_its_limits_are_honoured(monkeypatch):
    calls = []

    def mine(q, k, v, attn_bias, key_padding_mask):
        calls.append(attn_bias is None or attn_bias.dim())
        return attention_reference(q, k, v, attn_bias, key_padding_mask)

    def fp32_only(facts):
        return None if facts.get("dtype") == torch.float32 else "fp32 only"
    register_attention_impl("mine", mine, accepts=fp32_only,
                            preference={"cpu": ["mine", "reference"]})
    try:
        attn = MultiHeadSelfAttention(32, 4)
        x = torch.randn(2, 5, 32)
        ref = MultiHeadSelfAttention(32, 4, backend="reference")
        ref.load_state_dict(attn.state_dict())
        rel = RelativePositionBias(2, 8, 4, depth=1)
        bias = rel.layer_biases(*token_layout(0, 5))[0]
        torch.testing.assert_close(attn(x, attn_bias=bias), ref(x, attn_bias=bias))
        assert attn.last_backend == "mine" and calls == [3]    # got the bias dense, [H, L, L]
        attn.double()(x.double())                               # not accepted: the next one runs
        assert attn.last_backend == "reference"
        packing = PackedSequences.from_lengths([2, 3])
        attn.float()(x[:1], packing=packing)                    # packed: not for a 5-arg core
        assert attn.last_backend == "reference"
        with pytest.raises(ValueError, match="does not support packed sequences"):
            MultiHeadSelfAttention(32, 4, backend="mine")(x[:1], packing=packing)
        monkeypatch.setenv("VLMO_FAST_ATTENTION_BACKEND", "sdpa")   # read per call
        attn(x)
        assert attn.last_backend == "sdpa" and backends.last_used()["attention@cpu"] == "sdpa"
        monkeypatch.delenv("VLMO_FAST_ATTENTION_BACKEND")
    finally:
        backends.unregister("attention", "mine")
        backends.register("attention", "reference", preference={"cpu": ["reference"]})
    assert backends.resolve("attention", None, "cpu") == "reference"


def test_flex_block_mask_is_built_once_per_packing():
    q, k, v, bias, _, packing, _ = make_case("packed", torch.float32)
    with torch.no_grad():
        attention_core("flex").fn(q, k, v, bias, None, packing)
        first = packing.cache[("flex_block_mask", "cpu")]
        attention_core("flex").fn(q, k, v, bias, None, packing)
    assert packing.cache[("flex_block_mask", "cpu")] is first


def test_flex_with_no_tokens_raises_clearly():
    q = torch.randn(1, HEADS, 0, DH)
    with pytest.raises(ValueError, match="at least one token"):
        attention_core("flex").fn(q, q, q, None, None, None)
    assert attention_core("reference").fn(q, q, q).shape == q.shape   # the others return empty


@pytest.mark.slow
def test_compiled_flex_path_runs_the_same_score_mod():
    """The compiled public flex_attention (the CUDA path) with our score_mod closure and block
    masks, compiled for CPU inference (torch has no compiled CPU backward): ~30 s of C++
    compilation, worth it to catch tracing problems without a GPU. Each case is compiled
    static (dynamo reset): torch 2.14's C++ flex template fails to build a dynamic-shape
    kernel on CPU, a CPU-only inductor issue (CUDA uses the Triton template)."""
    import torch._dynamo
    for kind in ("relative_padded", "packed"):
        torch._dynamo.reset()
        q, k, v, bias, pad, packing, _ = make_case(kind, torch.float32)
        with torch.no_grad():
            want = attention_reference(q, k, v, bias, pad, packing)
            mask = flex_block_mask(q.shape[0], q.shape[2], pad, packing, q.device)
            score_mod, buffers = flex_score_mod(bias, q.shape[0], packing)
            got = flex_compiled_call(q, k, v, score_mod, buffers, mask)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, exc, match", [
    ("mask_shape", ValueError, "key_padding_mask must have shape"),
    ("mask_dtype", TypeError, "bool"),
    ("table_size", ValueError, "relative_position_bias_table must have shape"),
    ("bias_heads", ValueError, "heads per layer"),
    ("bias_layout", ValueError, "relative bias layout"),
    ("bias_type", TypeError, "Tensor or a RelativeBias"),
    ("packed_sum", ValueError, "sum to"),
    ("packed_batch", ValueError, "batch size 1"),
    ("packed_and_padded", ValueError, "no padding"),
])
def test_bad_inputs_raise_clear_errors(case, exc, match):
    attn = MultiHeadSelfAttention(16, 4)
    x = torch.randn(1, 5, 16)
    kwargs = {}
    rel = RelativePositionBias(2, 4, 4, depth=2)
    is_text, positions = pair_layout(0, 5)
    if case == "mask_shape":
        kwargs["key_padding_mask"] = torch.zeros(1, 4, dtype=torch.bool)
    elif case == "mask_dtype":
        kwargs["key_padding_mask"] = torch.zeros(1, 5)
    elif case == "table_size":
        rel.relative_position_bias_table = torch.nn.Parameter(torch.zeros(rel.num_distances, 3))
        kwargs["attn_bias"] = lambda: RelativeBias(rel, 0, is_text, positions)
    elif case == "bias_heads":
        kwargs["attn_bias"] = RelativePositionBias(2, 4, 2, depth=2).layer_biases(is_text, positions)[0]
    elif case == "bias_layout":
        kwargs["attn_bias"] = rel.layer_biases(*pair_layout(0, 4))[0]
    elif case == "bias_type":
        kwargs["attn_bias"] = [[0.0]]
    elif case == "packed_sum":
        kwargs["packing"] = PackedSequences.from_lengths([2, 2])
    elif case == "packed_batch":
        x = torch.randn(2, 5, 16)
        kwargs["packing"] = PackedSequences.from_lengths([2, 3])
    elif case == "packed_and_padded":
        kwargs["packing"] = PackedSequences.from_lengths([2, 3])
        kwargs["key_padding_mask"] = torch.zeros(1, 5, dtype=torch.bool)
    with pytest.raises(exc, match=match):
        if callable(kwargs.get("attn_bias")):
            kwargs["attn_bias"] = kwargs["attn_bias"]()
        attn(x, **kwargs)


# -- GPU: compiled FlexAttention and flash-attn at real sizes -----------------------------------
def _base_pairs(device, batch=8, text_len=40):
    """VLMo-Base shapes: 12 heads x 64, [text (padded to 40) ; image 197], bf16."""
    torch.manual_seed(0)
    rel = RelativePositionBias(14, 196, 12, depth=12).to(device)
    is_text, positions = pair_layout(text_len, 197)
    bias = rel.layer_biases(is_text.to(device), positions.to(device))[5]
    length = is_text.numel()
    q, k, v = (torch.randn(batch, 12, length, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    pad = torch.zeros(batch, length, dtype=torch.bool, device=device)
    pad[:, 10:text_len] = torch.rand(batch, text_len - 10, device=device) < 0.5
    return q * 0.125, k, v, bias, pad, rel


@pytest.mark.gpu
def test_gpu_compiled_flex_matches_reference_at_base_size():
    q, k, v, bias, pad, rel = _base_pairs("cuda")
    grad_out = torch.randn(q.shape, device="cuda")
    want_out, want = run("reference", q, k, v, bias, pad, None, rel, grad_out)
    got_out, got = run("flex", q, k, v, bias, pad, None, rel, grad_out)
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=3e-2, atol=3e-2)
    for key in want:
        rel_err = (got[key].float() - want[key].float()).norm() / want[key].float().norm()
        assert rel_err < 4e-2, f"grad of {key}: relative error {rel_err:.3g}"


@pytest.mark.gpu
def test_gpu_compiled_flex_packed_equals_reference():
    torch.manual_seed(0)
    rel = RelativePositionBias(14, 196, 12, depth=12).cuda()
    layouts = [pair_layout(0, 197), pair_layout(23, 0), pair_layout(31, 197), pair_layout(40, 0), pair_layout(0, 197)]
    is_text = torch.cat([t for t, _ in layouts]).cuda()
    positions = torch.cat([p for _, p in layouts]).cuda()
    packing = PackedSequences.from_lengths([t.numel() for t, _ in layouts], "cuda", is_text, positions)
    bias = rel.layer_biases(is_text, positions)[3]
    q, k, v = (torch.randn(1, 12, packing.total, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(q.shape, device="cuda")
    want_out, want = run("reference", q * 0.125, k, v, bias, None, packing, rel, grad_out)
    got_out, got = run("flex", q * 0.125, k, v, bias, None, packing, rel, grad_out)
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=3e-2, atol=3e-2)
    for key in want:
        rel_err = (got[key].float() - want[key].float()).norm() / want[key].float().norm()
        assert rel_err < 4e-2, f"grad of {key}: relative error {rel_err:.3g}"


@pytest.mark.gpu
def test_gpu_auto_choice():
    q = torch.randn(2, 12, 50, 64, device="cuda", dtype=torch.bfloat16)
    rel = RelativePositionBias(14, 196, 12, depth=2).cuda()
    bias = rel.layer_biases(*(t.cuda() for t in pair_layout(0, 50)))[0]
    assert choose_attention_backend(None, q, bias, None) == "flex"
    expect = "flash" if importlib.util.find_spec("flash_attn") else "sdpa"
    backends.reset_warnings()      # the fallback warning is once per process
    with pytest.warns(RuntimeWarning) if expect == "sdpa" else _nullcontext():
        assert choose_attention_backend(None, q, None, None) == expect


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_gpu_flash_matches_reference_padded_and_packed():
    torch.manual_seed(0)
    q, k, v, _, pad, rel = _base_pairs("cuda")
    grad_out = torch.randn(q.shape, device="cuda")
    want_out, want = run("reference", q, k, v, None, pad, None, rel, grad_out)
    got_out, got = run("flash", q, k, v, None, pad, None, rel, grad_out)
    real = ~pad   # flash leaves padded query rows at zero
    torch.testing.assert_close(got_out.transpose(1, 2)[real].float(), want_out.transpose(1, 2)[real].float(),
                               rtol=3e-2, atol=3e-2)
    packing = PackedSequences.from_lengths([197, 23, 237, 40], "cuda")
    q, k, v = (torch.randn(1, 12, packing.total, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(q.shape, device="cuda")
    want_out, want = run("reference", q, k, v, None, None, packing, rel, grad_out)
    got_out, got = run("flash", q, k, v, None, None, packing, rel, grad_out)
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=3e-2, atol=3e-2)
    for key in want:
        rel_err = (got[key].float() - want[key].float()).norm() / want[key].float().norm()
        assert rel_err < 4e-2, f"grad of {key}: relative error {rel_err:.3g}"
