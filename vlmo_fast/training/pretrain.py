"""Stagewise VLMo pretraining under DeepSpeed: `deepspeed train/pretrain.py ...` (any number of
processes) or `python train/pretrain.py ...` (one process). See `--help`.

Stages (`--stage vision|text|vl|all`): vision = masked image modelling; text = text-only MLM
with the reference's frozen set; vl = ITC + ITM (global hard negatives) + MLM on image-text
pairs, everything trained. `all` runs them in order (`--skip-text-stage` leaves out text), each
from the previous stage's exported weights, and ends with a zero-shot retrieval evaluation.

Output folder (per stage): checkpoints/ (DeepSpeed + client state, keep-last-K, `latest`),
final/ (save_pretrained weights + config + tokenizer, then DONE), metrics.jsonl,
tensorboard/, curves.png; at the end of vl: retrieval_<split>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import ATTENTION_MODES
from ..errors import NonFiniteLoss  # noqa: F401  (raised by the loop; importable here as before)
from ..io import atomic_write_json

STAGE_ORDER = ("vision", "text", "vl")


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    from .args import add_optimization_args, add_run_args
    p = argparse.ArgumentParser(prog="train/pretrain.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    add_optimization_args(p, steps=100, lr=2e-4)
    g = p.add_argument_group("pretraining")
    a = g.add_argument
    a("--stage", default="all", choices=["vision", "text", "vl", "all"])
    a("--preset", default=None, help="VLMoConfig preset for a new model (default tiny; with --init "
      "the checkpoint's config is used and a different --preset is an error)")
    a("--model-overrides", default=None, help='JSON of VLMoConfig fields, e.g. \'{"img_size": 64}\'')
    a("--data", default="embedded", help="data source for vlmo_fast.data: 'embedded' or a path")
    a("--tokenizer", default=None, help="'embedded' (WordPiece trained on the embedded world), a "
      "vocabulary file (one token per line) or saved tokenizer folder, or train:CORPUS to train a new "
      "vocabulary on a text corpus (default: embedded for embedded data)")
    a("--vocab-size", type=int, default=1000, help="size of a trained vocabulary (embedded or train:)")
    a("--init", default=None, help="save_pretrained folder to start the first stage from")
    a("--init-beit", default=None, help="timm BEiT checkpoint (.safetensors, or a .pth/.bin read "
      "with torch.load(weights_only=True)): replaces the vision stage")
    a("--from-scratch", action="store_true", help="allow --stage text/vl without previous weights")
    a("--skip-text-stage", action="store_true", help="ablation: `all` runs vision then vl")
    a("--ffn", default="mome", choices=["mome", "shared"], help="ablation: one FFN for all modalities")
    a("--no-vl-expert", action="store_true", help="ablation (config vl_expert=False): image-text pairs "
      "use the vision/language experts by token type in the top layers too, no itc_vl head")
    a("--attention", default=None, choices=list(ATTENTION_MODES), help="ablation (config attention): "
      "per_modality gives each modality its own self-attention weights in every block (default: "
      "shared, or the --init checkpoint's)")
    a("--hard-negatives", default="global", choices=["global", "local", "none"])
    a("--hard-negative-warmup", type=int, default=0, metavar="STEPS",
      help="vl stage: draw ITM negatives uniformly for the first STEPS steps, then hard ones")
    a("--hard-negative-scale", type=float, default=1.0, metavar="S",
      help="vl stage: draw ITM negatives from softmax(S x ITC logits): 1 = the reference's hard "
      "negatives, 0 = uniform, in between = milder ones (the demo's tiny model uses a lower S)")
    a("--itc-accum", default="standard", choices=["standard", "cached"],
      help="standard: ITC over each micro-batch's global batch; cached: GradCache, one ITC over "
      "the whole accumulated batch")
    a("--layout", default="auto", choices=["auto", "packed", "padded"],
      help="packed sequences (auto on CUDA) or padded passes with trimmed text (auto on CPU)")
    a("--vision-steps", type=int, default=None)
    a("--text-steps", type=int, default=None)
    a("--vl-steps", type=int, default=None)
    a("--vision-lr", type=float, default=None)
    a("--text-lr", type=float, default=None)
    a("--vl-lr", type=float, default=None)
    a("--loss-weights", default=None, help="e.g. itc=1,itm=1,mlm=0.25 (vl stage)")
    a("--mlm-probability", type=float, default=0.15)
    a("--mask-ratio", type=float, default=0.4, help="MIM: fraction of patches masked (blockwise)")
    a("--eval-split", default="test", help="held-out split for the final retrieval evaluation")
    a("--eval-images", type=int, default=None, help="limit the evaluation set's images")
    a("--rerank-k", type=int, default=16)
    a("--no-eval", action="store_true")
    return p


def stage_plan(args) -> List[str]:
    if args.stage != "all":
        return [args.stage]
    plan = list(STAGE_ORDER)
    if args.skip_text_stage:
        plan.remove("text")
    if args.init_beit:
        plan.remove("vision")
    return plan


def parse_loss_weights(text: Optional[str]) -> Dict[str, float]:
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--loss-weights: expected name=value items, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"--loss-weights: {k}={v!r} is not a number") from None
    unknown = set(out) - {"itc", "itm", "mlm"}
    if unknown:
        raise ValueError(f"--loss-weights: unknown objective(s) {sorted(unknown)}; expected itc, itm, mlm")
    return out


def validate_args(args) -> None:
    """Every check that needs no work: raise before a process group, model or data exists."""
    from .args import validate_common

    def bad(msg):
        raise ValueError(msg)
    validate_common(args)
    for name in ("vision_steps", "text_steps", "vl_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.hard_negative_warmup < 0:
        bad(f"--hard-negative-warmup must be >= 0, got {args.hard_negative_warmup}")
    if not 0.0 <= args.hard_negative_scale <= 1.0:
        bad(f"--hard-negative-scale must be in [0, 1], got {args.hard_negative_scale}")
    for stage in STAGE_ORDER:
        v = getattr(args, f"{stage}_lr")
        if v is not None and v <= 0:
            bad(f"--{stage}-lr must be > 0, got {v}")
    if not 0 < args.mlm_probability < 1 or not 0 < args.mask_ratio < 1:
        bad("--mlm-probability and --mask-ratio must be in (0, 1)")
    if args.itc_accum == "cached" and args.grad_accum < 2:
        bad("--itc-accum cached needs --grad-accum >= 2 (it spans the accumulated micro-batches)")
    if args.itc_accum == "cached" and args.skip_nonfinite:
        bad("--skip-nonfinite does not combine with --itc-accum cached (a cached ITC step spans "
            "every micro-batch; it cannot drop one)")
    parse_loss_weights(args.loss_weights)
    if args.model_overrides:
        try:
            ov = json.loads(args.model_overrides)
        except json.JSONDecodeError as e:
            bad(f"--model-overrides is not valid JSON: {e}")
        if not isinstance(ov, dict):
            bad("--model-overrides must be a JSON object")
        for key, flag, value in (("vl_expert", "--no-vl-expert", False if args.no_vl_expert else None),
                                 ("attention", "--attention", args.attention)):
            if value is not None and key in ov and ov[key] != value:
                bad(f"{flag} and --model-overrides disagree on {key} ({value!r} vs {ov[key]!r})")
    if args.data != "embedded":
        from ..data.sources import check_data_source
        try:
            check_data_source(args.data)   # a path, a shard pattern, pipe: or a URL; reads no shard
        except (FileNotFoundError, ImportError, ValueError) as e:
            bad(f"--data: {e} (use 'embedded' for the built-in data)")
    if args.tokenizer is not None:
        from ..data.tokenizer import resolve_tokenizer_source
        try:
            resolve_tokenizer_source(args.tokenizer)
        except (ValueError, FileNotFoundError) as e:
            bad(f"--tokenizer: {e}")
    for flag in ("init", "init_beit"):
        v = getattr(args, flag)
        if v is not None and not Path(v).exists():
            bad(f"--{flag.replace('_', '-')} {v}: no such file or folder")
    if args.init and not (Path(args.init) / "config.json").is_file():
        bad(f"--init {args.init}: not a save_pretrained folder (no config.json)")
    if args.init and args.init_beit:
        bad("give --init or --init-beit, not both")
    plan = stage_plan(args)
    if args.stage == "text" and not (args.init or args.init_beit or args.from_scratch):
        bad("--stage text needs vision weights: --init <vision stage's final/ folder> or "
            "--init-beit <BEiT checkpoint> (or --from-scratch to train text on a random model)")
    if args.stage == "vl" and not (args.init or args.init_beit or args.from_scratch):
        bad("--stage vl needs the previous stages' weights: --init <final/ folder> "
            "(or --from-scratch)")
    if args.stage == "vision" and args.init_beit:
        bad("--init-beit replaces the vision stage: run --stage text or all with it")
    if not plan:
        bad("nothing to run")


# --------------------------------------------------------------------------- the job

class Job:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)
        from .engine import init_distributed, resolve_bf16
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.bf16 = resolve_bf16(args.precision, self.device)

    def log(self, *msg):
        if self.is_main:
            print(*msg, flush=True)

    # -- data / model ------------------------------------------------------------------------
    def tokenizer(self):
        from ..data import build_tokenizer
        source = self.args.tokenizer or ("embedded" if self.args.data == "embedded" else None)
        if source is None:
            raise ValueError("--tokenizer is required with --data PATH (a vocabulary file or folder, "
                             "or train:CORPUS)")
        return build_tokenizer(source=source, vocab_size=self.args.vocab_size)

    def ablation_overrides(self) -> Dict:
        """The config fields the ablation flags set (--no-vl-expert, --attention)."""
        out = {}
        if self.args.no_vl_expert:
            out["vl_expert"] = False
        if self.args.attention is not None:
            out["attention"] = self.args.attention
        return out

    def base_config(self, tok):
        from ..config import VLMoConfig
        overrides = json.loads(self.args.model_overrides) if self.args.model_overrides else {}
        ablation = self.ablation_overrides()
        if self.args.init:
            cfg = VLMoConfig.from_json(Path(self.args.init) / "config.json")
            if self.args.preset and cfg.name != self.args.preset:
                raise ValueError(f"--init {self.args.init} holds a {cfg.name!r} model but --preset is "
                                 f"{self.args.preset!r}")
            if overrides:
                raise ValueError("--model-overrides cannot change a model loaded with --init")
            # the ablation flags may restate the checkpoint's model, never change it
            flags = {"vl_expert": "--no-vl-expert", "attention": "--attention"}
            for key, value in ablation.items():
                if getattr(cfg, key) != value:
                    raise ValueError(f"{flags[key]}: the --init checkpoint {self.args.init} holds a model "
                                     f"with {key}={getattr(cfg, key)!r}, not {value!r} (the flag cannot "
                                     "change a model loaded with --init)")
        else:
            cfg = VLMoConfig.preset(self.args.preset or "tiny", **{**overrides, **ablation})
            if "vocab_size" not in overrides:
                cfg = cfg.replace(vocab_size=tok.vocab_size)
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"the model's vocab_size ({cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({tok.vocab_size})")
        return cfg

    def stage_steps(self, stage):
        return getattr(self.args, f"{stage}_steps") or self.args.steps

    def stage_lr(self, stage):
        return getattr(self.args, f"{stage}_lr") or self.args.lr

    def run(self) -> Dict:
        args = self.args
        plan = stage_plan(args)
        tok = self.tokenizer()
        config = self.base_config(tok)
        self.log(f"vlmo_fast pretrain: stages {plan}, {self.world} process(es) on {self.device}, "
                 f"{'bf16' if self.bf16 else 'fp32'}, preset {config.name} "
                 f"(dim {config.dim}, depth {config.depth}, img {config.img_size}, vocab {config.vocab_size})")
        previous = args.init
        result = {}
        for stage in plan:
            final = self.out / stage / "final"
            if args.resume != "never" and (final / "DONE").is_file():
                self.log(f"[{stage}] finished earlier: {final}")
                previous = str(final)
                continue
            result[stage] = self.run_stage(stage, config, tok, previous)
            previous = str(final)
        if "vl" in plan and not args.no_eval:
            result["retrieval"] = self.evaluate(previous, tok)
        return result

    def build_model(self, stage, config, previous):
        from ..checkpoint import load_beit_state_dict, read_state_file
        from ..model import VLMo
        if previous is not None:
            # from_pretrained returns eval mode (HF convention): this model trains
            model = VLMo.from_pretrained(previous).train()
            if model.config.to_dict() != {**config.to_dict(), "name": model.config.name}:
                raise ValueError(f"{previous} holds a model whose config differs from this run's")
        else:
            model = VLMo(config)
            if self.args.init_beit and stage != "vision":
                load_beit_state_dict(model, read_state_file(self.args.init_beit, "--init-beit",
                                                            trust_pickle=self.args.trust_pickle))
        return model

    # -- one stage ---------------------------------------------------------------------------
    def run_stage(self, stage, config, tok, previous) -> Dict:
        from ..data import build_pretrain_loader
        from .common import seed_all
        from .engine import engine_from_args, gathered_state_dict
        from .loop import TrainLoop
        from .stages import prepare_stage
        from .step import PretrainStep, cached_itc_accumulation
        args = self.args
        stage_dir = self.out / stage
        total = self.stage_steps(stage)
        stage_seed = args.seed * 1000 + STAGE_ORDER.index(stage) * 100 + self.rank
        seed_all(stage_seed)

        model = self.build_model(stage, config, previous)
        prepare_stage(model, stage, args.ffn)
        if args.activation_checkpointing:
            model.set_grad_checkpointing(True)
        gen = torch.Generator(device=self.device).manual_seed(stage_seed + 7)
        step_module = PretrainStep(model, stage, hard_negatives=args.hard_negatives, layout=args.layout,
                                   loss_weights=parse_loss_weights(args.loss_weights),
                                   mlm_probability=args.mlm_probability, generator=gen,
                                   hard_negative_warmup=args.hard_negative_warmup,
                                   hard_negative_scale=args.hard_negative_scale).to(self.device)
        trainable = sum(p.numel() for p in step_module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in step_module.parameters() if not p.requires_grad)

        loader = build_pretrain_loader(
            source=args.data, tokenizer=tok, stage=stage, batch_size=args.batch_size,
            rank=self.rank, world=self.world, seed=args.seed + STAGE_ORDER.index(stage),
            world_seed=args.seed,
            img_size=config.img_size, patch_size=config.patch_size, max_text_len=config.max_text_len,
            split="train", num_workers=args.num_workers, mlm_probability=args.mlm_probability,
            mask_ratio=args.mask_ratio)
        engine, ds_config = engine_from_args(step_module, args, lr=self.stage_lr(stage), total_steps=total,
                                             bf16=self.bf16)
        accumulate = None
        if args.itc_accum == "cached" and stage == "vl":
            def accumulate(engine, micro):
                outs, _ = cached_itc_accumulation(engine, engine.backward, micro,
                                                  after_backward=lambda k: engine.step())
                return outs
        loop = TrainLoop(name=stage, title=f"{stage} stage", engine=engine, step_module=step_module,
                         loader=loader, out_dir=stage_dir, total_steps=total, args=args, rank=self.rank,
                         world=self.world, device=self.device, generators={"hard_negatives": gen}, ds_config=ds_config,
                         accumulate=accumulate, log=self.log)
        loop.resume()
        self.log(f"[{stage}] {trainable / 1e6:.3f}M trainable, {frozen / 1e6:.3f}M frozen parameters; "
                 f"{total} steps x {args.batch_size} x {args.grad_accum} accum x {self.world} procs; "
                 f"ZeRO-{ds_config['zero_optimization'].get('stage', 0)}")
        result = loop.run()

        # export: plain VLMo weights + tokenizer, then the DONE marker
        state = gathered_state_dict(engine, self.rank)
        final = stage_dir / "final"
        summary = {}
        if self.is_main:
            from ..model import VLMo
            export = VLMo(model.config)
            export.load_state_dict(state, strict=True)
            export.save_pretrained(final)
            tok.save(final)
            summary = {"stage": stage, "final": str(final), **result}
            atomic_write_json(final / "DONE", summary)
            last = result["last_metrics"]
            self.log(f"[{stage}] done: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()
                                                     if k in ("loss", "mim", "mlm", "itc", "itm", "itm_acc")))
            self.log(f"[{stage}] weights: {final}; curves: {stage_dir / 'curves.png'}")
        loop.finish()
        return summary

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, weights: str, tok) -> Dict:
        import torch.distributed as dist
        result = {}
        if self.is_main:
            from ..data import build_retrieval_eval_set
            from ..eval.retrieval import chance_recall, evaluate_retrieval
            from ..model import VLMo
            model = VLMo.from_pretrained(weights).to(self.device)
            c = model.config
            ev = build_retrieval_eval_set(source=self.args.data, tokenizer=tok, split=self.args.eval_split,
                                          img_size=c.img_size, max_text_len=c.max_text_len,
                                          num_images=self.args.eval_images, seed=self.args.seed)
            res = evaluate_retrieval(model, ev.images, ev.text_ids, ev.text_mask, ev.text_to_image,
                                     rerank_k=self.args.rerank_k, device=self.device)
            chance = chance_recall(ev.text_to_image, int(ev.images.shape[0]))
            result = {"split": self.args.eval_split, "weights": weights, **res.to_dict(), "chance": chance}
            path = self.out / f"retrieval_{self.args.eval_split}.json"
            atomic_write_json(path, result)
            print(f"zero-shot retrieval on the held-out '{self.args.eval_split}' split "
                  f"({res.num_images} images, {res.num_texts} captions):")
            print(res.summary())
            print("chance:   " + " ".join(f"{k}={100 * v:.2f}" for k, v in chance.items()))
            print(f"saved {path}")
        dist.barrier()
        return result


def run(args) -> Dict:
    validate_args(args)
    return Job(args).run()


def main(argv=None) -> Dict:
    from ..errors import run_or_exit
    return run_or_exit(lambda: run(build_parser().parse_args(argv)))
