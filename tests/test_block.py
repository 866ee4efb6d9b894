"""MoMEBlock: routing, padding, gradients, drop path and input errors."""
import pytest
import torch

from vlmo_fast import MoMEBlock, MoMEFeedForward


def make_block(num_experts=3, dim=48, heads=4, **kw):
    torch.manual_seed(1)
    blk = MoMEBlock(dim, heads, num_experts=num_experts, **kw).eval()
    with torch.no_grad():  # non-trivial LN params and biases so every expert differs
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return blk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_token_gets_its_own_expert(seed):
    g = torch.Generator().manual_seed(seed)
    blk = make_block()
    x = torch.randn(3, 11, 48, generator=g)
    ids = torch.randint(0, 3, (3, 11), generator=g)
    out = blk(x, ids)
    # Attention is shared and routing-independent: running every token through expert e
    # must reproduce exactly the tokens that the mixed routing sent to e.
    for e in range(3):
        alone = blk(x, torch.full_like(ids, e))
        sel = ids == e
        torch.testing.assert_close(out[sel], alone[sel], rtol=1e-5, atol=1e-6)


def test_ffn_matches_single_expert_formula():
    ffn = MoMEFeedForward(32, 80, 3)
    with torch.no_grad():
        for p in ffn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 9, 32)
    ids = torch.randint(0, 3, (2, 9))
    gamma = torch.rand(32)
    out = ffn(x, ids, gamma=gamma)
    for b in range(2):
        for t in range(9):
            e = int(ids[b, t])
            expect = x[b, t] + gamma * ffn.expert_forward(x[b, t:t + 1], e)[0]
            torch.testing.assert_close(out[b, t], expect, rtol=1e-5, atol=1e-6)


def test_padded_keys_change_nothing_for_other_tokens():
    blk = make_block()
    x = torch.randn(2, 10, 48)
    ids = torch.randint(0, 3, (2, 10))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 7:] = True
    pad[1, 4:] = True
    out1 = blk(x, ids, key_padding_mask=pad)
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), 48) * 5
    out2 = blk(x2, ids, key_padding_mask=pad)
    torch.testing.assert_close(out1[~pad], out2[~pad], rtol=1e-5, atol=1e-6)
    # and without the mask the padded values do leak in (the test can fail)
    out3 = blk(x2, ids)
    assert not torch.allclose(out1[~pad], out3[~pad], atol=1e-4)


def test_gradients_reach_exactly_the_used_experts():
    blk = make_block()
    x = torch.randn(2, 8, 48, requires_grad=True)
    ids = torch.randint(0, 2, (2, 8)) * 2  # experts 0 and 2 only
    ids[0, 0], ids[0, 1] = 0, 2
    blk(x, ids).square().sum().backward()
    mlp = blk.mlp
    for name in ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        grad = getattr(mlp, name).grad
        assert torch.count_nonzero(grad[1]) == 0, f"{name}: unused expert got a gradient"
        assert torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[2]) > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_attention_bias_is_added():
    blk = make_block()
    x = torch.randn(2, 6, 48)
    ids = torch.zeros(2, 6, dtype=torch.long)
    bias = torch.randn(4, 6, 6)
    assert not torch.allclose(blk(x, ids, attn_bias=bias), blk(x, ids))
    torch.testing.assert_close(blk(x, ids, attn_bias=bias), blk(x, ids, attn_bias=bias[None].expand(2, -1, -1, -1)))


def test_drop_path_in_training_drops_whole_samples():
    blk = make_block(drop_path=0.5, layer_scale_init=0.1).train()
    x = torch.randn(64, 5, 48)
    ids = torch.randint(0, 3, (64, 5))
    torch.manual_seed(3)
    out = blk(x, ids)
    unchanged = (out - x).abs().amax(dim=(1, 2)) == 0
    # with p = 0.5 per branch, about a quarter of the samples skip both branches
    assert 0 < int(unchanged.sum()) < 64
    blk.eval()
    assert not torch.equal(blk(x, ids), x)


def test_layer_scale_optional():
    blk = MoMEBlock(32, 4, num_experts=2, layer_scale_init=None)
    assert blk.gamma_1 is None and blk.gamma_2 is None
    out = blk(torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.long))
    assert out.shape == (1, 3, 32)


@pytest.mark.parametrize("case,exc,match", [
    ("id_out_of_range", ValueError, r"modality_ids must be in \[0, 1\]"),
    ("id_negative", ValueError, r"modality_ids must be in"),
    ("id_float", TypeError, "integer tensor"),
    ("id_shape", ValueError, r"modality_ids must be a tensor of shape"),
    ("hidden", ValueError, "hidden size 40 but the block was built with dim=48"),
    ("dtype", TypeError, "torch.bfloat16"),
    ("device", TypeError, "on meta"),
    ("rank", ValueError, "3-D tensor"),
    ("mask_shape", ValueError, "key_padding_mask must have shape"),
    ("mask_dtype", TypeError, "bool"),
    ("bias_shape", ValueError, "attn_bias must have shape"),
])
def test_bad_inputs_raise_clear_errors(case, exc, match):
    blk = make_block(num_experts=2)
    x = torch.randn(2, 5, 48)
    ids = torch.zeros(2, 5, dtype=torch.long)
    kwargs = {}
    if case == "id_out_of_range":
        ids[1, 3] = 2
    elif case == "id_negative":
        ids[0, 0] = -1
    elif case == "id_float":
        ids = ids.float()
    elif case == "id_shape":
        ids = ids[:, :4]
    elif case == "hidden":
        x = torch.randn(2, 5, 40)
    elif case == "dtype":
        x = x.bfloat16()
    elif case == "device":
        x = x.to("meta")
    elif case == "rank":
        x = x[0]
    elif case == "mask_shape":
        kwargs["key_padding_mask"] = torch.zeros(2, 4, dtype=torch.bool)
    elif case == "mask_dtype":
        kwargs["key_padding_mask"] = torch.zeros(2, 5)
    elif case == "bias_shape":
        kwargs["attn_bias"] = torch.zeros(3, 5, 5)
    with pytest.raises(exc, match=match):
        blk(x, ids, **kwargs)


def test_repr_names_the_backend():
    text = repr(make_block())
    assert "backend=" in text and "num_experts=3" in text


def test_unrouted_token_raises_even_without_validation():
    """validate=False skips the up-front id check; the reference must still not silently
    leave a token without its FFN."""
    from vlmo_fast.mome import mome_ffn
    ffn = MoMEFeedForward(16, 32, 2)
    x = torch.randn(5, 16)
    ids = torch.tensor([0, 1, -1, 1, 0])
    args = (ffn.norm_weight, ffn.norm_bias, ffn.fc1_weight, ffn.fc1_bias, ffn.fc2_weight, ffn.fc2_bias)
    for backend in ("reference", "grouped_mm"):
        with pytest.raises(RuntimeError, match=r"every id must be in \[0, 1\]"):
            mome_ffn(x, ids, *args, backend=backend, validate=False)
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        MoMEFeedForward(16, 0, 2)


# -- per-modality attention (VLMo's Table 7 ablation) ------------------------------------------
def _grad_norms(module):
    return {n: p.grad.abs().sum().item() for n, p in module.named_parameters() if p.grad is not None}


def test_per_modality_block_projects_each_token_with_its_modalitys_attention():
    blk = make_block(attention="per_modality")
    assert blk.attention == "per_modality" and "attention=per_modality" in repr(blk)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=g)
    types = torch.tensor([[1] * 4 + [0] * 5, [1] * 6 + [0] * 3])   # [text ; image] per row
    ids = torch.full_like(types, 2)                                 # VL-expert tokens: types say which attention

    # a shared block whose attention is one of the two copies: the per-modality block agrees
    # with it wherever every token is of that copy's modality
    for modality, copy in ((0, blk.attn), (1, blk.attn_text)):
        shared = make_block()
        shared.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("attn_text.")})
        shared.attn.load_state_dict(copy.state_dict())
        same = torch.full_like(types, modality)
        torch.testing.assert_close(blk(x, ids, token_modality=same), shared(x, ids), rtol=0, atol=0)

    # mixed: gradients land only in the copy of the tokens that used it
    for types_, used, unused in ((torch.zeros_like(types), "attn.", "attn_text."),
                                 (torch.ones_like(types), "attn_text.", "attn."), (types, None, None)):
        blk.zero_grad(set_to_none=True)
        blk(x, ids, token_modality=types_).square().sum().backward()
        norms = _grad_norms(blk)
        if used is None:
            assert all(norms[n] > 0 for n in norms if n.startswith(("attn.", "attn_text.")))
        else:
            assert all(norms[n] == 0 for n in norms if n.startswith(unused)), norms
            assert all(norms[n] > 0 for n in norms if n.startswith(used))


def test_per_modality_block_with_equal_copies_is_the_shared_block():
    blk = make_block(attention="per_modality")
    blk.attn_text.load_state_dict(blk.attn.state_dict())
    shared = make_block()
    shared.load_state_dict({k: v for k, v in blk.state_dict().items() if not k.startswith("attn_text.")})
    x = torch.randn(3, 10, 48)
    ids = torch.randint(0, 3, (3, 10))
    types = torch.randint(0, 2, (3, 10))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[1, 7:] = True
    torch.testing.assert_close(blk(x, ids, key_padding_mask=mask, token_modality=types),
                               shared(x, ids, key_padding_mask=mask), rtol=0, atol=0)
    # the shared block checks token_modality's shape and is otherwise unaffected by it
    torch.testing.assert_close(shared(x, ids, token_modality=types), shared(x, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="token_modality must be a tensor of shape"):
        shared(x, ids, token_modality=types[:, :4])


def test_per_modality_block_needs_a_modality_for_every_token():
    blk = make_block(attention="per_modality")
    x = torch.randn(2, 5, 48)
    ids = torch.tensor([[0, 0, 1, 2, 2], [1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="vision-language tokens .id 2. must pass token_modality"):
        blk(x, ids)
    blk(x, ids.clamp(max=1))            # modality_ids 0/1 serve as the modality
    with pytest.raises(ValueError, match=r"0 \(vision\) or 1 \(language\), in token_modality"):
        blk(x, ids, token_modality=ids)
    with pytest.raises(TypeError, match="token_modality must be an integer tensor"):
        blk(x, ids, token_modality=ids.float())
    with pytest.raises(ValueError, match="attention must be one of"):
        MoMEBlock(48, 4, attention="dense")
    names = blk.no_weight_decay()
    assert {"attn_text.q_bias", "attn_text.v_bias", "attn_text.proj.bias"} <= names
