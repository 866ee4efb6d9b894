"""Fine-tuning: one step module per task (the step protocol of `vlmo_fast.training.loop`:
`module(batch) -> {"loss", "metrics"}`), AdamW groups with a head learning-rate multiplier and
layer-wise decay (`training.optim`, on the one weight-decay rule), and the job
`train/finetune.py` (`main`), which runs the same `TrainLoop` as pretraining.

- VQA (`VQAStep`): fusion encoder over [question ; image] -> pooled [CLS] -> answer
  classifier; soft-score binary cross-entropy over the answer vocabulary, multiplied by the
  number of answers (the reference's scaling, ViLT / VLMo). Batches: the data layer's
  `build_task_loader("vqa", ...)` (images, text_ids, text_mask, vqa_targets).
- NLVR2 (`NLVR2Step`): `NLVR2Model` (both (statement, image) pairs through the fusion encoder,
  pooled vectors concatenated, classifier) with cross-entropy. Batches: images_left,
  images_right, text_ids, text_mask, labels.
- retrieval (`RetrievalStep`): the model as a dual encoder, the fused contrastive loss over
  the global batch (`vlmo_fast.losses.contrastive_loss`, gathered across ranks) on the main
  ITC head only (the reference's fine-tuning drops the VL-expert ITC branch). Batches: the
  pretraining loader's "vl" stage (images, text_ids, text_mask). Hard-negative ITM on top is
  the pretraining step of the vl stage with MLM weighted 0 (train/finetune.py --itm).

`finetune_param_groups`: the head (classifier) gets lr * head_lr_mult; with layer_decay < 1
the encoder's layer i (embeddings 0, blocks 1..depth, final norm / pooler depth + 1) gets
lr * layer_decay ** (depth + 1 - i) (BEiT's layer-wise decay); weight decay by the rule every
optimizer here uses (`vlmo_fast.optim.is_decayed`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..eval.nlvr2 import NLVR2Model, nlvr2_logits
from .optim import layer_decay_param_groups, layer_id  # noqa: F401  (layer_id: public here too)

def _external_parameters(model) -> List[nn.Parameter]:
    """Parameters used outside their owner's forward (ZeRO-3 must gather them explicitly)."""
    owners = [model, model.token_type_embeddings, model.rel_pos_bias]
    return [p for owner in owners if owner is not None for p in owner.parameters(recurse=False)]


class RetrievalStep(nn.Module):
    """ITC-only retrieval fine-tuning step (dual encoder, global-batch contrastive loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def external_parameters(self):
        return _external_parameters(self.model) + list(self.model.itc.parameters(recurse=False))

    def head_parameter_names(self) -> List[str]:
        return []

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        from ..losses import contrastive_loss
        m = self.model
        img = m.encode_image(batch["images"]).features
        txt = m.encode_text(batch["text_ids"], batch.get("text_mask")).features
        loss, stats = contrastive_loss(img, txt, m.itc.logit_scale, return_stats=True,
                                       rank_grad_reduction="mean")
        return {"loss": loss, "metrics": {"itc": loss.detach(), "itc_i2t_acc": stats.i2t_accuracy,
                                          "itc_t2i_acc": stats.t2i_accuracy,
                                          "logit_scale": m.itc.logit_scale.detach().reshape(())}}


class VQAStep(nn.Module):
    """VQA fine-tuning step over a VLMo with `config.num_classes` = number of answers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "classifier", None) is None:
            raise ValueError("VQA fine-tuning needs a classifier head: build the model with "
                             "config.num_classes = the answer vocabulary size")
        self.model = model

    def external_parameters(self):
        return _external_parameters(self.model)

    def head_parameter_names(self) -> List[str]:
        return [f"model.{n}" for n, _ in self.model.classifier.named_parameters(prefix="classifier")]

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        targets = batch["vqa_targets"]
        if targets.shape[-1] != self.model.config.num_classes:
            raise ValueError(f"vqa_targets have {targets.shape[-1]} answers, the classifier "
                             f"{self.model.config.num_classes}")
        pair = self.model.encode_pair(batch["text_ids"], batch["images"], batch.get("text_mask"))
        logits = self.model.classify(pair).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets.float()) * targets.shape[-1]
        with torch.no_grad():
            score = targets.float().gather(1, logits.argmax(1, keepdim=True)).mean()
        return {"loss": loss, "metrics": {"vqa_bce": loss.detach(), "vqa_score": score}}


class NLVR2Step(nn.Module):
    """NLVR2 fine-tuning step: `model` is the VLMo backbone (what the training machinery
    exports), `head` the NLVR2 classifier."""

    def __init__(self, model: NLVR2Model):
        super().__init__()
        if not isinstance(model, NLVR2Model):
            raise TypeError(f"NLVR2Step needs an NLVR2Model, got {type(model).__name__}")
        self.model, self.head = model.backbone, model.head

    def external_parameters(self):
        return _external_parameters(self.model)

    def head_parameter_names(self) -> List[str]:
        return [n for n, _ in self.head.named_parameters(prefix="head")]

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        logits = nlvr2_logits(self.model, self.head, batch["text_ids"], batch["images_left"],
                              batch["images_right"], batch.get("text_mask")).float()
        labels = batch["labels"].long()
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss, "metrics": {"nlvr2_ce": loss.detach(), "nlvr2_acc": accuracy}}


def finetune_param_groups(step_module: nn.Module, lr: float, weight_decay: float, *,
                          head_lr_mult: float = 1.0, layer_decay: float = 1.0,
                          backbone_prefix: Optional[str] = None) -> List[Dict]:
    """AdamW groups of the trainable parameters, each with its own "lr" (and "lr_scale");
    see `training.optim.layer_decay_param_groups`. backbone_prefix: where the VLMo sits inside
    `step_module` (default "model.", as in every step module here and the pretraining step)."""
    return layer_decay_param_groups(step_module, lr, weight_decay, head_lr_mult=head_lr_mult,
                                    layer_decay=layer_decay,
                                    backbone_prefix="model." if backbone_prefix is None else backbone_prefix)


# -- the job: `train/finetune.py` ------------------------------------------------------------
TASKS = ("retrieval", "vqa", "nlvr2")
DEFAULT_HEAD_LR_MULT = {"retrieval": 1.0, "vqa": 10.0, "nlvr2": 10.0}


def build_parser():
    import argparse
    from .args import add_optimization_args, add_run_args
    p = argparse.ArgumentParser(prog="train/finetune.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    add_optimization_args(p, steps=200, lr=1e-4)
    g = p.add_argument_group("fine-tuning")
    a = g.add_argument
    a("--task", required=True, choices=TASKS)
    a("--init", required=True, help="pretrained save_pretrained folder with its tokenizer (vl/final)")
    a("--data", default="embedded", help="'embedded' or a file: retrieval a manifest / Karpathy JSON, "
      "vqa a VQAv2 questions JSON (+ --annotations), nlvr2 an NLVR2 JSONL")
    a("--annotations", default=None, help="VQAv2 annotations JSON of --data")
    a("--image-root", default=None, help="folder the data file's image paths are relative to")
    a("--img-size", type=int, default=None, help="fine-tune at another resolution (positions interpolated)")
    a("--head-lr-mult", type=float, default=None, help="lr multiplier of the task head "
      "(default: 10 for vqa/nlvr2, 1 for retrieval)")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (1 = off; BEiT uses ~0.65-0.85)")
    a("--itm", action="store_true", help="retrieval: add hard-negative ITM (the pretraining vl step, MLM off)")
    a("--hard-negatives", default="global", choices=["global", "local", "none"], help="with --itm")
    a("--eval-split", default="test", help="evaluated after training (embedded: val/test/test_comp)")
    a("--eval-items", type=int, default=None, help="limit the evaluation set")
    a("--rerank-k", type=int, default=16, help="retrieval evaluation: ITM re-rank of the top k (0: off)")
    a("--no-eval", action="store_true")
    return p


def validate_args(args) -> None:
    from pathlib import Path
    from .args import existing_path, validate_common
    validate_common(args)
    init = Path(args.init)
    if not (init / "config.json").is_file():
        raise ValueError(f"--init {init}: not a save_pretrained folder (no config.json)")
    if not (init / "vocab.txt").is_file():
        raise ValueError(f"--init {init}: no tokenizer (vocab.txt) beside the weights")
    if args.head_lr_mult is not None and args.head_lr_mult <= 0:
        raise ValueError(f"--head-lr-mult must be > 0, got {args.head_lr_mult}")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be >= 1, got {args.img_size}")
    if args.itm and args.task != "retrieval":
        raise ValueError("--itm is for --task retrieval")
    if args.data != "embedded":
        existing_path("--data", args.data)
    existing_path("--annotations", args.annotations)
    existing_path("--image-root", args.image_root)


def _load_model(args, init, loader):
    """The pretrained VLMo adapted to the task (new heads randomly initialised); checks that
    only the expected keys are new or dropped."""
    from ..config import VLMoConfig
    from ..model import VLMo
    from safetensors.torch import load_file
    config = VLMoConfig.from_json(init / "config.json")
    if args.task == "retrieval":
        config = config.replace(itc_vl_head=False)   # fine-tuning drops the VL-expert ITC branch
    elif args.task == "vqa":
        config = config.replace(num_classes=len(loader.answer_vocab))
    model = VLMo(config)
    state = load_file(str(init / "model.safetensors"))
    own = model.state_dict()
    # a classifier of another answer vocabulary is not reused (new head, randomly initialised)
    state = {k: v for k, v in state.items()
             if not (k.startswith("classifier.") and k in own and own[k].shape != v.shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_ok = ("classifier.",) if args.task == "vqa" else ()
    bad_missing = [k for k in missing if not k.startswith(new_ok)] if new_ok else list(missing)
    bad_unexpected = [k for k in unexpected if not k.startswith(("itc_vl.", "classifier."))]
    if bad_missing or bad_unexpected:
        raise ValueError(f"{init} does not match the {args.task} model: missing {bad_missing[:6]}, "
                         f"unexpected {bad_unexpected[:6]}")
    if args.img_size and args.img_size != config.img_size:
        model.resize_image(args.img_size)
    if args.task == "nlvr2":
        return NLVR2Model(model)
    return model


def _step_module(args, model, generator):
    if args.task == "vqa":
        return VQAStep(model)
    if args.task == "nlvr2":
        return NLVR2Step(model)
    if not args.itm:
        return RetrievalStep(model)
    from .step import PretrainStep
    step = PretrainStep(model, "vl", hard_negatives=args.hard_negatives,
                        loss_weights={"itc": 1.0, "itm": 1.0, "mlm": 0.0}, generator=generator)
    step.head_parameter_names = lambda: []
    return step


def _loader(args, tok, config, rank: int, world: int):
    common = dict(batch_size=args.batch_size, rank=rank, world=world, seed=args.seed,
                  img_size=config.img_size, max_text_len=config.max_text_len, num_workers=args.num_workers)
    options = {k: v for k, v in (("annotations", args.annotations), ("image_root", args.image_root)) if v}
    source = args.data
    if args.task == "retrieval":
        from ..data import build_pretrain_loader
        return build_pretrain_loader(source, tok, "vl", patch_size=config.patch_size, split="train",
                                     **common, **options)
    from ..data.tasks import build_task_loader
    return build_task_loader(args.task, source, tok, "train", **common, **options)


def run(args) -> dict:
    """Fine-tune, save <output-dir>/final (weights, tokenizer, task files, DONE), evaluate."""
    from pathlib import Path

    from ..config import VLMoConfig
    from ..data import WordPieceTokenizer
    from ..io import atomic_write_json
    from .common import seed_all
    from .engine import engine_from_args, gathered_fp32_state, gathered_state_dict, init_distributed, resolve_bf16
    from .loop import TrainLoop

    validate_args(args)
    out, init = Path(args.output_dir), Path(args.init)
    final = out / "final"
    rank, world, device = init_distributed()
    is_main = rank == 0
    log = (lambda *m: print(*m, flush=True)) if is_main else (lambda *m: None)
    bf16 = resolve_bf16(args.precision, device)
    tok = WordPieceTokenizer.load(init)
    if args.resume != "never" and (final / "DONE").is_file():
        log(f"[{args.task}] finished earlier: {final}")
        return _evaluate(args, final, out, is_main)

    seed_all(args.seed * 1000 + rank)
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    config = VLMoConfig.from_json(init / "config.json")
    if args.img_size:
        config = config.replace(img_size=args.img_size)
    loader = _loader(args, tok, config, rank, world)
    model = _load_model(args, init, loader)
    if args.activation_checkpointing:
        (model.backbone if args.task == "nlvr2" else model).set_grad_checkpointing(True)
    step_module = _step_module(args, model, gen).to(device)
    head_mult = args.head_lr_mult if args.head_lr_mult is not None else DEFAULT_HEAD_LR_MULT[args.task]
    groups = finetune_param_groups(step_module, args.lr, args.weight_decay, head_lr_mult=head_mult,
                                   layer_decay=args.layer_decay)
    engine, ds_config = engine_from_args(step_module, args, lr=args.lr, total_steps=args.steps, bf16=bf16,
                                 param_groups=groups)
    loop = TrainLoop(name=args.task, title=f"{args.task} fine-tuning", engine=engine,
                     step_module=step_module, loader=loader, out_dir=out, total_steps=args.steps,
                     args=args, rank=rank, world=world, device=device, generators={"generator": gen},
                     ds_config=ds_config,
                     log=log)
    loop.resume()
    trainable = sum(p.numel() for p in step_module.parameters() if p.requires_grad)
    log(f"[{args.task}] fine-tuning {trainable / 1e6:.3f}M parameters from {init}: {args.steps} steps x "
        f"{args.batch_size} x {args.grad_accum} accum x {world} procs on {device}, "
        f"{'bf16' if bf16 else 'fp32'}, head lr x{head_mult}, layer decay {args.layer_decay}")
    summary = loop.run()

    # final weights: the fp32 master copy (gathered under ZeRO-3) on rank 0; DONE written last
    state = gathered_state_dict(engine, rank)
    head_state = gathered_fp32_state(engine, engine.module.head, rank) if args.task == "nlvr2" else None
    if is_main:
        backbone = model.backbone if args.task == "nlvr2" else model
        backbone.float().load_state_dict(state, strict=True)
        if head_state is not None:
            model.head.float().load_state_dict(head_state, strict=True)
        model.save_pretrained(final)
        tok.save(final)
        if args.task == "vqa":
            from ..eval.runner import ANSWER_VOCAB_FILE
            atomic_write_json(final / ANSWER_VOCAB_FILE, list(loader.answer_vocab))
        atomic_write_json(final / "DONE", {"task": args.task, "init": str(init), **summary})
        log(f"[{args.task}] weights: {final}; curves: {out / 'curves.png'}")
    loop.finish()
    return _evaluate(args, final, out, is_main)


def _evaluate(args, final, out, is_main) -> dict:
    if args.no_eval or not is_main:
        return {}
    import argparse
    from ..eval.runner import run as run_eval
    eval_args = argparse.Namespace(
        task=args.task, checkpoint=str(final), data=args.data, split=args.eval_split,
        image_root=args.image_root, annotations=args.annotations, attribute="colour_shape",
        num_items=args.eval_items, seed=args.seed, batch_size=args.batch_size, rerank_k=args.rerank_k,
        device=None, out=str(out / f"eval_{args.task}_{args.eval_split}.json"), no_progress=args.no_progress)
    return run_eval(eval_args)


def main(argv=None) -> dict:
    from ..errors import run_or_exit
    return run_or_exit(lambda: run(build_parser().parse_args(argv)))
