"""Checkpoint compatibility: reference VLMo names (exact round trip and numerical parity
with a from-scratch re-implementation of the reference forward), timm BEiT parity."""
import pytest
import torch
import torch.nn.functional as F

from vlmo_fast import VLMo, VLMoConfig, export_reference_state_dict, load_beit_state_dict, \
    load_reference_state_dict
from vlmo_fast.checkpoint import TEXT_POSITIONS, CheckpointMismatchError, LoadResult


def reference_shapes(c: VLMoConfig, num_classes: int = 0):
    """Every tensor of a reference VLMo state_dict, by name -> shape (written from the
    reference's module layout, independently of our model code)."""
    d, h, v = c.dim, c.mlp_hidden_dim, c.vocab_size
    s = {
        "text_embeddings.word_embeddings.weight": (v, d),
        "text_embeddings.position_embeddings.weight": (c.max_text_len, d),
        "text_embeddings.token_type_embeddings.weight": (2, d),
        "text_embeddings.LayerNorm.weight": (d,), "text_embeddings.LayerNorm.bias": (d,),
        "token_type_embeddings.weight": (2, d),
        "transformer.cls_token": (1, 1, d),
        "transformer.patch_embed.proj.weight": (d, 3, c.patch_size, c.patch_size),
        "transformer.patch_embed.proj.bias": (d,),
        "transformer.norm.weight": (d,), "transformer.norm.bias": (d,),
        "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
        "itc_text_proj.fc.weight": (d, d), "itc_image_proj.fc.weight": (d, d),
        "itc_vl_text_proj.fc.weight": (d, d), "itc_vl_image_proj.fc.weight": (d, d),
        "logit_scale": (), "logit_vl_scale": (),
        "itm_score.fc.weight": (2, d), "itm_score.fc.bias": (2,),
        "mlm_score.transform.dense.weight": (d, d), "mlm_score.transform.dense.bias": (d,),
        "mlm_score.transform.LayerNorm.weight": (d,), "mlm_score.transform.LayerNorm.bias": (d,),
        "mlm_score.decoder.weight": (v, d), "mlm_score.bias": (v,),
    }
    if c.relative_position:
        g = c.grid_size
        s["relative_position_bias_table"] = ((2 * g - 1) ** 2 + 3 + 2 * c.text_relpos_len + 2, c.num_heads * c.depth)
    else:
        s["transformer.pos_embed"] = (1, c.num_image_tokens, d)
    for i in range(c.depth):
        p = f"transformer.blocks.{i}."
        s.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                  p + "attn.q_bias": (d,), p + "attn.v_bias": (d,), p + "attn.proj.weight": (d, d),
                  p + "attn.proj.bias": (d,)})
        if c.layer_scale_init is not None:
            s[p + "gamma_1"] = (d,)
            s[p + "gamma_2"] = (d,)
        for ex in ["text", "imag"] + (["vl"] if i >= c.depth - c.vl_layers else []):
            s.update({f"{p}norm2_{ex}.weight": (d,), f"{p}norm2_{ex}.bias": (d,),
                      f"{p}mlp_{ex}.fc1.weight": (h, d), f"{p}mlp_{ex}.fc1.bias": (h,),
                      f"{p}mlp_{ex}.fc2.weight": (d, h), f"{p}mlp_{ex}.fc2.bias": (d,)})
    if num_classes:
        s.update({"vqa_classifier.0.weight": (2 * d, d), "vqa_classifier.0.bias": (2 * d,),
                  "vqa_classifier.1.weight": (2 * d,), "vqa_classifier.1.bias": (2 * d,),
                  "vqa_classifier.3.weight": (num_classes, 2 * d), "vqa_classifier.3.bias": (num_classes,)})
    return s


def random_reference_state_dict(c, num_classes=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in reference_shapes(c, num_classes).items():
        t = torch.randn(shape, generator=g) * 0.05
        if k.endswith(("LayerNorm.weight", "norm1.weight", "norm.weight")) or ".norm2_" in k and k.endswith("weight"):
            t = t + 1.0
        sd[k] = t
    return sd


@pytest.mark.parametrize("preset,overrides,num_classes", [
    ("tiny", {}, 0), ("tiny", {"relative_position": False, "layer_scale_init": None}, 0),
    ("tiny", {"num_classes": 7}, 7)])
def test_reference_round_trip_is_exact(preset, overrides, num_classes):
    c = VLMoConfig.preset(preset, **overrides)
    sd = random_reference_state_dict(c, num_classes)
    model = VLMo(c)
    result = load_reference_state_dict(model, sd)
    assert isinstance(result, LoadResult) and result == LoadResult([], [])
    back = export_reference_state_dict(model)
    assert set(back) == set(sd)
    has_positions = TEXT_POSITIONS in model.state_dict()
    for k in sd:
        if k == TEXT_POSITIONS and not has_positions:  # unused with relative positions: zeros
            assert back[k].shape == sd[k].shape and not back[k].any()
        else:
            assert torch.equal(back[k], sd[k]), k
        assert back[k].is_contiguous(), k


def _drop_text_positions(model):
    """A model as the relative-position presets build it without the unused BERT positions."""
    model.text_embeddings.position_embeddings = None
    assert TEXT_POSITIONS not in model.state_dict()
    return model


def test_text_positions_are_dropped_on_load_and_zero_on_export_without_the_parameter():
    c = VLMoConfig.preset("tiny")
    sd = random_reference_state_dict(c)
    model = _drop_text_positions(VLMo(c))
    assert load_reference_state_dict(model, sd) == LoadResult([], [])
    without = {k: v for k, v in sd.items() if k != TEXT_POSITIONS}
    assert load_reference_state_dict(model, without) == LoadResult([], [])  # optional both ways
    back = export_reference_state_dict(model)
    assert set(back) == set(sd) and not back[TEXT_POSITIONS].any()
    assert back[TEXT_POSITIONS].shape == (c.max_text_len, c.dim)
    for k in without:
        assert torch.equal(back[k], sd[k]), k
    # optional for a relative-position model that still has the parameter
    assert load_reference_state_dict(VLMo(c), without) == LoadResult([], [])
    # an absolute-position model loads it (it is used there)
    ca = VLMoConfig.preset("tiny", relative_position=False)
    sda = random_reference_state_dict(ca)
    absolute = VLMo(ca)
    load_reference_state_dict(absolute, sda)
    assert torch.equal(absolute.text_embeddings.position_embeddings.weight, sda[TEXT_POSITIONS])


def test_reference_loader_accepts_wrappers_modules_and_ignores_index_buffers():
    c = VLMoConfig.preset("tiny")
    sd = random_reference_state_dict(c)
    wrapped = {"module": {"module." + k: v for k, v in sd.items()}}
    wrapped["module"]["module.text_embeddings.position_ids"] = torch.arange(c.max_text_len)[None]
    model = VLMo(c)
    load_reference_state_dict(model, wrapped)

    class Holder(torch.nn.Module):  # a module whose state_dict() has the reference names
        def __init__(self):
            super().__init__()
            for i, (k, v) in enumerate(sd.items()):
                self.register_buffer(f"b{i}", v)

        def state_dict(self, *args, **kwargs):
            return dict(sd)
    other = VLMo(c)
    load_reference_state_dict(other, Holder())
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_reference_loader_assigns_into_a_meta_model():
    c = VLMoConfig.preset("tiny")
    sd = random_reference_state_dict(c)
    with torch.device("meta"):
        model = VLMo(c)
    load_reference_state_dict(model, sd, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.blocks[3].mlp.fc2_weight[2], sd["transformer.blocks.3.mlp_vl.fc2.weight"].t())
    assert torch.equal(model.itc.logit_scale, sd["logit_scale"].reshape(1))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} was modified by a failed load"


def test_reference_loader_errors_are_clear_and_leave_the_model_untouched():
    c = VLMoConfig.preset("tiny")
    sd = random_reference_state_dict(c)
    model = VLMo(c)
    before = _snapshot(model)
    bad = dict(sd)
    del bad["transformer.blocks.0.mlp_text.fc1.weight"]
    bad["transformer.blocks.0.mlp_audio.fc1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): transformer.blocks.0.mlp_text.fc1.weight"):
        load_reference_state_dict(model, bad)
    with pytest.raises(CheckpointMismatchError, match="unexpected.*mlp_audio"):
        load_reference_state_dict(model, bad)
    _assert_unchanged(model, before)
    result = load_reference_state_dict(model, bad, strict=False)
    assert result.missing_keys == ["transformer.blocks.0.mlp_text.fc1.weight"]
    assert result.unexpected_keys == ["transformer.blocks.0.mlp_audio.fc1.weight"]
    fc1 = model.blocks[0].mlp.fc1_weight
    assert torch.equal(fc1[1], before["blocks.0.mlp.fc1_weight"][1])  # the missing expert kept its value
    assert torch.equal(fc1[0], sd["transformer.blocks.0.mlp_imag.fc1.weight"].t())  # the others loaded
    assert torch.equal(model.norm.weight, sd["transformer.norm.weight"])

    model = VLMo(c)
    before = _snapshot(model)
    for key, value, pattern in [
            ("transformer.norm.weight", torch.zeros(c.dim + 1),
             r"transformer.norm.weight: checkpoint \(65,\), model \(64,\)"),
            ("transformer.norm.weight", torch.ones(c.dim, dtype=torch.long),
             "transformer.norm.weight: checkpoint dtype torch.int64"),
            ("transformer.blocks.3.mlp_vl.fc1.bias", torch.zeros(7), "mlp_vl.fc1.bias: checkpoint \\(7,\\)")]:
        bad = dict(sd)
        bad[key] = value
        for strict in (True, False):  # shape/dtype problems raise even with strict=False
            with pytest.raises(CheckpointMismatchError, match=pattern) as err:
                load_reference_state_dict(model, bad, strict=strict)
            assert "strict=False" not in str(err.value)
        _assert_unchanged(model, before)
    with pytest.raises(TypeError, match="state_dict must be a state_dict"):
        load_reference_state_dict(model, [("a", torch.zeros(1))])
    with pytest.raises(TypeError, match=r"state_dict\['logit_scale'\] must be a tensor, got float"):
        load_reference_state_dict(model, {**sd, "logit_scale": 2.6})
    with pytest.raises(TypeError, match="model must be a vlmo_fast.VLMo"):
        load_reference_state_dict(torch.nn.Linear(2, 2), sd)


def test_a_checkpoint_of_another_depth_names_the_difference_and_the_preset():
    """The issue's case: a depth-4 (tiny) checkpoint and a depth-2 model, and the reverse."""
    sd = random_reference_state_dict(VLMoConfig.preset("tiny"))
    model = VLMo(VLMoConfig.preset("tiny", depth=2, vl_layers=1))
    before = _snapshot(model)
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError,
                           match=r"reference checkpoint depth=4, model depth=2; reference checkpoint "
                                 r"vl_layers=2, model vl_layers=1 \(the checkpoint looks like preset 'tiny'\)"):
            load_reference_state_dict(model, sd, strict=strict)
        _assert_unchanged(model, before)
    small = random_reference_state_dict(VLMoConfig.preset("tiny", depth=2, vl_layers=1))
    model = VLMo(VLMoConfig.preset("tiny"))
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)reference checkpoint depth=2, model depth=4.*"
                             r"relative_position_bias_table: checkpoint \(78, 8\), model \(78, 16\)"):
        load_reference_state_dict(model, small, strict=False)
    _assert_unchanged(model, before)
    narrow = random_reference_state_dict(VLMoConfig.preset("tiny", mlp_ratio=2))
    with pytest.raises(CheckpointMismatchError, match=r"reference checkpoint mlp_ratio=2.0, model mlp_ratio=4.0\n"):
        load_reference_state_dict(model, narrow)


# --- an independent re-implementation of the reference forward (fusion encoder) ------------
def _ref_rel_index(c, text_len):
    g = c.grid_size
    n_img = (2 * g - 1) ** 2 + 3
    n_all = n_img + 2 * c.text_relpos_len + 2
    coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += g - 1
    rel[:, :, 1] += g - 1
    rel[:, :, 0] *= 2 * g - 1
    img = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
    img[1:, 1:] = rel.sum(-1)
    img[0, 0:] = n_img - 3
    img[0:, 0] = n_img - 2
    img[0, 0] = n_img - 1
    ids = torch.arange(text_len - 1)
    mat = ids.unsqueeze(-2) - ids.unsqueeze(-1) - (2 - c.text_relpos_len) + n_img + 2
    txt = torch.zeros(text_len, text_len, dtype=torch.long)
    txt[1:, 1:] = mat
    txt[0, 0:] = n_all - 3
    txt[0:, 0] = n_all - 2
    txt[0, 0] = n_all - 1
    li = g * g + 1
    top = torch.cat([txt, torch.full((text_len, li), n_img)], 1)
    bottom = torch.cat([torch.full((li, text_len), n_img + 1), img], 1)
    return torch.cat([top, bottom], 0)


def reference_pair_forward(sd, c, text_ids, text_mask, images):
    d, H = c.dim, c.num_heads
    lt = text_ids.shape[1]
    t = sd["text_embeddings.word_embeddings.weight"][text_ids] + sd["text_embeddings.token_type_embeddings.weight"][0]
    t = F.layer_norm(t, (d,), sd["text_embeddings.LayerNorm.weight"], sd["text_embeddings.LayerNorm.bias"], 1e-12)
    t = t + sd["token_type_embeddings.weight"][0]
    im = F.conv2d(images, sd["transformer.patch_embed.proj.weight"], sd["transformer.patch_embed.proj.bias"],
                  stride=c.patch_size).flatten(2).transpose(1, 2)
    im = torch.cat([sd["transformer.cls_token"].expand(im.shape[0], -1, -1), im], 1)
    im = im + sd["token_type_embeddings.weight"][1]
    x = torch.cat([t, im], 1)
    mask = torch.cat([text_mask, torch.ones(im.shape[:2], dtype=text_mask.dtype)], 1).bool()
    L = x.shape[1]
    bias_all = sd["relative_position_bias_table"][_ref_rel_index(c, lt)].permute(2, 0, 1)
    biases = torch.chunk(bias_all, c.depth, 0)

    def mlp(z, p, ex):
        z = F.layer_norm(z, (d,), sd[f"{p}norm2_{ex}.weight"], sd[f"{p}norm2_{ex}.bias"], 1e-6)
        z = F.gelu(F.linear(z, sd[f"{p}mlp_{ex}.fc1.weight"], sd[f"{p}mlp_{ex}.fc1.bias"]))
        return F.linear(z, sd[f"{p}mlp_{ex}.fc2.weight"], sd[f"{p}mlp_{ex}.fc2.bias"])

    for i in range(c.depth):
        p = f"transformer.blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv_b = torch.cat([sd[p + "attn.q_bias"], torch.zeros(d), sd[p + "attn.v_bias"]])
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], qkv_b).reshape(x.shape[0], L, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (d // H) ** -0.5, qkv[1], qkv[2]
        a = q.float() @ k.float().transpose(-2, -1) + biases[i].unsqueeze(0)
        a = a.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        y = F.linear((a @ v).transpose(1, 2).reshape(x.shape[0], L, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = x + sd[p + "gamma_1"] * y
        if i >= c.depth - c.vl_layers:
            x = x + sd[p + "gamma_2"] * mlp(x, p, "vl")
        else:  # the reference's fixed split: first max_text_len positions are text
            xt, xi = x[:, :lt], x[:, lt:]
            x = torch.cat([xt + sd[p + "gamma_2"] * mlp(xt, p, "text"),
                           xi + sd[p + "gamma_2"] * mlp(xi, p, "imag")], 1)
    x = F.layer_norm(x, (d,), sd["transformer.norm.weight"], sd["transformer.norm.bias"], 1e-6)
    pooled = torch.tanh(F.linear(x[:, 0], sd["pooler.dense.weight"], sd["pooler.dense.bias"]))
    return x, pooled


def test_loaded_reference_weights_reproduce_the_reference_forward():
    c = VLMoConfig.preset("tiny")
    sd = random_reference_state_dict(c, seed=3)
    model = VLMo(c).eval()
    load_reference_state_dict(model, sd)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, c.img_size, c.img_size, generator=g)
    text_ids = torch.randint(0, c.vocab_size, (2, c.max_text_len), generator=g)
    text_mask = torch.ones(2, c.max_text_len, dtype=torch.long)
    text_mask[0, 6:] = 0
    ref_hidden, ref_pooled = reference_pair_forward(sd, c, text_ids, text_mask, images)
    out = model.encode_pair(text_ids, images, text_mask)
    torch.testing.assert_close(out.hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    logits = model.itm_logits(out)
    torch.testing.assert_close(logits, F.linear(ref_pooled, sd["itm_score.fc.weight"], sd["itm_score.fc.bias"]),
                               rtol=1e-5, atol=1e-5)


# --- timm BEiT ------------------------------------------------------------------------------
timm = pytest.importorskip("timm")


def _random_beit(depth=3, **kwargs):
    from timm.models.beit import Beit
    beit = Beit(img_size=48, patch_size=16, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=4,
                use_abs_pos_emb=False, init_values=0.1, global_pool="token", num_classes=0,
                **{"use_rel_pos_bias": True, **kwargs}).eval()
    with torch.no_grad():  # random weights everywhere, including biases and the bias tables
        for p in beit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return beit


@pytest.mark.parametrize("shared_table", [False, True])
def test_beit_image_outputs_match_timm(shared_table):
    torch.manual_seed(0)
    beit = _random_beit(**({"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True} if shared_table else {}))
    c = VLMoConfig.preset("tiny", img_size=48, depth=3, vl_layers=1)
    model = VLMo(c).eval()
    text_expert = model.blocks[0].mlp.fc1_weight[1].clone()
    result = load_beit_state_dict(model, beit)  # a module is accepted (its state_dict() is used)
    assert isinstance(result, LoadResult) and result.missing_keys == []
    assert all("relative_position_index" in k for k in result.unexpected_keys)
    assert torch.equal(model.blocks[0].mlp.fc1_weight[1], text_expert)  # BEiT fills the vision expert only
    with torch.no_grad():
        model.token_type_embeddings.weight.zero_()  # BEiT has no modality embedding
    images = torch.randn(2, 3, 48, 48)
    expect = beit.forward_features(images)
    got = model.encode_image(images).hidden
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)


def test_beit_of_another_depth_raises_before_copying():
    torch.manual_seed(0)
    c = VLMoConfig.preset("tiny", img_size=48, depth=4, vl_layers=1)
    model = VLMo(c)
    before = _snapshot(model)
    shallow = _random_beit(depth=3).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"(?s)BEiT checkpoint depth=3, model depth=4.*"
                                                      r"missing \(\d+\): blocks.3."):
        load_beit_state_dict(model, shallow)
    _assert_unchanged(model, before)
    result = load_beit_state_dict(model, shallow, strict=False)  # loads blocks 0-2
    assert result.missing_keys and all(k.startswith("blocks.3.") for k in result.missing_keys)
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, shallow["blocks.2.attn.qkv.weight"])
    model = VLMo(c.replace(depth=2))
    before = _snapshot(model)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)BEiT checkpoint depth=3, model depth=2.*"
                                                      r"unexpected \(\d+\): blocks.2."):
        load_beit_state_dict(model, shallow)
    _assert_unchanged(model, before)
    absolute = VLMo(c.replace(relative_position=False))
    with pytest.raises(CheckpointMismatchError, match="relative position bias tables, the model uses absolute"):
        load_beit_state_dict(absolute, shallow)
    with pytest.raises(TypeError, match="or an nn.Module whose state_dict"):
        load_beit_state_dict(model, "beit_base_patch16_224")


def test_beit_base_layout_maps_every_block():
    beit = timm.create_model("beit_base_patch16_224", pretrained=False)
    with torch.no_grad():
        for p in beit.parameters():
            p.normal_()
    with torch.device("meta"):
        model = VLMo.from_preset("base")
    model = model.to_empty(device="cpu")
    result = load_beit_state_dict(model, beit.state_dict())
    assert result.missing_keys == []
    assert {k for k in result.unexpected_keys if "relative_position_index" not in k} <= \
        {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    for i in range(12):
        for ours, theirs in [(model.blocks[i].attn.qkv.weight, beit.blocks[i].attn.qkv.weight),
                             (model.blocks[i].gamma_2, beit.blocks[i].gamma_2),
                             (model.blocks[i].mlp.norm_weight[0], beit.blocks[i].norm2.weight),
                             (model.blocks[i].mlp.fc2_bias[0], beit.blocks[i].mlp.fc2.bias),
                             (model.rel_pos_bias.relative_position_bias_table[:732, i * 12:(i + 1) * 12],
                              beit.blocks[i].attn.relative_position_bias_table)]:
            assert torch.equal(ours, theirs)
    torch.testing.assert_close(model.blocks[5].mlp.fc1_weight[0], beit.blocks[5].mlp.fc1.weight.T)


@pytest.mark.parametrize("text_len", [2, 40])
def test_relative_index_matches_the_reference_at_base_size(text_len):
    from vlmo_fast import RelativePositionBias
    c = VLMoConfig.preset("base")
    rel = RelativePositionBias(c.grid_size, c.text_relpos_len, c.num_heads, c.depth)
    ours = rel.index(*rel.layout(text_len, c.num_image_tokens))
    assert torch.equal(ours, _ref_rel_index(c, text_len))
    assert int(ours.max()) < rel.num_distances


# --- our own format: save_pretrained / from_pretrained ------------------------------------------
def _tiny(**overrides):
    torch.manual_seed(1)
    return VLMo(VLMoConfig.preset("tiny", **overrides))


def test_from_pretrained_follows_hf_conventions(tmp_path):
    model = _tiny(num_classes=3)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "manifest.json",
                                                                     "model.safetensors"]
    loaded = VLMo.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training and all(not m.training for m in loaded.modules())  # eval mode
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # config overrides as keyword arguments; backend arguments still go to the model
    loaded = VLMo.from_pretrained(tmp_path / "ckpt", drop_path_rate=0.0, ffn_backend="reference")
    assert loaded.config.drop_path_rate == 0.0 and loaded.config.num_classes == 3
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['dropout'\]"):
        VLMo.from_pretrained(tmp_path / "ckpt", dropout=0.0)
    with pytest.raises(TypeError, match="VLMoConfig.drop_path_rate must be a float"):
        VLMo.from_pretrained(tmp_path / "ckpt", drop_path_rate="0")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)model.safetensors does not fit.*with overrides "
                                                      r"\{'num_classes': 4\}.*classifier.fc2.weight"):
        VLMo.from_pretrained(tmp_path / "ckpt", num_classes=4)


def test_dtypes_round_trip_and_torch_dtype_casts(tmp_path):
    model = _tiny().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = VLMo.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    as_fp32 = VLMo.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.norm.weight, model.norm.weight.float())
    assert VLMo.from_pretrained(tmp_path / "bf16", torch_dtype="float16").norm.weight.dtype == torch.float16
    mixed = _tiny()
    mixed.itc.logit_scale.data = mixed.itc.logit_scale.data.double()  # kept per tensor with "auto"
    mixed.save_pretrained(tmp_path / "mixed")
    loaded = VLMo.from_pretrained(tmp_path / "mixed")
    assert loaded.itc.logit_scale.dtype == torch.float64 and loaded.norm.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="torch_dtype must be 'auto' or a floating torch.dtype"):
        VLMo.from_pretrained(tmp_path / "bf16", torch_dtype=torch.int8)


def test_paths_that_look_like_json_and_bad_paths(tmp_path):
    model = _tiny()
    odd = tmp_path / "{exp}"
    model.save_pretrained(odd)
    assert VLMo.from_pretrained(str(odd)).config == model.config
    with pytest.raises(FileNotFoundError, match="does not exist: expected a checkpoint directory"):
        VLMo.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        VLMo.from_pretrained(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        model.save_pretrained(tmp_path / "file")
    with pytest.raises(TypeError, match="directory must be a path"):
        VLMo.from_pretrained(None)


def test_save_keeps_other_files_and_follows_the_umask(tmp_path):
    import os
    import stat
    d = tmp_path / "ckpt"
    _tiny().save_pretrained(d)
    (d / "tokenizer.json").write_text("{}")
    (d / "logs").mkdir()
    (d / "logs" / "train.jsonl").write_text("{}\n")
    old = os.umask(0o027)
    try:
        _tiny(num_classes=2).save_pretrained(d)
    finally:
        os.umask(old)
    assert (d / "tokenizer.json").read_text() == "{}" and (d / "logs" / "train.jsonl").is_file()
    assert VLMo.from_pretrained(d).config.num_classes == 2
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    for name in ("config.json", "model.safetensors", "manifest.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o640, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries beside it


def test_checkpoints_without_manifest_load_with_a_warning(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="has no manifest.json"):
        loaded = VLMo.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.norm.weight, model.norm.weight)


def test_from_pretrained_without_text_positions_parameter(tmp_path):
    """Checkpoints written before/after the unused text positions were removed load both ways."""
    with_positions = _tiny()
    without = _drop_text_positions(_tiny())
    without.save_pretrained(tmp_path / "without")
    loaded = VLMo.from_pretrained(tmp_path / "without")
    for k, v in without.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with_positions.save_pretrained(tmp_path / "with")
    VLMo.from_pretrained(tmp_path / "with")


# -- ablation models (config.vl_expert=False, config.attention="per_modality") -----------------
@pytest.mark.parametrize("overrides", [{"attention": "per_modality"}, {"vl_expert": False},
                                       {"attention": "per_modality", "vl_expert": False}])
def test_ablation_models_round_trip_through_save_pretrained(tmp_path, overrides):
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", drop_path_rate=0.0, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = VLMo.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".attn_text." in k for k in a) == (overrides.get("attention") == "per_modality")
    images = torch.randn(2, 3, 32, 32)
    text_ids = torch.randint(5, 100, (2, 7))
    torch.testing.assert_close(loaded.encode_pair(text_ids, images).pooled, model.encode_pair(text_ids, images).pooled,
                               rtol=0, atol=0)
    # a checkpoint of the other attention layout does not load into this config
    if overrides.get("attention") == "per_modality":
        with pytest.raises(CheckpointMismatchError, match="attn_text"):
            VLMo.from_pretrained(tmp_path / "ckpt", attention="shared")


def test_reference_layout_refuses_what_the_reference_cannot_compute():
    torch.manual_seed(0)
    per_modality = VLMo.from_preset("tiny", attention="per_modality")
    no_vl = VLMo.from_preset("tiny", vl_expert=False)
    plain = VLMo.from_preset("tiny")
    for model in (per_modality, no_vl):
        field = "attention='per_modality'" if model is per_modality else "vl_expert=False"
        with pytest.raises(CheckpointMismatchError, match=f"cannot export a reference VLMo state_dict: the model "
                                                          f"has {field}"):
            export_reference_state_dict(model)
    reference = export_reference_state_dict(plain)
    with pytest.raises(CheckpointMismatchError, match="cannot load a reference VLMo state_dict: the model has "
                                                      "attention='per_modality'"):
        load_reference_state_dict(per_modality, reference)
    # without the VL expert every reference weight but the itc_vl head's (it has none) has its
    # place, VL expert included: only the routing differs
    with pytest.raises(CheckpointMismatchError, match="unexpected .3.: itc_vl_image_proj"):
        load_reference_state_dict(no_vl, reference)
    result = load_reference_state_dict(no_vl, reference, strict=False)
    assert sorted(result.unexpected_keys) == ["itc_vl_image_proj.fc.weight", "itc_vl_text_proj.fc.weight",
                                              "logit_vl_scale"] and not result.missing_keys
    ours = no_vl.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in plain.state_dict().items() if not k.startswith("itc_vl."))
