"""Fine-tuning step modules (VQA, NLVR2) and parameter groups (head lr, layer-wise decay)."""
import pytest
import torch
import torch.nn.functional as F

from vlmo_fast.eval import NLVR2Model
from vlmo_fast.training.finetune import NLVR2Step, RetrievalStep, VQAStep, finetune_param_groups, layer_id
from vlmo_fast.losses import contrastive_loss_reference
from vlmo_fast.model import VLMo


def _pairs(c, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, c.vocab_size, (b, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask, torch.rand(b, 3, c.img_size, c.img_size, generator=g) * 2 - 1


def test_vqa_step_loss_and_score():
    model = VLMo.from_preset("tiny", num_classes=5).eval()
    ids, mask, images = _pairs(model.config)
    targets = torch.tensor([[0, 1.0, 0, 0, 0.3], [0.6, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = VQAStep(model)({"images": images, "text_ids": ids, "text_mask": mask, "vqa_targets": targets})
    logits = model.classify(model.encode_pair(ids, images, mask))
    torch.testing.assert_close(out["loss"], F.binary_cross_entropy_with_logits(logits, targets) * 5)
    expected = targets[torch.arange(3), logits.argmax(1)].mean()
    torch.testing.assert_close(out["metrics"]["vqa_score"], expected)
    out["loss"].backward()
    assert model.classifier.fc2.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="classifier head"):
        VQAStep(VLMo.from_preset("tiny"))


def test_nlvr2_step_loss_and_accuracy():
    model = NLVR2Model(VLMo.from_preset("tiny")).eval()
    ids, mask, left = _pairs(model.config)
    _, _, right = _pairs(model.config, seed=1)
    labels = torch.tensor([1, 0, 1])
    out = NLVR2Step(model)({"images_left": left, "images_right": right, "text_ids": ids,
                            "text_mask": mask, "labels": labels})
    logits = model(ids, left, right, mask)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    assert out["metrics"]["nlvr2_acc"] == (logits.argmax(1) == labels).float().mean()


def test_retrieval_step_is_itc_on_the_main_head():
    model = VLMo.from_preset("tiny", itc_vl_head=False).eval()
    ids, mask, images = _pairs(model.config, b=4)
    out = RetrievalStep(model)({"images": images, "text_ids": ids, "text_mask": mask})
    ref = contrastive_loss_reference(model.encode_image(images).features,
                                     model.encode_text(ids, mask).features, model.itc.logit_scale)
    torch.testing.assert_close(out["loss"], ref)
    out["loss"].backward()
    assert model.itc.logit_scale.grad is not None and model.itc.text_proj.weight.grad is not None


def test_param_groups_head_mult_and_layer_decay():
    model = VLMo.from_preset("tiny", num_classes=4)   # depth 4
    step = VQAStep(model)
    groups = finetune_param_groups(step, lr=1e-3, weight_decay=0.05, head_lr_mult=10, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in step.parameters() if p.requires_grad)   # each exactly once
    named = dict(step.named_parameters())
    # layers: embeddings 0 -> 0.5^5, blocks.i -> 0.5^(4 - i), final norm / pooler -> 1, head -> 10
    assert lr_of[id(named["model.patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.5 ** 5)
    assert lr_of[id(named["model.blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** 4)
    assert lr_of[id(named["model.blocks.3.mlp.fc1_weight"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(named["model.norm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["model.classifier.fc2.weight"])] == pytest.approx(1e-2)
    # no decay on biases, norms, layer scales, the bias table; decay on matrices
    assert wd_of[id(named["model.blocks.0.attn.qkv.weight"])] == 0.05
    for n in ("model.blocks.0.gamma_1", "model.norm.bias", "model.rel_pos_bias.relative_position_bias_table",
              "model.blocks.1.mlp.norm_weight", "model.classifier.fc1.bias"):
        assert wd_of[id(named[n])] == 0.0, n
    assert layer_id("text_embeddings.word_embeddings.weight", 4) == 0 and layer_id("itm_head.weight", 4) == 5
    nlvr2 = NLVR2Step(NLVR2Model(VLMo.from_preset("tiny")))
    g2 = finetune_param_groups(nlvr2, lr=1e-3, weight_decay=0.0, head_lr_mult=5)
    head = [g for g in g2 if g["name"].startswith("head")]
    assert {id(p) for g in head for p in g["params"]} == {id(p) for p in nlvr2.head.parameters()}
    assert all(g["lr"] == pytest.approx(5e-3) for g in head)
    with pytest.raises(ValueError, match="layer_decay"):
        finetune_param_groups(step, lr=1e-3, weight_decay=0.0, layer_decay=1.5)


def test_finetune_jobs_end_to_end(tmp_path, capsys):
    """train/finetune.py for the three tasks from a tiny pretrained folder (a few CPU steps):
    final weights + tokenizer + task files + DONE, metrics, curves, the evaluation JSON; a
    rerun finds the finished job; a lost final folder is rebuilt from the last checkpoint."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("vlmo_fast.training.engine")   # the pretraining machinery (branch pretrain)
    import json
    from test_eval_runner import make_checkpoint, tiny_tokenizer
    from vlmo_fast.training.finetune import main
    init = make_checkpoint(tmp_path / "pre", tiny_tokenizer())
    common = ["--init", str(init), "--batch-size", "4", "--log-every", "1", "--eval-items", "6",
              "--no-progress"]
    res = main(["--task", "vqa", "--output-dir", str(tmp_path / "vqa"), "--steps", "3", "--save-every", "2",
                *common])
    final = tmp_path / "vqa" / "final"
    assert {p.name for p in final.iterdir()} >= {"DONE", "config.json", "model.safetensors", "vocab.txt",
                                                  "answer_vocab.json"}
    from vlmo_fast.training.logs import read_metrics
    rows = read_metrics(tmp_path / "vqa" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all("vqa_score" in r for r in rows)
    assert rows[0]["lr"] > rows[-1]["lr"] > 0          # warmup 1 step, then linear decay
    assert (tmp_path / "vqa" / "curves.png").is_file()
    assert res["task"] == "vqa" and res["sizes"]["questions"] == 6
    assert (tmp_path / "vqa" / "eval_vqa_test.json").is_file()
    capsys.readouterr()
    main(["--task", "vqa", "--output-dir", str(tmp_path / "vqa"), "--steps", "3", *common])
    assert "finished earlier" in capsys.readouterr().out
    import shutil
    shutil.rmtree(final)
    main(["--task", "vqa", "--output-dir", str(tmp_path / "vqa"), "--steps", "3", *common, "--no-eval"])
    assert "resumed from" in capsys.readouterr().out and (final / "DONE").is_file()

    for task in ("retrieval", "nlvr2"):
        res = main(["--task", task, "--output-dir", str(tmp_path / task), "--steps", "2", *common])
        assert (tmp_path / task / "final" / "DONE").is_file() and res["task"] == task
    assert (tmp_path / "nlvr2" / "final" / "nlvr2_head.safetensors").is_file()
    # hard-negative ITM on top of ITC: the pretraining vl step with MLM off
    main(["--task", "retrieval", "--itm", "--output-dir", str(tmp_path / "itm"), "--steps", "1",
          "--rerank-k", "2", *common])
    row = json.loads((tmp_path / "itm" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "itm" in row and "itc" in row
    with pytest.raises(SystemExit):
        main(["--task", "nlvr2", "--output-dir", str(tmp_path / "x"), "--steps", "2", "--itm", *common])
