"""MoMEBlock and VLMo used the way other codebases use timm/HF modules (issue 10):
torch.compile(fullgraph=True), autocast, meta-device init, DDP (gloo, 2 processes), fp64,
fully padded rows, weight-decay param groups, bool / 2-D attention masks."""
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmo_fast
from vlmo_fast import (MoMEBlock, StepModule, VLMo, backends, param_groups_weight_decay,
                       register_ffn_impl)
from vlmo_fast.embeddings import RelativePositionBias
from vlmo_fast.mome import mome_ffn_reference

DIM, HEADS = 32, 4


def make_block(seed=0, **kw):
    torch.manual_seed(seed)
    blk = MoMEBlock(DIM, HEADS, num_experts=3, **kw).eval()
    with torch.no_grad():   # non-trivial norms, biases and scales: every parameter matters
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return blk


def block_inputs(batch=2, length=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, DIM, generator=g).to(dtype)
    ids = torch.randint(0, 3, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, length - 2:] = True
    return x, ids, pad


def tiny_model(**overrides):
    torch.manual_seed(0)
    return VLMo.from_preset("tiny", drop_path_rate=0.0, **overrides).eval()


def tiny_batch(model, b=2, lt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    images = torch.randn(b, 3, c.img_size, c.img_size, generator=g)
    text_ids = torch.randint(0, c.vocab_size, (b, lt), generator=g)
    text_mask = torch.ones(b, lt, dtype=torch.long)
    text_mask[-1, lt - 2:] = 0
    return images, text_ids, text_mask


# -- torch.compile ------------------------------------------------------------------------------
# aot_eager traces exactly what inductor would get (dynamo + AOT autograd, fullgraph) without
# the C++ compile time; a graph break or an untraceable op fails here the same way.
@pytest.mark.parametrize("ffn, attn, dtype, grad", [
    ("reference", "reference", torch.float32, True),
    (None, "sdpa", torch.float32, True),              # auto FFN: grouped_mm refuses fp32 under compile
    ("grouped_mm", "sdpa", torch.bfloat16, True),
    ("reference", "flex", torch.float32, False),      # FlexAttention compiles on CPU for inference
])
def test_block_compiles_fullgraph_and_matches_eager(ffn, attn, dtype, grad):
    torch._dynamo.reset()
    blk = make_block(ffn_backend=ffn, attn_backend=attn).to(dtype)
    x, ids, pad = block_inputs(dtype=dtype)
    rel = RelativePositionBias(2, 8, HEADS, depth=1)
    is_text = torch.tensor([True] * 3 + [False] * 4)
    bias = rel.layer_biases(is_text, torch.tensor([0, 1, 2, 0, 1, 2, 3]))[0]
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.set_grad_enabled(grad):
        xs = [x.clone().requires_grad_(grad) for _ in range(2)]
        got = compiled(xs[0], ids, key_padding_mask=pad, attn_bias=bias)
        want = blk(xs[1], ids, key_padding_mask=pad, attn_bias=bias)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if grad:
        g = torch.randn(got.shape).to(dtype)
        (dx_got,) = torch.autograd.grad(got, xs[0], g)
        (dx_want,) = torch.autograd.grad(want, xs[1], g)
        torch.testing.assert_close(dx_got.float(), dx_want.float(), **tol)


def test_vlmo_encoders_compile_fullgraph():
    torch._dynamo.reset()
    model = tiny_model(depth=1, vl_layers=1)      # one layer to trace (with the VL expert)
    images, text_ids, text_mask = tiny_batch(model)
    with torch.no_grad():
        for name, args in (("encode_image", (images,)), ("encode_text", (text_ids, text_mask)),
                           ("encode_pair", (text_ids, images, text_mask))):
            fn = torch.compile(getattr(model, name), fullgraph=True, backend="aot_eager")
            got, want = fn(*args), getattr(model, name)(*args)
            torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-5, msg=name)


# -- autocast -----------------------------------------------------------------------------------
def test_autocast_runs_expert_gemms_in_bf16_like_linear():
    seen = []

    def spy(x, *args):
        seen.append((x.dtype, args[3].dtype))     # token and fc1_weight dtypes the backend got
        return mome_ffn_reference(x, *args)
    register_ffn_impl("spy_autocast", spy)
    try:
        blk = make_block(ffn_backend="spy_autocast")
        x, ids, pad = block_inputs()
        want = blk(x, ids, key_padding_mask=pad)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = blk(x, ids, key_padding_mask=pad)
    finally:
        backends.unregister("ffn", "spy_autocast")
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert got.dtype == torch.float32                # the residual stream keeps x's dtype
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    assert not torch.equal(got, want)                # it really ran in bf16


@pytest.mark.parametrize("ffn", ["grouped_mm", "reference"])
def test_autocast_bf16_input_fp32_weights_fwd_bwd(ffn):
    blk = make_block(ffn_backend=ffn).train()
    x, ids, pad = block_inputs()
    want = blk(x, ids, key_padding_mask=pad)
    xb = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = blk(xb, ids, key_padding_mask=pad)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    got.float().square().sum().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in blk.parameters() if p.grad is not None)
    assert blk.mlp.fc1_weight.grad.dtype == torch.float32


def test_vlmo_under_autocast_matches_fp32():
    model = tiny_model()
    images, text_ids, text_mask = tiny_batch(model)
    want = model.encode_pair(text_ids, images, text_mask).hidden
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for imgs in (images, images.bfloat16()):     # fp32 or bf16 pixels, fp32 weights
            got = model.encode_pair(text_ids, imgs, text_mask).hidden
            torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1)


# -- meta-device init ---------------------------------------------------------------------------
def test_meta_init_then_to_empty_and_reset_equals_fresh_init():
    with torch.device("meta"):
        meta = VLMo.from_preset("tiny")
    meta.to_empty(device="cpu")
    with torch.no_grad():                       # whatever to_empty left must all be overwritten
        for t in list(meta.parameters()) + list(meta.buffers()):
            t.fill_(float("nan"))
    fresh = VLMo.from_preset("tiny")
    torch.manual_seed(5)
    meta.reset_parameters()
    torch.manual_seed(5)
    fresh.reset_parameters()
    a, b = meta.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    images, text_ids, text_mask = tiny_batch(fresh)
    torch.testing.assert_close(meta.eval().encode_pair(text_ids, images, text_mask).hidden,
                               fresh.eval().encode_pair(text_ids, images, text_mask).hidden)


def test_meta_init_then_load_state_dict_assign():
    src = tiny_model()
    with torch.device("meta"):
        model = VLMo.from_preset("tiny", drop_path_rate=0.0)
    model.load_state_dict(src.state_dict(), assign=True)
    model.eval()
    images, text_ids, text_mask = tiny_batch(src)
    torch.testing.assert_close(model.encode_pair(text_ids, images, text_mask).hidden,
                               src.encode_pair(text_ids, images, text_mask).hidden, rtol=0, atol=0)


def test_block_factory_kwargs_and_reset():
    blk = MoMEBlock(DIM, HEADS, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in blk.parameters())
    blk.to_empty(device="cpu")
    with torch.no_grad():
        for p in blk.parameters():
            p.fill_(float("nan"))
    blk.reset_parameters()
    assert all(torch.isfinite(p).all() for p in blk.parameters())
    assert torch.equal(blk.gamma_1, torch.full((DIM,), 0.1, dtype=torch.float64))
    x, ids, _ = block_inputs(dtype=torch.float64)
    assert torch.isfinite(blk(x, ids)).all()


# -- DDP (gloo, 2 processes) ---------------------------------------------------------------------
def _pretrain_step(model, images, text_ids, text_mask):
    """All passes and heads of a pretraining step (ITC both branches, ITM, MLM)."""
    img = model.encode_image(images, return_vl=True)
    txt = model.encode_text(text_ids, text_mask, return_vl=True)
    pair = model.encode_pair(text_ids, images, text_mask)
    targets = torch.arange(images.shape[0])
    itc = F.cross_entropy(model.itc.logit_scale.exp() * img.features @ txt.features.T, targets)
    itc_vl = F.cross_entropy(model.itc_vl.logit_scale.exp() * img.vl_features @ txt.vl_features.T, targets)
    itm = F.cross_entropy(model.itm_logits(pair), torch.ones_like(targets))
    mlm = F.cross_entropy(model.mlm_logits(pair).flatten(0, 1), text_ids.flatten())
    return itc + itc_vl + itm + mlm


def _ddp_worker(rank, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_model().train()
        step = DDP(StepModule(model, _pretrain_step))       # find_unused_parameters=False
        for it in range(2):   # an unused parameter fails at the second step's forward
            model.zero_grad()
            step(*tiny_batch(model, seed=10 * it + rank)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_trains_every_parameter_and_averages_gradients(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"grads{r}.pt") for r in range(2))
    model = tiny_model().train()
    assert set(g0) == {n for n, _ in model.named_parameters()}
    # the second step's gradient, averaged over both ranks, computed in one process
    model.zero_grad()
    loss = sum(_pretrain_step(model, *tiny_batch(model, seed=10 + r)) for r in range(2)) / 2
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(g0[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# -- fp64 ---------------------------------------------------------------------------------------
def test_double_runs_on_the_cpu_auto_backends_and_matches_fp32():
    blk = make_block()
    x, ids, pad = block_inputs()
    want = blk(x, ids, key_padding_mask=pad)
    blk64 = blk.double()
    x64 = x.double().requires_grad_(True)
    got = blk64(x64, ids, key_padding_mask=pad)
    assert got.dtype == torch.float64
    assert backends.last_used()["ffn@cpu"] == "reference"       # grouped_mm has no fp64
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert torch.isfinite(x64.grad).all()
    with pytest.raises(ValueError, match="grouped_mm.*cannot run this input.*float64"):
        MoMEBlock(DIM, HEADS, ffn_backend="grouped_mm").double()(x64, ids)
    model = tiny_model().double()
    images, text_ids, text_mask = tiny_batch(model)
    assert torch.isfinite(model.encode_pair(text_ids, images.double(), text_mask).pooled).all()


# -- fully padded rows --------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["reference", "sdpa", "flex"])
def test_fully_padded_row_is_finite_and_leaves_other_rows_gradients_unchanged(attn):
    blk = make_block(attn_backend=attn)
    x, ids, pad = block_inputs(batch=3)
    pad[1] = True                                  # row 1: every key padded
    params = [p for p in blk.parameters()]

    def grads(xb, idb, padb, keep_rows):
        blk.zero_grad()
        out = blk(xb, idb, key_padding_mask=padb)
        assert torch.isfinite(out).all()
        (out[keep_rows] * torch.linspace(-1, 1, DIM)).sum().backward()
        return [p.grad.clone() for p in params]

    with_row = grads(x, ids, pad, [0, 2])
    without_row = grads(x[[0, 2]], ids[[0, 2]], pad[[0, 2]], [0, 1])
    for a, b in zip(with_row, without_row):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # documented output of such a row: its attention output is zero (proj bias only)
    attn_out = blk.attn(blk.norm1(x), key_padding_mask=pad)
    torch.testing.assert_close(attn_out[1], blk.attn.proj.bias.expand(7, DIM))


def test_all_padding_text_row_gives_finite_features():
    model = tiny_model().train()
    _, text_ids, text_mask = tiny_batch(model)
    text_mask[0] = 0
    out = model.encode_text(text_ids, text_mask)
    assert torch.isfinite(out.features).all()
    out.features[1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- weight decay -------------------------------------------------------------------------------
def test_param_groups_skip_expert_norms_and_biases_inside_any_model():
    class UserModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(8, DIM)
            self.block = MoMEBlock(DIM, HEADS)
    model = UserModel()
    no_decay, decay = param_groups_weight_decay(model, weight_decay=0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    ids = lambda ps: {id(p) for p in ps}       # noqa: E731
    mlp = model.block.mlp
    assert ids([mlp.norm_weight, mlp.norm_bias, mlp.fc1_bias, mlp.fc2_bias, model.block.gamma_1,
                model.block.attn.q_bias, model.stem.bias]) <= ids(no_decay["params"])
    assert ids(decay["params"]) == ids([model.stem.weight, model.block.attn.qkv.weight,
                                        model.block.attn.proj.weight, mlp.fc1_weight, mlp.fc2_weight])
    vlmo = tiny_model()
    names = vlmo.no_weight_decay()
    assert {"blocks.0.mlp.norm_weight", "blocks.3.mlp.fc2_bias", "cls_token",
            "rel_pos_bias.relative_position_bias_table", "itc.logit_scale"} <= names
    assert "blocks.0.mlp.fc1_weight" not in names
    groups = param_groups_weight_decay(vlmo)
    assert sum(len(g["params"]) for g in groups) == len(list(vlmo.parameters()))


# -- masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["reference", "sdpa", "flex"])
def test_bool_and_2d_masks(attn):
    blk = make_block(attn_backend=attn)
    x, ids, pad = block_inputs()
    # a bool mask is SDPA's convention (True = attend): as a [B, 1, L, L] mask it equals the padding
    as_bool = (~pad)[:, None, None, :].expand(2, 1, 7, 7)
    torch.testing.assert_close(blk(x, ids, attn_bias=as_bool), blk(x, ids, key_padding_mask=pad))
    float_mask = torch.zeros(7, 7).masked_fill(torch.eye(7, dtype=torch.bool), -math.inf)
    torch.testing.assert_close(blk(x, ids, attn_bias=~torch.eye(7, dtype=torch.bool)),
                               blk(x, ids, attn_bias=float_mask))
    bias2d = torch.randn(7, 7)
    torch.testing.assert_close(blk(x, ids, attn_bias=bias2d),
                               blk(x, ids, attn_bias=bias2d.expand(HEADS, 7, 7).clone()))
    with pytest.raises(TypeError, match="bool mask"):
        blk(x, ids, attn_bias=torch.zeros(7, 7, dtype=torch.long))


# -- reporting ----------------------------------------------------------------------------------
def test_backend_report_for_an_absent_cuda_and_for_input_dependent_ops():
    report = vlmo_fast.backend_report("cpu")
    assert report["ffn"]["auto"].startswith("depends on the input")     # dtype / compile decide
    assert report["attention"]["auto"] == "reference"
    if not torch.cuda.is_available():
        cuda = vlmo_fast.backend_report("cuda")
        assert all("no CUDA device" in cuda[op]["auto"] for op in cuda)
