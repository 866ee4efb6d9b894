"""Fine-tuning pieces that do not depend on the training loop: one step module per task
(`module(batch) -> {"loss", "metrics"}`, the contract of vlmo_fast.training's engine and loop)
and AdamW parameter groups with a head learning-rate multiplier and layer-wise decay.

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
lr * layer_decay ** (depth + 1 - i) (BEiT's layer-wise decay); no weight decay on biases,
norms, layer scales, positions and the bias table, as in pretraining.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .eval.nlvr2 import NLVR2Model, nlvr2_logits
from .eval.vqa import vqa_soft_accuracy

# never decayed besides every 0-/1-d tensor (the pretraining optimiser's list)
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "relative_position_bias_table", "logit_scale",
                     "norm_weight", "norm_bias", "fc1_bias", "fc2_bias", "gamma_1", "gamma_2")
# parameters of a VLMo that form layer 0 (below the first block)
_EMBEDDING_PREFIXES = ("text_embeddings.", "token_type_embeddings.", "patch_embed.", "cls_token",
                       "pos_embed", "rel_pos_bias.")


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
        from .losses import contrastive_loss
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


def layer_id(name: str, depth: int) -> int:
    """Layer of a VLMo parameter name (relative to the VLMo): 0 embeddings, 1 + i for
    blocks.i, depth + 1 for everything above (final norm, pooler, heads)."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def finetune_param_groups(step_module: nn.Module, lr: float, weight_decay: float, *,
                          head_lr_mult: float = 1.0, layer_decay: float = 1.0,
                          backbone_prefix: Optional[str] = None) -> List[Dict]:
    """AdamW groups of the trainable parameters, each with its own "lr" (and "lr_scale").

    backbone_prefix: where the VLMo sits inside `step_module` (default "model.", as in every
    step module here and the pretraining step)."""
    if lr <= 0 or head_lr_mult <= 0 or not 0 < layer_decay <= 1:
        raise ValueError(f"need lr > 0, head_lr_mult > 0 and layer_decay in (0, 1], got {lr}, "
                         f"{head_lr_mult}, {layer_decay}")
    if backbone_prefix is None:
        backbone_prefix = "model."
    backbone = step_module.get_submodule(backbone_prefix.rstrip(".")) if backbone_prefix else step_module
    depth = backbone.config.depth
    heads = set(getattr(step_module, "head_parameter_names", lambda: [])())
    no_decay_names = {backbone_prefix + n for n in getattr(backbone, "no_weight_decay", lambda: set())()}
    groups: Dict[tuple, Dict] = {}
    for name, p in step_module.named_parameters():
        if not p.requires_grad:
            continue
        if name in heads:
            scale, layer = head_lr_mult, "head"
        elif name.startswith(backbone_prefix):
            lid = layer_id(name[len(backbone_prefix):], depth)
            scale, layer = layer_decay ** (depth + 1 - lid), lid
        else:   # step-module parameters outside the VLMo (none today): top layer
            scale, layer = 1.0, depth + 1
        decay = not (p.dim() <= 1 or name in no_decay_names or name.endswith(NO_DECAY_SUFFIXES))
        key = (layer, decay)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                        "lr": lr * scale, "lr_scale": scale,
                                        "name": f"{'head' if layer == 'head' else f'layer{layer}'}"
                                                f"_{'decay' if decay else 'no_decay'}"})
        group["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters")
    return list(groups.values())


# -- the job: `train/finetune.py` ------------------------------------------------------------
TASKS = ("retrieval", "vqa", "nlvr2")
DEFAULT_HEAD_LR_MULT = {"retrieval": 1.0, "vqa": 10.0, "nlvr2": 10.0}


def build_parser():
    import argparse
    p = argparse.ArgumentParser(prog="train/finetune.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", required=True, choices=TASKS)
    a("--init", required=True, help="pretrained save_pretrained folder with its tokenizer (vl/final)")
    a("--output-dir", required=True, help="checkpoints/, final/, metrics.jsonl, curves.png, eval JSON")
    a("--data", default="embedded", help="'embedded' or a file: retrieval a manifest / Karpathy JSON, "
      "vqa a VQAv2 questions JSON (+ --annotations), nlvr2 an NLVR2 JSONL")
    a("--annotations", default=None, help="VQAv2 annotations JSON of --data")
    a("--image-root", default=None, help="folder the data file's image paths are relative to")
    a("--img-size", type=int, default=None, help="fine-tune at another resolution (positions interpolated)")
    a("--steps", type=int, default=200)
    a("--batch-size", type=int, default=32, help="micro-batch per process")
    a("--grad-accum", type=int, default=1)
    a("--lr", type=float, default=1e-4)
    a("--head-lr-mult", type=float, default=None, help="lr multiplier of the task head "
      "(default: 10 for vqa/nlvr2, 1 for retrieval)")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (1 = off; BEiT uses ~0.65-0.85)")
    a("--weight-decay", type=float, default=0.01)
    a("--betas", type=float, nargs=2, default=(0.9, 0.98))
    a("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    a("--schedule", default="linear", choices=["cosine", "linear", "constant"])
    a("--min-lr-ratio", type=float, default=0.0)
    a("--clip", type=float, default=1.0)
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    a("--itm", action="store_true", help="retrieval: add hard-negative ITM (the pretraining vl step, MLM off)")
    a("--hard-negatives", default="global", choices=["global", "local", "none"], help="with --itm")
    a("--num-workers", type=int, default=0)
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10)
    a("--save-every", type=int, default=100)
    a("--keep-last", type=int, default=2)
    a("--resume", default="auto", choices=["auto", "never"])
    a("--eval-split", default="test", help="evaluated after training (embedded: val/test/test_comp)")
    a("--eval-items", type=int, default=None, help="limit the evaluation set")
    a("--rerank-k", type=int, default=16, help="retrieval evaluation: ITM re-rank of the top k (0: off)")
    a("--no-eval", action="store_true")
    a("--no-progress", action="store_true")
    a("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    try:
        import deepspeed
        deepspeed.add_config_arguments(p)
    except ImportError:
        a("--deepspeed_config", default=None)
    return p


def validate_args(args) -> None:
    from pathlib import Path
    init = Path(args.init)
    if not (init / "config.json").is_file():
        raise ValueError(f"--init {init}: not a save_pretrained folder (no config.json)")
    if not (init / "vocab.txt").is_file():
        raise ValueError(f"--init {init}: no tokenizer (vocab.txt) beside the weights")
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_last"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0 or (args.head_lr_mult is not None and args.head_lr_mult <= 0):
        raise ValueError("--lr and --head-lr-mult must be > 0")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.itm and args.task != "retrieval":
        raise ValueError("--itm is for --task retrieval")
    if args.data != "embedded" and not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or folder")


def _load_model(args, init, loader):
    """The pretrained VLMo adapted to the task (new heads randomly initialised); checks that
    only the expected keys are new or dropped."""
    from .config import VLMoConfig
    from .model import VLMo
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
    from .training.step import PretrainStep
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
        from .data import build_pretrain_loader
        return build_pretrain_loader(source, tok, "vl", patch_size=config.patch_size, split="train",
                                     **common, **options)
    from .data.tasks import build_task_loader
    return build_task_loader(args.task, source, tok, "train", **common, **options)


def run(args) -> dict:
    """Fine-tune, save <output-dir>/final (weights, tokenizer, task files, DONE), evaluate."""
    import sys
    import time
    from pathlib import Path

    import torch.distributed as dist

    from .data import WordPieceTokenizer
    from .io import atomic_write_json
    from .training.checkpoint import latest_tag, load_checkpoint, rng_state, save_checkpoint, set_rng_state
    from .training.engine import build_ds_config, build_engine, init_distributed, load_ds_config
    from .training.logs import MetricsLogger, StepBuffer, nonfinite, plot_curves
    from .training.pretrain import Batches, seed_all, to_device

    validate_args(args)
    out, init = Path(args.output_dir), Path(args.init)
    final, ckpt_dir = out / "final", out / "checkpoints"
    rank, world, device = init_distributed()
    is_main = rank == 0
    log = (lambda *m: print(*m, flush=True)) if is_main else (lambda *m: None)
    bf16 = device.type == "cuda" if args.precision == "auto" else args.precision == "bf16"
    if bf16 and device.type != "cuda":
        raise ValueError("--precision bf16 needs CUDA; this run is on the CPU (use fp32)")
    tok = WordPieceTokenizer.load(init)
    if args.resume == "auto" and (final / "DONE").is_file():
        log(f"[{args.task}] finished earlier: {final}")
        return _evaluate(args, final, out, is_main)

    seed_all(args.seed * 1000 + rank)
    gen = torch.Generator(device=device).manual_seed(args.seed + 7)
    from .config import VLMoConfig
    config = VLMoConfig.from_json(init / "config.json")
    if args.img_size:
        config = config.replace(img_size=args.img_size)
    loader = _loader(args, tok, config, rank, world)
    model = _load_model(args, init, loader)
    step_module = _step_module(args, model, gen).to(device)
    total = args.steps
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total // 10)
    ds_config = build_ds_config(load_ds_config(args.deepspeed_config), micro_batch=args.batch_size,
                                grad_accum=args.grad_accum, clip=args.clip, bf16=bf16)
    head_mult = args.head_lr_mult if args.head_lr_mult is not None else DEFAULT_HEAD_LR_MULT[args.task]
    groups = finetune_param_groups(step_module, args.lr, args.weight_decay, head_lr_mult=head_mult,
                                   layer_decay=args.layer_decay)
    engine = build_engine(step_module, ds_config, lr=args.lr, weight_decay=args.weight_decay,
                          betas=tuple(args.betas), total_steps=total, warmup_steps=min(warmup, total),
                          schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, param_groups=groups)
    step = 0
    if args.resume == "auto" and latest_tag(ckpt_dir) is not None:
        client = load_checkpoint(engine, ckpt_dir, rank)
        step = client["step"]
        loader.load_state_dict(client["data"])
        set_rng_state(client["rng"], {"generator": gen})
        log(f"[{args.task}] resumed from {ckpt_dir / latest_tag(ckpt_dir)} at step {step}")
    trainable = sum(p.numel() for p in step_module.parameters() if p.requires_grad)
    log(f"[{args.task}] fine-tuning {trainable / 1e6:.3f}M parameters from {init}: {total} steps x "
        f"{args.batch_size} x {args.grad_accum} accum x {world} procs on {device}, "
        f"{'bf16' if bf16 else 'fp32'}, head lr x{head_mult}, layer decay {args.layer_decay}")
    logger = MetricsLogger(out, args.task, enabled=is_main, resume_step=step)
    batches, buffer = Batches(loader), StepBuffer()
    bar = None
    if is_main and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=args.task, dynamic_ncols=True, file=sys.stdout)
    last_good, t_last, step_last = None, time.perf_counter(), step

    def flush(at_step):
        nonlocal t_last, step_last
        rows = buffer.flush()
        now = time.perf_counter()
        if rows:
            done = max(at_step - step_last, 1)
            rows[-1]["samples_per_s"] = args.batch_size * args.grad_accum * world * done / max(now - t_last, 1e-9)
        t_last, step_last = now, at_step
        for r in rows:
            if nonfinite(r, [k for k in r if k != "grad_norm"]):
                raise FloatingPointError(f"[{args.task}] non-finite loss at step {r['step']}: "
                                         f"{ {k: v for k, v in r.items() if k != 'step'} }; last good "
                                         f"checkpoint: {last_good or 'none yet'}. Lower --lr or check the data")
        logger.log(rows)
        if bar is not None and rows:
            bar.set_postfix({k: f"{v:.3f}" for k, v in rows[-1].items() if k in ("loss", "vqa_score",
                             "nlvr2_acc", "itc", "itm")}, refresh=False)

    while step < total:
        outs = []
        lr_now = engine.lr_scheduler.get_last_lr()[0]
        for _ in range(args.grad_accum):
            o = engine(to_device(batches.next(), device))
            engine.backward(o["loss"])
            engine.step()
            outs.append(o)
        step += 1
        metrics = {"loss": torch.stack([o["loss"].detach().float() for o in outs]).mean(),
                   "lr": torch.tensor(lr_now)}
        for k in outs[0]["metrics"]:
            metrics[k] = torch.stack([o["metrics"][k].float().reshape(()) for o in outs]).mean()
        buffer.add(step, metrics)
        if bar is not None:
            bar.update(1)
        saving = step % args.save_every == 0 or step == total
        if step % args.log_every == 0 or saving:
            flush(step)
        if saving:
            client = {"step": step, "data": loader.state_dict(), "rng": lambda: rng_state({"generator": gen})}
            last_good = str(ckpt_dir / save_checkpoint(engine, ckpt_dir, step, client, rank, args.keep_last))
    flush(step)
    if bar is not None:
        bar.close()

    # final weights: the fp32 master copy (gathered under ZeRO-3) on rank 0; DONE written last
    from .training.engine import gathered_state_dict
    state = gathered_state_dict(engine, rank)
    head_state = _gathered_head_state(engine, rank) if args.task == "nlvr2" else None
    if is_main:
        backbone = model.backbone if args.task == "nlvr2" else model
        backbone.float().load_state_dict(state, strict=True)
        if head_state is not None:
            model.head.float().load_state_dict(head_state, strict=True)
        model.save_pretrained(final)
        tok.save(final)
        if args.task == "vqa":
            from .eval.runner import ANSWER_VOCAB_FILE
            atomic_write_json(final / ANSWER_VOCAB_FILE, list(loader.answer_vocab))
        rows = logger.read()
        plot_curves(rows, out / "curves.png", f"{args.task} fine-tuning")
        atomic_write_json(final / "DONE", {"task": args.task, "steps": step, "init": str(init),
                                           "last_metrics": rows[-1] if rows else {}, "world_size": world})
        log(f"[{args.task}] weights: {final}; curves: {out / 'curves.png'}")
    logger.close()
    dist.barrier()
    engine.destroy()
    return _evaluate(args, final, out, is_main)


def _gathered_head_state(engine, rank: int):
    """The NLVR2 head's fp32 master weights on rank 0 (as gathered_state_dict does for the
    VLMo: under bf16 the module holds only a rounded copy)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    head = engine.module.head
    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
        values = {}
        for name, p in head.named_parameters():
            master = safe_get_full_fp32_param(p)
            values[name] = (master if master is not None else p).detach().float().cpu().clone()
    return values if rank == 0 else None


def _evaluate(args, final, out, is_main) -> dict:
    if args.no_eval or not is_main:
        return {}
    import argparse
    from .eval.runner import run as run_eval
    eval_args = argparse.Namespace(
        task=args.task, checkpoint=str(final), data=args.data, split=args.eval_split,
        image_root=args.image_root, annotations=args.annotations, attribute="colour_shape",
        num_items=args.eval_items, seed=args.seed, batch_size=args.batch_size, rerank_k=args.rerank_k,
        device=None, out=str(out / f"eval_{args.task}_{args.eval_split}.json"), no_progress=args.no_progress)
    return run_eval(eval_args)


def main(argv=None) -> dict:
    from .eval.runner import run_or_exit
    return run_or_exit(run, build_parser().parse_args(argv))
