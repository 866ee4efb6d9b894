"""Packed sequences: metadata, MoMEBlock and VLMo on packs equal separate forwards (values and
gradients, including the shared bias table), per-sequence drop path, input errors."""
import pytest
import torch

from vlmo_fast import MoMEBlock, VLMo
from vlmo_fast.embeddings import RelativePositionBias, token_layout
from vlmo_fast.packing import PackedSequences, pack

CPU_BACKENDS = ["reference", "sdpa", "flex"]


def test_metadata_from_lengths():
    p = PackedSequences.from_lengths([3, 1, 4])
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert p.document_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert (p.total, p.num_sequences, p.max_seqlen) == (8, 3, 4)
    assert p.starts.tolist() == [0, 3, 4]
    parts = p.split(torch.arange(8)[None, :, None])
    assert [t.squeeze(1).tolist() for t in parts] == [[0, 1, 2], [3], [4, 5, 6, 7]]
    assert p.same_sequence()[0, 2] and not p.same_sequence()[2, 3]


def test_pack_concatenates():
    seqs = [torch.randn(n, 5) for n in (2, 7, 1)]
    x, p = pack(seqs)
    assert x.shape == (1, 10, 5) and p.lengths == (2, 7, 1)
    for a, b in zip(p.split(x), seqs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lengths, kw, match", [
    ([], {}, "at least one sequence"),
    ([3, 0], {}, "at least one token"),
    ([2, 2], dict(is_text=torch.zeros(3, dtype=torch.bool), positions=torch.zeros(3, dtype=torch.long)),
     "one entry per packed token"),
    ([2], dict(is_text=torch.zeros(2, dtype=torch.bool)), "both is_text and positions"),
])
def test_bad_metadata_raises(lengths, kw, match):
    with pytest.raises(ValueError, match=match):
        PackedSequences.from_lengths(lengths, **kw)


_layout = token_layout   # (is_text, positions) of [text ; image]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_packed_equals_separate_forward_and_backward(backend):
    torch.manual_seed(0)
    dim, heads, grid = 32, 4, 2
    blk = MoMEBlock(dim, heads, num_experts=3, attn_backend=backend).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rel = RelativePositionBias(grid, 8, heads, depth=2)
    layouts = [_layout(0, 5), _layout(3, 0), _layout(6, 0), _layout(4, 5)]   # image, 2 texts, pair
    xs = [torch.randn(t.numel(), dim) for t, _ in layouts]
    ids = [torch.where(t, 1, 0) if i < 3 else torch.full_like(t, 2, dtype=torch.long)
           for i, (t, _) in enumerate(layouts)]
    x, packing = pack(xs, [t for t, _ in layouts], [p for _, p in layouts])
    x.requires_grad_(True)
    bias = rel.layer_biases(packing.is_text, packing.positions)[1]
    out = blk(x, torch.cat(ids)[None], attn_bias=bias, packing=packing)
    grad_out = torch.randn(out.shape)
    out.backward(grad_out)
    packed_grads = {n: p.grad.clone() for n, p in blk.named_parameters()}
    table_grad = rel.relative_position_bias_table.grad.clone()
    blk.zero_grad()
    rel.zero_grad()
    separate, x_grads = [], []
    for (t, p), xi, ii, gi in zip(layouts, xs, ids, packing.split(grad_out)):
        xi = xi[None].clone().requires_grad_(True)
        oi = blk(xi, ii[None], attn_bias=rel.layer_biases(t, p)[1])
        oi.backward(gi[None])
        separate.append(oi[0].detach())
        x_grads.append(xi.grad[0])
    torch.testing.assert_close(out[0].detach(), torch.cat(separate), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad[0], torch.cat(x_grads), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(table_grad, rel.relative_position_bias_table.grad, rtol=1e-4, atol=1e-5)
    for n, p in blk.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_drop_path_is_per_packed_sequence():
    blk = MoMEBlock(16, 2, num_experts=2, drop_path=0.5).train()
    packing = PackedSequences.from_lengths([3, 5, 2, 4, 6, 1])
    x = torch.randn(1, packing.total, 16)
    seen = set()
    for _ in range(10):
        scale = blk._keep_scale(x, packing, torch.float32)[0]
        for part in packing.split(scale):
            assert torch.all(part == part[0])          # one draw per sequence
            seen.add(float(part[0]))
    assert seen == {0.0, 2.0}
    out = blk(x, torch.zeros(1, packing.total, dtype=torch.long), packing=packing)
    assert out.shape == x.shape


def _inputs(c):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, c.img_size, c.img_size, generator=g)
    text = torch.randint(0, c.vocab_size, (3, 9), generator=g)
    text_mask = torch.ones(3, 9, dtype=torch.long)
    text_mask[1, 4:] = 0
    text_mask[2, 7:] = 0
    pair_text = torch.randint(0, c.vocab_size, (2, 6), generator=g)
    pair_mask = torch.ones(2, 6, dtype=torch.long)
    pair_mask[0, 2:] = 0
    pair_images = torch.randn(2, 3, c.img_size, c.img_size, generator=g)
    return images, text, text_mask, pair_text, pair_images, pair_mask


def _separate_loss(model, images, text, text_mask, pair_text, pair_images, pair_mask, w):
    img = model.encode_image(images)
    txt = model.encode_text(text, text_mask)
    pair = model.encode_pair(pair_text, pair_images, pair_mask)
    return (img.features * w[0]).sum() + (txt.features * w[1]).sum() + (pair.pooled * w[2]).sum() \
        + (pair.hidden * w[3][:, :pair.hidden.shape[1]] * pair_mask_full(pair_mask, pair.hidden)).sum(), \
        (img, txt, pair)


def pair_mask_full(pair_mask, hidden):
    n_img = hidden.shape[1] - pair_mask.shape[1]
    return torch.cat([pair_mask, torch.ones(pair_mask.shape[0], n_img, dtype=pair_mask.dtype)], 1)[..., None]


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_vlmo_encode_packed_equals_separate_passes(tiny, backend):
    c = tiny.config
    inputs = _inputs(c)
    images, text, text_mask, pair_text, pair_images, pair_mask = inputs
    for blk in tiny.blocks:
        blk.attn.backend = backend
    try:
        packed = tiny.encode_packed(images, text, text_mask, pair_text, pair_images, pair_mask)
    finally:
        for blk in tiny.blocks:
            blk.attn.backend = None
    assert packed.kinds == ("image",) * 2 + ("text",) * 3 + ("pair",) * 2
    assert packed.packing.lengths == (5, 5, 9, 4, 7, 7, 11) and packed.pair_text_lengths == (2, 6)
    g = torch.Generator().manual_seed(5)
    w = [torch.randn(2, c.dim, generator=g), torch.randn(3, c.dim, generator=g),
         torch.randn(2, c.dim, generator=g), torch.randn(2, 6 + 5, c.dim, generator=g)]
    # the same loss on the packed output: pair hidden states at the real tokens
    seqs = packed.sequences()
    pair_hidden = torch.stack([torch.cat([s[:n], torch.zeros(6 - n, c.dim), s[n:]])
                               for s, n in zip(seqs[5:], packed.pair_text_lengths)])
    loss_packed = (packed.image_features * w[0]).sum() + (packed.text_features * w[1]).sum() \
        + (packed.pair_pooled * w[2]).sum() + (pair_hidden * w[3] * pair_mask_full(pair_mask, pair_hidden)).sum()
    tiny.zero_grad()
    loss_packed.backward()
    grads = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
    tiny.zero_grad()
    loss_sep, (img, txt, pair) = _separate_loss(tiny, *inputs, w)
    loss_sep.backward()
    torch.testing.assert_close(packed.image_features, img.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.text_features, txt.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.pair_pooled, pair.pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seqs[3], txt.hidden[1, :4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_packed, loss_sep, rtol=1e-5, atol=1e-5)
    table = "rel_pos_bias.relative_position_bias_table"
    assert table in grads
    for n, p in tiny.named_parameters():
        if p.grad is None:
            assert n not in grads, n
            continue
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_vlmo_encode_packed_absolute_positions_and_errors():
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", relative_position=False, layer_scale_init=None).eval()
    c = model.config
    images, text, text_mask, *_ = _inputs(c)
    packed = model.encode_packed(images=images, text_ids=text, text_mask=text_mask)
    torch.testing.assert_close(packed.image_features, model.encode_image(images).features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.text_features, model.encode_text(text, text_mask).features,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs images, text_ids or pairs"):
        model.encode_packed()
    with pytest.raises(ValueError, match="both pair_text_ids and pair_images"):
        model.encode_packed(pair_text_ids=text)


@pytest.mark.gpu
def test_gpu_vlmo_base_packed_step_equals_separate_passes():
    """VLMo-Base on CUDA, automatic attention backend (compiled flex), bf16 autocast: one packed
    pass of a step's images, texts and pairs equals the separate passes; the bias-table
    gradient agrees."""
    torch.manual_seed(0)
    model = VLMo.from_preset("base", drop_path_rate=0.0).cuda().eval()
    c = model.config
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 224, 224, generator=g).cuda()
    text = torch.randint(0, c.vocab_size, (3, 40), generator=g).cuda()
    text_mask = (torch.arange(40)[None] < torch.tensor([[40], [17], [9]])).long().cuda()
    pair_text = torch.randint(0, c.vocab_size, (2, 40), generator=g).cuda()
    pair_mask = (torch.arange(40)[None] < torch.tensor([[25], [40]])).long().cuda()
    pair_images = torch.randn(2, 3, 224, 224, generator=g).cuda()
    table = model.rel_pos_bias.relative_position_bias_table
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model.encode_packed(images, text, text_mask, pair_text, pair_images, pair_mask)
        assert model.blocks[0].attn.last_backend == "flex"
        loss = packed.image_features.sum() + packed.text_features.sum() + packed.pair_pooled.sum()
        loss.backward()
        packed_grad = table.grad.clone()
        table.grad = None
        img = model.encode_image(images)
        txt = model.encode_text(text, text_mask)
        pair = model.encode_pair(pair_text, pair_images, pair_mask)
        (img.features.sum() + txt.features.sum() + pair.pooled.sum()).backward()
    tol = dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(packed.image_features.float(), img.features.float(), **tol)
    torch.testing.assert_close(packed.text_features.float(), txt.features.float(), **tol)
    torch.testing.assert_close(packed.pair_pooled.float(), pair.pooled.float(), **tol)
    rel_err = (packed_grad - table.grad).norm() / table.grad.norm()
    assert rel_err < 5e-2, f"bias-table gradient relative error {rel_err:.3g}"


@pytest.mark.parametrize("with_pairs", [False, True])
def test_vlmo_encode_packed_return_vl_equals_single_passes(tiny, with_pairs):
    """return_vl=True: each image's / text's itc_vl features (and their gradients, through
    the shared bias table too) equal encode_image / encode_text(return_vl=True) of that
    sequence alone; pairs in the pack are left out of the VL re-run and keep their result."""
    images, text, text_mask, pair_text, pair_images, pair_mask = _inputs(tiny.config)
    pairs = (pair_text, pair_images, pair_mask) if with_pairs else (None, None, None)
    packed = tiny.encode_packed(images, text, text_mask, *pairs, return_vl=True)
    plain = tiny.encode_packed(images, text, text_mask, *pairs)
    assert plain.image_vl_features is None and plain.text_vl_features is None
    torch.testing.assert_close(packed.hidden, plain.hidden, rtol=0, atol=0)
    table = tiny.rel_pos_bias.relative_position_bias_table
    g = torch.Generator().manual_seed(7)
    w_img, w_txt = torch.randn(packed.image_vl_features.shape, generator=g), \
        torch.randn(packed.text_vl_features.shape, generator=g)
    (packed_grad,) = torch.autograd.grad((packed.image_vl_features * w_img).sum()
                                         + (packed.text_vl_features * w_txt).sum(), table)
    img = tiny.encode_image(images, return_vl=True)
    for i in range(text.shape[0]):          # each text alone, without its padding
        n = int(text_mask[i].sum())
        txt_i = tiny.encode_text(text[i:i + 1, :n], return_vl=True)
        torch.testing.assert_close(packed.text_vl_features[i], txt_i.vl_features[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed.text_features[i], txt_i.features[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.image_vl_features, img.vl_features, rtol=1e-4, atol=1e-5)
    txt = tiny.encode_text(text, text_mask, return_vl=True)
    torch.testing.assert_close(packed.text_vl_features, txt.vl_features, rtol=1e-4, atol=1e-5)
    (single_grad,) = torch.autograd.grad((img.vl_features * w_img).sum() + (txt.vl_features * w_txt).sum(), table)
    torch.testing.assert_close(packed_grad, single_grad, rtol=1e-3, atol=1e-5)


def test_vlmo_encode_packed_return_vl_without_a_vl_branch():
    model = VLMo.from_preset("tiny", itc_vl_head=False).eval()
    images, text, text_mask, pair_text, pair_images, pair_mask = _inputs(model.config)
    out = model.encode_packed(images, text, text_mask, return_vl=True)
    assert out.image_vl_features is None and out.text_vl_features is None
    out = VLMo.from_preset("tiny").eval().encode_packed(pair_text_ids=pair_text, pair_images=pair_images,
                                                        pair_text_mask=pair_mask, return_vl=True)
    assert out.image_vl_features is None and out.text_vl_features is None and out.pair_pooled.shape[0] == 2
