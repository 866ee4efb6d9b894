"""timm model names for VLMo's vision tower: created by name after `import vlmo_fast`,
loaded from vlmo_fast / reference checkpoints, equal to VLMo.encode_image, with timm's head,
feature and checkpointing conventions."""
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from vlmo_fast import VLMo  # noqa: E402
from vlmo_fast.checkpoint import CheckpointMismatchError, export_reference_state_dict  # noqa: E402
from vlmo_fast.timm_models import (VLMoVisionTower, load_vlmo_weights, tower_kwargs,  # noqa: E402
                                   vision_tower_from_pretrained)

CONFIGS = {"relative": dict(), "absolute": dict(relative_position=False, layer_scale_init=None)}


def make_model(kind: str) -> VLMo:
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", drop_path_rate=0.0, **CONFIGS[kind])
    with torch.no_grad():   # away from init values, so that every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def images(model: VLMo, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.rand(batch, 3, model.config.img_size, model.config.img_size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    for kind in CONFIGS:
        make_model(kind).save_pretrained(root / kind)
    return root


def create(saved, kind: str, name: str = "vlmo_tiny_patch16_32", **kwargs):
    extra = dict(relative_position=False, layer_scale=False) if kind == "absolute" else {}
    return timm.create_model(name, pretrained=True, **extra, **kwargs,
                             pretrained_cfg_overlay=dict(file=str(saved / kind / "model.safetensors"))).eval()


def test_names_are_registered_when_timm_is_imported():
    code = ("import sys, vlmo_fast; assert 'timm' not in sys.modules; import timm; "
            "print(' '.join(timm.list_models('vlmo_*')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(out.stdout.split()) == {"vlmo_tiny_patch16_32", "vlmo_base_patch16_224", "vlmo_base_patch16_384",
                                       "vlmo_large_patch16_224", "vlmo_base_plus_patch16_224"}


def test_named_variants_have_the_presets_sizes():
    for name, preset in (("vlmo_base_plus_patch16_224", "base_plus"), ("vlmo_tiny_patch16_32", "tiny")):
        with torch.device("meta"):   # sizes only, no memory
            tower = timm.create_model(name)
        config = VLMo.from_preset(preset, drop_path_rate=0.0).config if preset == "tiny" else None
        if preset == "base_plus":
            assert len(tower.blocks) == 24 and tower.embed_dim == 544 and tower.pos_embed is not None
            assert tower.blocks[0].gamma_1 is None and tower.rel_pos_bias is None   # no layer scale
        else:
            assert tower.patch_embed.img_size == config.img_size and tower.blocks[0].gamma_1 is not None


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tower_equals_encode_image(saved, kind):
    model = make_model(kind)
    tower = create(saved, kind)
    assert isinstance(tower, VLMoVisionTower) and tower.num_classes == 0
    x = images(model)
    with torch.no_grad():
        want = model.encode_image(x)
        torch.testing.assert_close(tower(x), want.features, atol=1e-6, rtol=0)
        torch.testing.assert_close(tower.forward_features(x), want.hidden, atol=1e-6, rtol=0)
        torch.testing.assert_close(tower.forward_head(tower.forward_features(x), pre_logits=True),
                                   want.features, atol=1e-6, rtol=0)


def test_reference_checkpoint_and_folder_load_the_same(saved, tmp_path):
    model = make_model("relative")
    torch.save({"state_dict": export_reference_state_dict(model)}, tmp_path / "vlmo_ref.ckpt")
    from_ref = timm.create_model("vlmo_tiny_patch16_32", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "vlmo_ref.ckpt"))).eval()
    from_folder = vision_tower_from_pretrained(saved / "relative").eval()
    x = images(model)
    with torch.no_grad():
        want = model.encode_image(x).features
        torch.testing.assert_close(from_ref(x), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_folder(x), want, atol=1e-6, rtol=0)
    # the tower's own state_dict round-trips through load_vlmo_weights
    fresh = timm.create_model("vlmo_tiny_patch16_32").eval()
    load_vlmo_weights(fresh, from_folder.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), from_folder(x))


def test_ablation_checkpoint_loads_the_vision_attention_only():
    """A per-modality-attention model (no VL expert) has blocks.*.attn_text.* beside attn:
    images use `attn` only, so the tower loads strictly without them and equals encode_image."""
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", drop_path_rate=0.0, attention="per_modality", vl_expert=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    state = model.state_dict()
    assert any(".attn_text." in k for k in state)
    tower = timm.create_model("vlmo_tiny_patch16_32").eval()
    result = load_vlmo_weights(tower, state)   # strict: nothing missing, nothing unexpected
    assert result.unexpected_keys == [] and not any("attn_text" in k for k in tower.state_dict())
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), model.encode_image(x).features, atol=1e-6, rtol=0)


def test_features_only_gives_the_block_outputs(saved):
    model = make_model("relative")
    feats = create(saved, "relative", features_only=True, out_indices=(1, 3))
    assert feats.feature_info.channels() == [64, 64] and feats.feature_info.reduction() == [16, 16]
    x = images(model)
    with torch.no_grad():
        maps = feats(x)
        tower = create(saved, "relative")
        last, inter = tower.forward_intermediates(x, indices=[3], norm=True)
        hidden = model.encode_image(x).hidden
    assert [tuple(m.shape) for m in maps] == [(3, 64, 2, 2), (3, 64, 2, 2)]
    # the last block's map through the final norm is encode_image's patch tokens
    torch.testing.assert_close(inter[0].flatten(2).transpose(1, 2), hidden[:, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(last, hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(maps[1], tower.forward_intermediates(x, indices=[3], intermediates_only=True)[0])


def test_classifier_head_and_training_conventions(saved):
    model = make_model("relative")
    tower = create(saved, "relative", num_classes=5)   # the head is new, everything else loaded
    x = images(model)
    with torch.no_grad():
        assert tower(x).shape == (3, 5)
        torch.testing.assert_close(tower.forward_head(tower.forward_features(x), pre_logits=True),
                                   model.encode_image(x).features, atol=1e-6, rtol=0)
    tower.reset_classifier(7)
    assert tower.get_classifier().out_features == 7
    tower.reset_classifier(0)
    assert isinstance(tower.get_classifier(), torch.nn.Identity)
    # fine-tuning: every parameter gets a gradient (the tower keeps only the vision expert)
    tower.reset_classifier(4)
    tower.train()
    tower(x).sum().backward()
    assert [n for n, p in tower.named_parameters() if p.grad is None] == []
    assert {"cls_token", "type_embed", "blocks.0.mlp.fc1_bias"} <= tower.no_weight_decay()
    # activation checkpointing changes no value
    tower.eval()
    with torch.no_grad():
        before = tower(x)
    tower.set_grad_checkpointing(True)
    torch.testing.assert_close(tower(x), before)


def test_a_checkpoint_of_other_sizes_is_refused(saved, tmp_path):
    with pytest.raises(CheckpointMismatchError, match="depth 4 .model 6.*dim 64 .model 96"):
        create(saved, "relative", depth=6, embed_dim=96, num_heads=4)
    with pytest.raises(CheckpointMismatchError, match="another img_size"):
        create(saved, "relative", img_size=80)   # a 5x5 grid needs more rows than the 2x2 table has
    with pytest.raises(CheckpointMismatchError, match="relative positions"):
        create(saved, "relative", relative_position=False)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="not a VLMo checkpoint"):
        timm.create_model("vlmo_tiny_patch16_32", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "other.pt")))
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("vlmo_tiny_patch16_32", pretrained=True)   # nothing is downloaded
    with pytest.raises(ValueError, match="global_pool"):
        VLMoVisionTower(**tower_kwargs(make_model("relative").config), global_pool="max")
