"""vlmo_fast.training in one process: stage layouts and frozen sets, the step module's
objectives (packed == padded), cached ITC == one big batch, ablations, parameter groups,
the schedule, checkpoint pruning and the CLI's up-front argument checks."""
import json

import pytest
from pathlib import Path
import torch

from vlmo_fast.config import VLMoConfig
from vlmo_fast.model import VLMo
from vlmo_fast.mome import LANGUAGE, VISION, VISION_LANGUAGE
from vlmo_fast.training.optim import lr_lambda, param_groups
from vlmo_fast.training.stages import (SharedFeedForward, SplitExpertFeedForward, export_state_dict,
                                       prepare_stage)
from vlmo_fast.training.step import PretrainStep, cached_itc_accumulation, masked_positions

VOCAB = 120


def tiny_model(**overrides):
    cfg = VLMoConfig.preset("tiny", vocab_size=VOCAB, **overrides)
    return VLMo(cfg)


def vl_batch(b=6, length=16, seed=0, img=32):
    """A batch in the shape of the data contract (stage vl), with real padding and
    two captions of one image (image_ids 0 twice)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    lengths = torch.randint(5, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.full((b, length), -100)
    chosen = (torch.rand(b, length, generator=g) < 0.3) & mask.bool()
    chosen[:, 1] = True
    labels[chosen] = ids[chosen]
    mlm_ids = torch.where(chosen, torch.full_like(ids, 4), ids)
    image_ids = torch.arange(b)
    image_ids[1] = image_ids[0]
    return {"images": torch.rand(b, 3, img, img, generator=g) * 2 - 1, "text_ids": ids, "text_mask": mask,
            "mlm_ids": mlm_ids, "mlm_labels": labels, "image_ids": image_ids}


# ----------------------------------------------------------------------------- stage layouts

@pytest.mark.parametrize("ffn", ["mome", "shared"])
def test_stage_layouts_export_back_to_plain_vlmo(ffn):
    model = tiny_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for stage in ("vision", "text", "vl"):
        prepare_stage(model, stage, ffn)
        exported = export_state_dict(model)
        assert set(exported) == set(original)
        for k, v in exported.items():
            if ffn == "shared" and ".mlp." in k:
                # every expert slot holds the shared FFN = the vision expert
                assert torch.equal(v, original[k][VISION:VISION + 1].expand_as(v)), k
            else:
                assert torch.equal(v, original[k]), k
        plain = VLMo(model.config)
        plain.load_state_dict(exported, strict=True)


def test_stage_trainable_sets_follow_the_reference():
    model = tiny_model()
    prepare_stage(model, "text")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for blk in model.blocks:
        assert isinstance(blk.mlp, SplitExpertFeedForward)
        assert [all(p.requires_grad for p in e.parameters()) for e in blk.mlp.experts][:2] == [False, True]
        if blk.mlp.num_experts == 3:
            assert not any(p.requires_grad for p in blk.mlp.experts[VISION_LANGUAGE].parameters())
    assert any(n.startswith("text_embeddings.") for n in trainable)
    assert "token_type_embeddings.weight" in trainable and "rel_pos_bias.relative_position_bias_table" in trainable
    assert "norm.weight" in trainable and any(n.startswith("mlm_head.") for n in trainable)
    for frozen in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.norm1.weight",
                   "blocks.0.gamma_1", "blocks.0.gamma_2", "itc.logit_scale", "itm_head.weight"):
        assert frozen not in trainable, frozen

    prepare_stage(model, "vision")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.weight" in trainable and "cls_token" in trainable
    assert "blocks.0.mlp.experts.0.fc1_weight" in trainable
    assert "blocks.0.mlp.experts.1.fc1_weight" not in trainable
    assert not any(n.startswith(("text_embeddings.", "mlm_head.", "itc.", "token_type")) for n in trainable)

    prepare_stage(model, "vl")
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(blk.mlp).__name__ == "MoMEFeedForward" for blk in model.blocks)


def test_text_stage_step_leaves_frozen_parameters_bitwise_unchanged():
    """One optimizer step of the text stage with weight decay: AdamW moves only the trainable
    set (a stacked bank would have decayed the frozen vision slice)."""
    model = tiny_model(drop_path_rate=0.0)
    prepare_stage(model, "text")
    step = PretrainStep(model, "text")
    before = {n: p.detach().clone() for n, p in step.named_parameters()}
    opt = torch.optim.AdamW(param_groups(step, 0.1), lr=1e-2)
    batch = vl_batch()
    for _ in range(2):
        out = step(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for n, p in step.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, before[n]), n
    changed = [n for n, p in step.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("experts.1." in n for n in changed) and any(n.startswith("model.text_embeddings") for n in changed)


# ----------------------------------------------------------------------------- objectives

@pytest.mark.parametrize("stage", ["text", "vl"])
def test_packed_layout_equals_padded_layout(stage):
    torch.manual_seed(1)
    model = tiny_model(drop_path_rate=0.0).eval()
    prepare_stage(model, stage)
    batch = vl_batch(seed=3)
    results = {}
    for layout in ("packed", "padded"):
        gen = torch.Generator().manual_seed(11)
        step = PretrainStep(model, stage, layout=layout, generator=gen)
        out = step(batch)
        model.zero_grad()
        out["loss"].backward()
        results[layout] = ({k: float(v) for k, v in out["metrics"].items()},
                           {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (mp, gp), (md, gd) = results["packed"], results["padded"]
    assert mp.keys() == md.keys()
    for k in mp:
        assert mp[k] == pytest.approx(md[k], rel=1e-4, abs=1e-5), k
    assert gp.keys() == gd.keys()
    for n in gp:
        torch.testing.assert_close(gp[n], gd[n], rtol=1e-3, atol=1e-5, msg=n)


def test_vision_stage_mim_only_counts_masked_patches():
    model = tiny_model(drop_path_rate=0.0, img_size=64)
    prepare_stage(model, "vision")
    step = PretrainStep(model, "vision")
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :6] = True
    out = step({"images": images, "patch_mask": mask})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert step.mim_head.mask_token.grad.abs().sum() > 0
    # changing an UNMASKED patch's target pixels alone (same model input is impossible, so
    # check through the weighting): a mask of zeros gives a zero loss
    out0 = step({"images": images, "patch_mask": torch.zeros_like(mask)})
    assert float(out0["loss"].detach()) == 0.0


@pytest.mark.parametrize("hard", ["global", "local", "none"])
@pytest.mark.parametrize("ffn", ["mome", "shared"])
def test_ablations_run_a_step(hard, ffn):
    model = tiny_model()
    prepare_stage(model, "vl", ffn)
    step = PretrainStep(model, "vl", hard_negatives=hard, generator=torch.Generator().manual_seed(0))
    out = step(vl_batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for k in ("itc", "itc_vl", "itm", "mlm", "itm_acc"):
        assert torch.isfinite(out["metrics"][k]), k
    if ffn == "shared":
        assert all(isinstance(b.mlp, SharedFeedForward) for b in model.blocks)
        assert model.blocks[0].mlp.ffn.fc1_weight.grad.abs().sum() > 0


def test_negatives_never_show_the_same_image():
    """Rows 0 and 1 are two captions of one image: neither is ever the other's negative."""
    model = tiny_model()
    prepare_stage(model, "vl")
    step = PretrainStep(model, "vl", generator=torch.Generator().manual_seed(0))
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ids = torch.tensor([0, 0, 2, 3, 4, 5])
    for _ in range(20):
        neg_txt, neg_img = step._sample_negatives(img, img.clone(), ids, ids, 6, 1, 0)
        assert (ids[neg_txt] != ids).all() and (ids[neg_img] != ids).all()


def test_cached_itc_gradients_equal_one_big_batch():
    torch.manual_seed(0)
    model = tiny_model(drop_path_rate=0.0)
    prepare_stage(model, "vl")
    weights = {"itc": 1.0, "itm": 0.0, "mlm": 0.0}
    step = PretrainStep(model, "vl", loss_weights=weights, generator=torch.Generator().manual_seed(0))
    big = vl_batch(b=8, seed=5)
    out = step(big)
    out["loss"].backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    itc_big = float(out["metrics"]["itc"])
    model.zero_grad()

    micro = [{k: v[i:i + 4] for k, v in big.items()} for i in (0, 4)]
    outs, metrics = cached_itc_accumulation(step, lambda loss: (loss / 2).backward(), micro)
    assert float(metrics["itc"]) == pytest.approx(itc_big, rel=1e-5)
    cached = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert reference.keys() == cached.keys()
    for n in reference:
        torch.testing.assert_close(cached[n], reference[n], rtol=1e-4, atol=1e-6, msg=n)
    # and NOT what two independent micro-batch ITC losses give
    model.zero_grad()
    for mb in micro:
        (step(mb)["loss"] / 2).backward()
    assert not torch.allclose(model.itc.image_proj.weight.grad, reference["itc.image_proj.weight"], atol=1e-6)


def test_masked_positions_cpu():
    labels = torch.full((3, 5), -100)
    labels[0, 1], labels[2, 4] = 7, 9
    idx, picked = masked_positions(labels)
    assert idx.tolist() == [[0, 1], [2, 4]] and picked.tolist() == [7, 9]
    # the accelerator path (fixed-size, no host sync): same targets, filler rows labelled -100
    idx_s, picked_s = masked_positions(labels, 0.15, static=True)
    real = picked_s != -100
    assert idx_s[real].tolist() == [[0, 1], [2, 4]] and picked_s[real].tolist() == [7, 9]
    assert idx_s.shape[0] >= 2 and (idx_s >= 0).all()


# ----------------------------------------------------------------------------- optimizer

def test_param_groups_exclude_biases_norms_scales_table():
    model = tiny_model()
    prepare_stage(model, "vision")
    step = PretrainStep(model, "vision")
    groups = param_groups(step, 0.05)
    names = {id(p): n for n, p in step.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"model.blocks.0.attn.qkv.weight", "model.blocks.0.mlp.experts.0.fc1_weight",
            "mim_head.decoder.weight"} <= decay
    assert {"model.cls_token", "model.blocks.0.gamma_1", "model.blocks.0.norm1.weight",
            "model.rel_pos_bias.relative_position_bias_table", "mim_head.mask_token",
            "model.blocks.0.mlp.experts.0.norm_weight", "model.blocks.0.attn.q_bias"} <= no_decay
    frozen = {n for n, p in step.named_parameters() if not p.requires_grad}
    assert not frozen & (decay | no_decay)


def test_schedule_warmup_then_decay():
    f = lr_lambda(100, 10, "linear")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    g = lr_lambda(100, 0, "cosine", min_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.55) and g(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(10, 1, "step")


# ----------------------------------------------------------------------------- checkpoints, CLI

def test_prune_keeps_last_k_of_its_lineage_and_never_newer(tmp_path):
    """Pruning deletes only this lineage's checkpoints older than the one just written (beyond
    keep-last-K, and its older interrupted saves); a newer folder (a killed run's save) and
    another run's checkpoints stay. Before: every folder newer than `latest` was deleted."""
    import json
    from vlmo_fast.training.checkpoint import latest_tag, prune

    def make(step, lineage, complete=True):
        d = tmp_path / f"step_{step:06d}"
        d.mkdir()
        (d / "checkpoint.json").write_text(json.dumps({"format": "vlmo_fast.training_checkpoint", "version": 1,
                                                       "step": step, "lineage": lineage}))
        if complete:
            (d / "manifest.json").write_text("{}")
    for s in (2, 4, 6):
        make(s, "mine")
    make(3, "mine", complete=False)
    make(8, "mine", complete=False)
    make(1, "other")
    (tmp_path / "latest").write_text("step_000006\n")
    assert prune(tmp_path, "step_000006", keep_last=2, lineage="mine") == ["step_000002", "step_000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_000001", "step_000004",
                                                                       "step_000006", "step_000008"]
    assert latest_tag(tmp_path) == "step_000006"
    (tmp_path / "latest").write_text("step_000002\n")
    with pytest.raises(RuntimeError, match="not a checkpoint folder"):
        latest_tag(tmp_path)


def _args(*extra):
    from vlmo_fast.training.pretrain import build_parser
    return build_parser().parse_args(["--output-dir", "/tmp/unused", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--stage", "text"], "needs vision weights"),
    (["--stage", "vl"], "needs the previous stages"),
    (["--itc-accum", "cached"], "grad-accum >= 2"),
    (["--data", "/nonexistent/data.json"], "no such file"),
    (["--init", "/nonexistent"], "no such file"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--loss-weights", "itc=1,foo=2"], "unknown objective"),
    (["--stage", "vision", "--init-beit", __file__], "replaces the vision stage"),
])
def test_bad_arguments_fail_before_any_work(extra, message):
    from vlmo_fast.training.pretrain import validate_args
    with pytest.raises(ValueError, match=message):
        validate_args(_args(*extra))


@pytest.mark.parametrize("config, message", [
    ({"optimizer": {"type": "Adam"}}, "not accepted"),
    ({"zero_optimization": {"stage": 5}}, "stage must be"),
    ({"train_micro_batch_size_per_gpu": 3}, "disagrees"),
    ({"zero_optimisation": {"stage": 2}}, "unknown key"),
])
def test_bad_deepspeed_config_fails_before_any_work(tmp_path, config, message):
    from vlmo_fast.training.pretrain import validate_args
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        validate_args(_args("--deepspeed_config", str(path), "--batch-size", "4"))


def test_shipped_configs_are_accepted():
    from pathlib import Path
    from vlmo_fast.training.engine import build_ds_config, load_ds_config
    root = Path(__file__).resolve().parents[1] / "train" / "configs"
    stages = {}
    for name in ("zero1", "zero2", "zero3", "cpu"):
        cfg = build_ds_config(load_ds_config(root / f"{name}.json"), micro_batch=4, grad_accum=2,
                              clip=1.0, bf16=False)
        stages[name] = cfg["zero_optimization"]["stage"]
        assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert stages == {"zero1": 1, "zero2": 2, "zero3": 3, "cpu": 2}


@pytest.mark.parametrize("stage, layout", [("vision", "padded"), ("text", "packed"), ("vl", "packed")])
def test_activation_checkpointing_gives_the_same_gradients(stage, layout):
    """`model.set_grad_checkpointing()` reaches every block pass of the step (it calls the
    model's passes, never its blocks): each block runs again in backward, and the loss and
    gradients are those without checkpointing (training mode, drop path replayed)."""
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = tiny_model(drop_path_rate=0.2).train()
        prepare_stage(model, stage)
        model.set_grad_checkpointing(checkpointed)
        calls = [0]
        for blk in model.blocks:
            blk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        step = PretrainStep(model, stage, layout=layout, generator=torch.Generator().manual_seed(0))
        batch = vl_batch()
        batch["patch_mask"] = torch.arange(4).expand(6, 4) % 2 == 0
        torch.manual_seed(1)
        out = step(batch)
        forward_calls = calls[0]
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), grads, forward_calls, calls[0]))
    (loss0, g0, fwd0, total0), (loss1, g1, fwd1, total1) = results
    assert fwd0 == total0 == fwd1 and total1 == 2 * fwd1
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_init_beit_loads_the_vision_side(tmp_path):
    """`--init-beit FILE` (instead of the vision stage): the text stage starts from a timm BEiT."""
    from types import SimpleNamespace
    from timm.models.beit import Beit
    from vlmo_fast.training.pretrain import Job
    beit = Beit(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4,
                use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, num_classes=0)
    path = tmp_path / "beit.pth"
    torch.save({"model": beit.state_dict()}, path)
    job = SimpleNamespace(args=SimpleNamespace(init_beit=str(path), trust_pickle=False))
    model = Job.build_model(job, "text", VLMoConfig.preset("tiny", vocab_size=VOCAB), None)
    assert torch.equal(model.blocks[2].attn.qkv.weight, beit.blocks[2].attn.qkv.weight)
    assert torch.equal(model.cls_token, beit.cls_token)


class _RunsCodeWhenUnpickled:
    """A pickle payload that creates a file when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_init_beit_never_unpickles_code_without_trust_pickle(tmp_path):
    """issue 20 item 1: `--init-beit evil.pth` used torch.load(weights_only=False) and ran the
    file's code. Now it is read as plain tensors, refused with a message naming --trust-pickle."""
    from types import SimpleNamespace
    from vlmo_fast.training.pretrain import Job
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    job = SimpleNamespace(args=SimpleNamespace(init_beit=str(evil), trust_pickle=False))
    with pytest.raises(ValueError, match="--trust-pickle"):
        Job.build_model(job, "text", VLMoConfig.preset("tiny", vocab_size=VOCAB), None)
    assert not marker.exists()
    # the opt-in unpickles (and so runs the payload): the flag is the only way to get there
    job.args.trust_pickle = True
    with pytest.raises(Exception):   # the payload's state_dict is not a BEiT's
        Job.build_model(job, "text", VLMoConfig.preset("tiny", vocab_size=VOCAB), None)
    assert marker.exists()


def test_hard_negative_warmup_draws_uniform_negatives_then_hard_ones():
    """--hard-negative-warmup N: steps 1..N sample ITM negatives as hard_negatives="none"
    (uniform over the other images), later steps as "global"; the step comes from the loop
    (set_step), so a resumed run continues the warm-up where it was."""
    torch.manual_seed(0)
    model = tiny_model()
    img, txt = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    ids = torch.arange(6)

    def negatives(mode, warmup, step):
        s = PretrainStep(model, "vl", hard_negatives=mode, hard_negative_warmup=warmup,
                         generator=torch.Generator().manual_seed(3))
        s.set_step(step)
        return [t.tolist() for t in s._sample_negatives(img, txt, ids, ids, 6, 1, 0)]

    with torch.no_grad():
        model.itc.logit_scale.fill_(4.6)    # sharp similarities: hard and uniform draws differ
    assert negatives("global", 5, 3) == negatives("none", 0, 3)
    assert negatives("global", 5, 5) == negatives("none", 0, 5)
    assert negatives("global", 5, 6) == negatives("global", 0, 6) != negatives("none", 0, 6)
    with pytest.raises(ValueError, match="hard_negative_warmup"):
        PretrainStep(model, "vl", hard_negative_warmup=-1)


def test_hard_negative_scale_interpolates_between_uniform_and_reference_negatives():
    """--hard-negative-scale S draws ITM negatives from softmax(S x ITC logits): S=1 is the
    reference's draw, S=0 the uniform one, and a middle S puts the negatives' mean similarity
    strictly between the two (counted over many draws)."""
    torch.manual_seed(0)
    model = tiny_model()
    b = 12
    img, txt = torch.nn.functional.normalize(torch.randn(2, b, 8), dim=-1)
    ids = torch.arange(b)
    with torch.no_grad():
        model.itc.logit_scale.fill_(3.0)

    def negatives(scale, seed=3, mode="global"):
        s = PretrainStep(model, "vl", hard_negatives=mode, hard_negative_scale=scale,
                         generator=torch.Generator().manual_seed(seed))
        s.set_step(1)
        return s._sample_negatives(img, txt, ids, ids, b, 1, 0)

    assert [t.tolist() for t in negatives(1.0)] == [t.tolist() for t in PretrainStep(
        model, "vl", generator=torch.Generator().manual_seed(3))._sample_negatives(img, txt, ids, ids, b, 1, 0)]
    assert [t.tolist() for t in negatives(0.0)] == [t.tolist() for t in negatives(1.0, mode="none")]
    sim = img @ txt.t()

    def mean_similarity(scale):
        total = 0.0
        for seed in range(300):
            neg_txt, _ = negatives(scale, seed)
            assert not (neg_txt == torch.arange(b)).any()      # never the positive
            total += sim[torch.arange(b), neg_txt].mean().item()
        return total / 300

    uniform, middle, reference = mean_similarity(0.0), mean_similarity(0.4), mean_similarity(1.0)
    assert uniform + 0.02 < middle < reference - 0.02
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="hard_negative_scale"):
            PretrainStep(model, "vl", hard_negative_scale=bad)
