"""VLMo model: encoders, heads, presets, config, resolution change, save/load, bad inputs."""
import json

import pytest
import torch

from vlmo_fast import VLMo, VLMoConfig, PRESETS


def batch(model, b=3, lt=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    images = torch.randn(b, 3, c.img_size, c.img_size, generator=g)
    text_ids = torch.randint(0, c.vocab_size, (b, lt), generator=g)
    text_mask = torch.ones(b, lt, dtype=torch.long)
    text_mask[1, 5:] = 0
    return images, text_ids, text_mask


def test_encoder_shapes_and_normalised_features(tiny):
    images, text_ids, text_mask = batch(tiny)
    c = tiny.config
    img = tiny.encode_image(images, return_vl=True)
    txt = tiny.encode_text(text_ids, text_mask, return_vl=True)
    pair = tiny.encode_pair(text_ids, images, text_mask)
    assert img.hidden.shape == (3, c.num_image_tokens, c.dim)
    assert txt.hidden.shape == (3, 9, c.dim)
    assert pair.hidden.shape == (3, 9 + c.num_image_tokens, c.dim) and pair.text_len == 9
    for f in (img.features, img.vl_features, txt.features, txt.vl_features):
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(3))
    assert tiny.itm_logits(pair).shape == (3, 2)
    assert tiny.mlm_logits(pair).shape == (3, 9, c.vocab_size)
    assert tiny.mlm_logits(txt).shape == (3, 9, c.vocab_size)


def test_dual_and_fusion_modes_differ(tiny):
    images, text_ids, text_mask = batch(tiny)
    txt = tiny.encode_text(text_ids, text_mask)
    pair = tiny.encode_pair(text_ids, images, text_mask)
    # in the fusion encoder text attends to the image and the top layers use the VL expert
    assert not torch.allclose(txt.hidden, pair.hidden[:, :9], atol=1e-3)
    # changing the image changes the fused text states but never the dual-encoder text states
    pair2 = tiny.encode_pair(text_ids, images.flip(0), text_mask)
    assert not torch.allclose(pair.hidden[:, :9], pair2.hidden[:, :9], atol=1e-4)


def test_vl_branch_reruns_top_layers_with_the_vl_expert(tiny):
    images, _, _ = batch(tiny)
    c = tiny.config
    out = tiny.encode_image(images, return_vl=True)
    x = tiny.embed_image(images)
    biases = tiny.rel_pos_bias.layer_biases(torch.zeros(x.shape[1], dtype=torch.bool), torch.arange(x.shape[1]))
    for i in range(c.depth):
        if i == c.vl_start:
            kept = x
        x = tiny.blocks[i](x, torch.zeros(x.shape[:2], dtype=torch.long), attn_bias=biases[i])
    torch.testing.assert_close(tiny.norm(x), out.hidden)
    y = kept
    for i in range(c.vl_start, c.depth):
        y = tiny.blocks[i](y, torch.full(y.shape[:2], 2, dtype=torch.long), attn_bias=biases[i])
    expect = tiny.itc_vl.image_features(tiny.norm(y)[:, 0])
    torch.testing.assert_close(out.vl_features, expect)


def test_text_padding_is_ignored(tiny):
    _, text_ids, text_mask = batch(tiny)
    out1 = tiny.encode_text(text_ids, text_mask)
    ids2 = text_ids.clone()
    ids2[1, 5:] = (ids2[1, 5:] + 17) % tiny.config.vocab_size
    out2 = tiny.encode_text(ids2, text_mask)
    real = text_mask.bool()
    torch.testing.assert_close(out1.hidden[real], out2.hidden[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1.features, out2.features, rtol=1e-5, atol=1e-5)


def test_forward_dispatch_and_backward_reaches_parameters(tiny):
    model = VLMo.from_preset("tiny")
    images, text_ids, text_mask = batch(model)
    img = model.encode_image(images, return_vl=True)
    txt = model(text_ids=text_ids, text_mask=text_mask)
    pair = model(images=images, text_ids=text_ids, text_mask=text_mask)
    logits = torch.exp(model.itc.logit_scale) * img.features @ txt.features.T
    loss = logits.logsumexp(1).mean() + model.itm_logits(pair).square().mean() \
        + model.mlm_logits(pair).logsumexp(-1).mean() + img.vl_features.sum()
    loss.backward()
    assert model.itc.logit_scale.grad is not None
    assert model.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    for i, blk in enumerate(model.blocks):
        assert blk.attn.qkv.weight.grad.abs().sum() > 0, f"block {i}"
    with pytest.raises(ValueError, match="needs images, text_ids"):
        model()


def test_presets_have_the_paper_sizes():
    expect = {"base": (768, 12, 12, 2, True, 0.1), "large": (1024, 24, 16, 3, True, 0.1),
              "base_plus": (544, 24, 16, 3, False, None)}
    for name, (dim, depth, heads, vl, rel, ls) in expect.items():
        c = VLMoConfig.preset(name)
        assert (c.dim, c.depth, c.num_heads, c.vl_layers, c.relative_position, c.layer_scale_init) == \
            (dim, depth, heads, vl, rel, ls)
        assert c.mlp_hidden_dim == 4 * dim and c.img_size == 224 and c.patch_size == 16
        assert c.max_text_len == 40 and c.vocab_size == 30522
        with torch.device("meta"):
            m = VLMo(c)
        assert [b.num_experts for b in m.blocks] == [2] * (depth - vl) + [3] * vl
        if rel:  # (2*14-1)^2 + 3 image + 2 cross + 2*196 text rows, one column per head per layer
            assert tuple(m.rel_pos_bias.relative_position_bias_table.shape) == (729 + 3 + 2 + 392, heads * depth)
            assert m.pos_embed is None
        else:
            assert m.rel_pos_bias is None and tuple(m.pos_embed.shape) == (1, 197, dim)
            assert m.blocks[0].gamma_1 is None
    with torch.device("meta"):
        base = VLMo.from_preset("base")
    n = sum(p.numel() for p in base.parameters())
    # ~175M backbone (paper) + MLM decoder and ITC/ITM heads
    assert 195e6 < n < 210e6


def test_config_json_round_trip_and_validation(tmp_path):
    c = VLMoConfig.preset("base", num_classes=3129)
    assert VLMoConfig.from_json(c.to_json()) == c
    c.to_json(tmp_path / "c.json")
    assert VLMoConfig.from_json(tmp_path / "c.json") == c
    assert json.loads(c.to_json())["num_classes"] == 3129
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VLMoConfig(dim=100, num_heads=12)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        VLMoConfig(img_size=230)
    with pytest.raises(ValueError, match="vl_layers"):
        VLMoConfig(depth=2, vl_layers=3)
    with pytest.raises(ValueError, match="text_relpos_len"):
        VLMoConfig(max_text_len=300)
    with pytest.raises(ValueError, match="unknown keys"):
        VLMoConfig.from_dict({"dim": 64, "bogus": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        VLMoConfig.preset("huge")
    assert set(PRESETS) >= {"tiny", "base", "large", "base_plus"}


@pytest.mark.parametrize("case,exc,match", [
    ("not_divisible", ValueError, "not divisible by the patch size"),
    ("other_size", ValueError, "resize_image"),
    ("channels", ValueError, "channels"),
    ("too_long", ValueError, "exceeds the supported maximum"),
    ("vocab", ValueError, "text_ids must be in"),
    ("float_ids", TypeError, "integer tensor"),
    ("dtype", TypeError, "torch.float64"),
    ("mask_shape", ValueError, "text_mask must have the shape"),
    ("batch", ValueError, "batch"),
    ("empty_text", ValueError, "at least one token"),
    ("itm_on_text", ValueError, "itm_logits needs the output of encode_pair"),
    ("classify_on_image", RuntimeError, "no classification head"),
    ("mlm_on_image", ValueError, "mlm_logits needs"),
    ("resize_zero", ValueError, "positive multiple of the patch size"),
    ("mask_without_token", ValueError, "patch_mask and mask_token go together"),
    ("patch_mask_shape", ValueError, r"patch_mask must have shape \[batch, num_patches\] = \(3, 4\)"),
    ("mask_token_size", ValueError, "mask_token must hold dim = 64 values"),
    ("checkpointing_flag", TypeError, "enable must be a bool"),
])
def test_bad_model_inputs(tiny, case, exc, match):
    images, text_ids, text_mask = batch(tiny)
    c = tiny.config
    with pytest.raises(exc, match=match):
        if case == "not_divisible":
            tiny.encode_image(torch.randn(1, 3, 40, 40))
        elif case == "other_size":
            tiny.encode_image(torch.randn(1, 3, 48, 48))
        elif case == "channels":
            tiny.encode_image(torch.randn(1, 1, 32, 32))
        elif case == "too_long":
            tiny.encode_text(torch.zeros(1, c.max_text_len + 1, dtype=torch.long))
        elif case == "vocab":
            tiny.encode_text(torch.full((1, 4), c.vocab_size))
        elif case == "float_ids":
            tiny.encode_text(text_ids.float())
        elif case == "dtype":
            tiny.encode_image(images.double())
        elif case == "mask_shape":
            tiny.encode_text(text_ids, text_mask[:, :3])
        elif case == "batch":
            tiny.encode_pair(text_ids, images[:2], text_mask)
        elif case == "empty_text":
            tiny.encode_text(text_ids[:, :0])
        elif case == "itm_on_text":
            tiny.itm_logits(tiny.encode_text(text_ids))
        elif case == "classify_on_image":
            tiny.classify(tiny.encode_image(images))
        elif case == "mlm_on_image":
            tiny.mlm_logits(tiny.encode_image(images))
        elif case == "resize_zero":
            tiny.resize_image(0)
        elif case == "mask_without_token":
            tiny.encode_image(images, patch_mask=torch.zeros(3, 4, dtype=torch.bool))
        elif case == "patch_mask_shape":
            tiny.encode_image(images, patch_mask=torch.zeros(3, 5, dtype=torch.bool),
                              mask_token=torch.zeros(c.dim))
        elif case == "mask_token_size":
            tiny.encode_image(images, patch_mask=torch.zeros(3, 4, dtype=torch.bool),
                              mask_token=torch.zeros(1, 1, c.dim + 1))
        elif case == "checkpointing_flag":
            tiny.set_grad_checkpointing("yes")


def test_resize_image_interpolates_positions(tiny):
    model = VLMo.from_preset("tiny").eval()
    model.load_state_dict(tiny.state_dict())
    model.resize_image(48)
    assert model.config.img_size == 48 and model.rel_pos_bias.grid_size == 3
    out = model.encode_image(torch.randn(2, 3, 48, 48))
    assert out.hidden.shape == (2, 10, 64)
    # the non-image rows of the shared table are carried over unchanged
    old, new = tiny.rel_pos_bias, model.rel_pos_bias
    torch.testing.assert_close(new.relative_position_bias_table[new.num_image_distances - 3:],
                               old.relative_position_bias_table[old.num_image_distances - 3:])
    with pytest.raises(ValueError, match="not divisible"):
        model.resize_image(50)


def test_absolute_position_model_runs():
    model = VLMo(VLMoConfig.preset("tiny", relative_position=False, layer_scale_init=None)).eval()
    images, text_ids, text_mask = batch(model)
    pair = model.encode_pair(text_ids, images, text_mask)
    assert torch.isfinite(pair.hidden).all()
    model.resize_image(48)
    assert model.pos_embed.shape == (1, 10, 64)


def test_save_and_from_pretrained(tiny, tmp_path):
    images, text_ids, text_mask = batch(tiny)
    tiny.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = VLMo.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == tiny.config
    torch.testing.assert_close(loaded.encode_pair(text_ids, images, text_mask).hidden,
                               tiny.encode_pair(text_ids, images, text_mask).hidden, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a vlmo_fast checkpoint"):
        VLMo.from_pretrained(tmp_path)


def test_masked_image_input_replaces_exactly_the_masked_patches(tiny):
    images, _, _ = batch(tiny)
    c = tiny.config
    patch_mask = torch.tensor([[True, False, False, True], [False] * 4, [True] * 4])
    mask_token = torch.randn(1, 1, c.dim)
    x = tiny.embed_image(images, patch_mask, mask_token)
    plain = tiny.embed_image(images)
    # a masked patch holds the mask token + the image type embedding (tiny: relative positions)
    expect = (mask_token + tiny.token_type_embeddings.weight[1]).expand(3, 4, c.dim)
    torch.testing.assert_close(x[:, 1:][patch_mask], expect[patch_mask])
    torch.testing.assert_close(x[:, 1:][~patch_mask], plain[:, 1:][~patch_mask])
    torch.testing.assert_close(x[:, 0], plain[:, 0])
    out = tiny.encode_image(images, patch_mask=patch_mask, mask_token=mask_token)
    torch.testing.assert_close(out.hidden[1], tiny.encode_image(images[1:2]).hidden[0])
    assert not torch.allclose(out.hidden[0], tiny.encode_image(images[:1]).hidden[0], atol=1e-3)


# -- activation checkpointing (timm's set_grad_checkpointing) ----------------------------------

def _pass_loss(model, which, images, text_ids, text_mask):
    """A loss touching every output of one pass (both ITC branches where there are two)."""
    if which == "image":
        out = model.encode_image(images, return_vl=True)
        return (out.features * torch.linspace(-1, 1, out.features.shape[-1])).sum() + out.vl_features[:, 0].sum()
    if which == "text":
        out = model.encode_text(text_ids, text_mask, return_vl=True)
        return (out.features * torch.linspace(-1, 1, out.features.shape[-1])).sum() + out.vl_features[:, 0].sum()
    if which == "pair":
        out = model.encode_pair(text_ids, images, text_mask)
        return model.itm_logits(out)[:, 1].sum() + model.mlm_logits(out).logsumexp(-1).mean()
    out = model.encode_packed(images, text_ids, text_mask, text_ids[:2], images[:2], text_mask[:2],
                              return_vl=True)
    return (out.image_features[:, :3].sum() + out.text_features[:, 1:4].sum() + out.pair_pooled[:, 0].sum()
            + out.image_vl_features[:, 2].sum() + out.text_vl_features[:, 5].sum())


@pytest.mark.parametrize("which", ["image", "text", "pair", "packed"])
def test_grad_checkpointing_gives_the_same_gradients(which):
    """fp32, training mode with drop path (checkpointing replays the RNG): same loss and
    gradients, and each block runs twice (forward, then again in backward)."""
    grads, calls = [], []
    for enable in (False, True):
        torch.manual_seed(0)
        model = VLMo.from_preset("tiny", drop_path_rate=0.3).train()
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable
        counter = [0]
        for blk in model.blocks:
            blk.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        torch.manual_seed(1)
        loss = _pass_loss(model, which, *batch(model))
        forward_calls = counter[0]
        loss.backward()
        calls.append((forward_calls, counter[0]))
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = grads
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and "rel_pos_bias.relative_position_bias_table" in g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-6, msg=n)
    (plain_fwd, plain_total), (ckpt_fwd, ckpt_total) = calls
    assert plain_fwd == plain_total == ckpt_fwd and ckpt_total == 2 * ckpt_fwd


def test_grad_checkpointing_only_while_recording_and_keeps_state_dict_names(monkeypatch):
    import vlmo_fast.model as model_module
    model = VLMo.from_preset("tiny", drop_path_rate=0.0).eval()
    names = list(model.state_dict())
    images, text_ids, text_mask = batch(model)
    reference = model.encode_pair(text_ids, images, text_mask).hidden.detach()
    seen = []

    def recording_checkpoint(fn, *args, use_reentrant, **kwargs):
        assert use_reentrant is False
        seen.append(fn)
        return fn(*args, **kwargs)
    monkeypatch.setattr(model_module, "checkpoint", recording_checkpoint)
    model.set_grad_checkpointing()
    assert list(model.state_dict()) == names
    with torch.no_grad():
        out = model.encode_pair(text_ids, images, text_mask)
    assert seen == []                                  # nothing to recompute without autograd
    torch.testing.assert_close(out.hidden, reference, rtol=0, atol=0)
    model.encode_pair(text_ids, images, text_mask)
    assert seen == list(model.blocks)
    model.set_grad_checkpointing(False)
    seen.clear()
    model.encode_pair(text_ids, images, text_mask)
    assert seen == []


# -- ablation switches (VLMoConfig.vl_expert, VLMoConfig.attention) ------------------------------
def _record_block_inputs(model):
    """Forward pre-hooks: per call, the (layer, modality_ids, token_modality) each block got."""
    seen = []
    hooks = [blk.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: seen.append((i, args[1].clone(), kwargs.get("token_modality"))),
        with_kwargs=True) for i, blk in enumerate(model.blocks)]
    return seen, hooks


def _pair_types(model, lt, li, b):
    return torch.cat([torch.ones(b, lt, dtype=torch.long), torch.zeros(b, li, dtype=torch.long)], 1)


@pytest.mark.parametrize("vl_expert", [True, False])
def test_vl_expert_switch_routes_the_top_layers_of_a_pair(vl_expert):
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", vl_expert=vl_expert, drop_path_rate=0.0)
    c = model.config
    images, text_ids, text_mask = batch(model)
    seen, hooks = _record_block_inputs(model)
    model.encode_pair(text_ids, images, text_mask)
    for h in hooks:
        h.remove()
    by_type = _pair_types(model, text_ids.shape[1], c.num_image_tokens, images.shape[0])
    assert [i for i, _, _ in seen] == list(range(c.depth))
    for i, ids, _ in seen:
        expect = by_type if (i < c.vl_start or not vl_expert) else torch.full_like(by_type, 2)
        assert torch.equal(ids, expect), (i, ids)
    assert (model.itc_vl is None) == (not vl_expert)
    assert VLMoConfig.from_json(c.to_json()).vl_expert is vl_expert

    # a training step's passes: the VL expert (slot 2 of the top banks) learns only when used
    img = model.encode_image(images, return_vl=True)
    txt = model.encode_text(text_ids, text_mask, return_vl=True)
    pair = model.encode_packed(pair_text_ids=text_ids, pair_images=images, pair_text_mask=text_mask)
    loss = img.features.sum() + txt.features.sum() + pair.pair_pooled.square().sum()
    if img.vl_features is not None:
        loss = loss + img.vl_features.sum() + txt.vl_features.sum()
    loss.backward()
    for blk in model.blocks[c.vl_start:]:
        vl_grad = blk.mlp.fc1_weight.grad[2].abs().sum().item()
        assert (vl_grad > 0) == vl_expert
        assert blk.mlp.fc1_weight.grad[:2].abs().sum() > 0


def test_vl_expert_off_packed_pairs_equal_padded_pairs():
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", vl_expert=False).eval()
    images, text_ids, text_mask = batch(model)
    packed = model.encode_packed(pair_text_ids=text_ids, pair_images=images, pair_text_mask=text_mask,
                                 images=images, text_ids=text_ids, text_mask=text_mask, return_vl=True)
    torch.testing.assert_close(packed.pair_pooled, model.encode_pair(text_ids, images, text_mask).pooled)
    assert packed.image_vl_features is None and model.encode_image(images, return_vl=True).vl_features is None


def test_per_modality_attention_model_gives_each_token_its_modalitys_weights():
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", attention="per_modality", drop_path_rate=0.0)
    c = model.config
    assert all(blk.attention == "per_modality" for blk in model.blocks)
    images, text_ids, text_mask = batch(model)
    seen, hooks = _record_block_inputs(model)
    model.encode_pair(text_ids, images, text_mask)
    model.encode_image(images, return_vl=True)
    for h in hooks:
        h.remove()
    by_type = _pair_types(model, text_ids.shape[1], c.num_image_tokens, images.shape[0])
    pair, image = seen[:c.depth], seen[c.depth:]
    assert all(torch.equal(types, by_type) for _, _, types in pair)   # VL layers too (their ids are 2)
    assert len(image) == c.depth + c.vl_layers                         # + the itc_vl re-run, ids 2
    assert all(not types.any() for _, _, types in image)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        out = {}
        for blk in model.blocks:
            for name, attn in (("vision", blk.attn), ("language", blk.attn_text)):
                out[name] = out.get(name, 0.0) + sum(p.grad.abs().sum().item() for p in attn.parameters()
                                                     if p.grad is not None)
        return out
    image_only = grads(model.encode_image(images, return_vl=True).vl_features.sum())
    text_only = grads(model.encode_text(text_ids, text_mask, return_vl=True).vl_features.sum())
    fused = grads(model.encode_pair(text_ids, images, text_mask).pooled.square().sum())
    assert image_only["vision"] > 0 and image_only["language"] == 0
    assert text_only["language"] > 0 and text_only["vision"] == 0
    assert fused["vision"] > 0 and fused["language"] > 0

    model.eval()
    packed = model.encode_packed(images=images, text_ids=text_ids, text_mask=text_mask, pair_text_ids=text_ids,
                                 pair_images=images, pair_text_mask=text_mask, return_vl=True)
    torch.testing.assert_close(packed.pair_pooled, model.encode_pair(text_ids, images, text_mask).pooled)
    torch.testing.assert_close(packed.text_vl_features,
                               model.encode_text(text_ids, text_mask, return_vl=True).vl_features)


def test_ablation_fields_are_validated_and_default_to_vlmo():
    c = VLMoConfig.preset("tiny")
    assert c.vl_expert is True and c.attention == "shared"
    assert {"vl_expert", "attention"} <= set(c.to_dict())
    with pytest.raises(ValueError, match="attention must be one of"):
        VLMoConfig.preset("tiny", attention="separate")
    with pytest.raises(TypeError, match=r"VLMoConfig\.vl_expert must be a bool"):
        VLMoConfig.preset("tiny", vl_expert="no")
    with pytest.raises(TypeError, match=r"VLMoConfig\.attention must be a str"):
        VLMoConfig.preset("tiny", attention=2)
    # the default model has no second attention and the same parameters as before the switches
    names = {n for n, _ in VLMo.from_preset("tiny").named_parameters()}
    assert not any(".attn_text." in n for n in names) and "itc_vl.logit_scale" in names
