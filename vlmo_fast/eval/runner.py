"""Evaluate a checkpoint folder on one task: the code behind `train/evaluate.py` and
`python -m vlmo_fast evaluate`.

    python train/evaluate.py --task retrieval --checkpoint runs/tiny/vl/final --split test_comp
    python train/evaluate.py --task retrieval --checkpoint ckpt --data coco_karpathy.json \
        --split test --image-root /data/coco
    python train/evaluate.py --task zeroshot  --checkpoint ckpt --split test
    python train/evaluate.py --task vqa       --checkpoint vqa_ckpt     (fine-tuned, answer head)
    python train/evaluate.py --task nlvr2     --checkpoint nlvr2_ckpt   (fine-tuned, NLVR2 head)

The checkpoint is a `save_pretrained` folder (config.json + model.safetensors) with the
tokenizer saved beside it (vocab.txt), as `train/pretrain.py` writes to <stage>/final.
Data: "embedded" (default) uses the held-out splits of the embedded world: "val", "test"
(i.i.d.) and "test_comp" (compositional: colour+shape pairs never seen in training);
retrieval also reads a Karpathy JSON or a manifest (through the data layer).

Tasks on the embedded world:
- retrieval: scenes and all their captions (R@1/5/10, ITC and ITC+ITM re-rank);
- zeroshot: the scenes with exactly one object, classified as "<colour> <shape>" among all
  48 pairs from the prompts `ZEROSHOT_TEMPLATES` (on test_comp every such object is a pair
  held out of training);
- vqa: one question per scene, answer vocabulary = the world's (`world.answer_vocab`); the
  embedded answers are exact, so each question's single answer gets soft score 1;
- nlvr2: a statement about two scenes, true/false.
The result (metrics, chance, sizes, model fingerprint, wall time) is printed and, with
--out, written atomically as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

TASKS = ("retrieval", "vqa", "nlvr2", "zeroshot")
ZEROSHOT_TEMPLATES = ("a {}", "there is a {}", "one object: {}")
ANSWER_VOCAB_FILE = "answer_vocab.json"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--task", required=True, choices=TASKS)
    a("--checkpoint", required=True, help="save_pretrained folder (config.json, model.safetensors, vocab.txt)")
    a("--data", default="embedded",
      help='"embedded" (held-out splits of the embedded world) or, for retrieval, a Karpathy JSON / manifest')
    a("--split", default="test", help='embedded: val | test | test_comp; Karpathy JSON: its split name')
    a("--image-root", default=None, help="folder the Karpathy JSON's image paths are relative to")
    a("--num-items", type=int, default=None,
      help="evaluate the first N images / questions / pairs of the split (default: all)")
    a("--seed", type=int, default=0, help="seed of the embedded world (as in pretraining)")
    a("--batch-size", type=int, default=64)
    a("--rerank-k", type=int, default=16, help="retrieval: ITM re-rank of the top k ITC candidates (0: off)")
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    a("--out", default=None, help="write the result JSON to this file (atomically)")
    a("--no-progress", action="store_true", help="no progress bars")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="evaluate", description="Evaluate a VLMo checkpoint: retrieval, VQA, NLVR2 or zero-shot "
                                     "classification (see vlmo_fast/eval/runner.py)."))


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _tokenizer(checkpoint: Path):
    from ..data import WordPieceTokenizer
    if not (checkpoint / "vocab.txt").is_file():
        raise FileNotFoundError(f"{checkpoint} has no vocab.txt: save the tokenizer beside the weights "
                                "(tokenizer.save(folder); train/pretrain.py does)")
    return WordPieceTokenizer.load(checkpoint)


def _embedded_world(args):
    from ..data import EmbeddedWorld, SPLITS
    if args.split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS} for the embedded world, got {args.split!r}")
    return EmbeddedWorld(args.seed)


def _count(args, world) -> int:
    n = world.split_size(args.split) if args.num_items is None else args.num_items
    if n < 1:
        raise ValueError(f"--num-items must be >= 1, got {n}")
    return n


def _render(scenes, img_size: int) -> torch.Tensor:
    from ..data import render_scenes
    return torch.from_numpy(render_scenes(scenes, img_size))


def _require_embedded(args) -> None:
    if args.data != "embedded":
        raise ValueError(f"--task {args.task} reads only the embedded world so far (--data embedded); "
                         "VQAv2 / NLVR2 file readers belong to the data layer")


# -- tasks -----------------------------------------------------------------------------------
def run_retrieval(args, device) -> Dict:
    from ..data import build_retrieval_eval_set
    from ..model import VLMo
    from .retrieval import chance_recall, evaluate_retrieval
    checkpoint = Path(args.checkpoint)
    model = VLMo.from_pretrained(checkpoint).to(device)
    tok = _tokenizer(checkpoint)
    c = model.config
    options = {"image_root": args.image_root} if args.image_root else {}
    source = args.data if args.data == "embedded" else Path(args.data)
    ev = build_retrieval_eval_set(source, tok, split=args.split, img_size=c.img_size,
                                  max_text_len=c.max_text_len, num_images=args.num_items,
                                  seed=args.seed, **options)
    res = evaluate_retrieval(model, ev.images, ev.text_ids, ev.text_mask, ev.text_to_image,
                             batch_size=args.batch_size, rerank_k=args.rerank_k, device=device,
                             progress=not args.no_progress)
    return {"model": model, "metrics": {"itc": res.itc, "itc_itm_rerank": res.rerank},
            "chance": chance_recall(ev.text_to_image, res.num_images),
            "sizes": {"images": res.num_images, "texts": res.num_texts},
            "timing": {"itc_seconds": res.itc_seconds, "rerank_seconds": res.rerank_seconds},
            "protocol": {"rerank_k": res.rerank_k, "itm_score": res.itm_score,
                         "final_score": "ITM positive logit + ITC cosine (reference)"},
            "summary": res.summary()}


def zeroshot_classes() -> List[str]:
    from ..data import COLOURS, SHAPES
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def run_zeroshot(args, device) -> Dict:
    from ..model import VLMo
    from .zeroshot import evaluate_zeroshot
    _require_embedded(args)
    checkpoint = Path(args.checkpoint)
    model = VLMo.from_pretrained(checkpoint).to(device)
    tok = _tokenizer(checkpoint)
    world = _embedded_world(args)
    classes = zeroshot_classes()
    scenes = [s for s in (world.scene(args.split, i) for i in range(_count(args, world)))
              if len(s.objects) == 1]
    if not scenes:
        raise ValueError(f"no single-object scenes among the first {_count(args, world)} of {args.split!r}; "
                         "raise --num-items")
    labels = torch.tensor([classes.index(f"{s.objects[0].colour} {s.objects[0].shape}") for s in scenes])
    out = evaluate_zeroshot(model, tok, _render(scenes, model.config.img_size), labels, classes,
                            ZEROSHOT_TEMPLATES, batch_size=args.batch_size, device=device,
                            progress=not args.no_progress)
    chance = out.pop("chance")
    ks = [k for k in out if k.startswith("top")]
    return {"model": model, "metrics": {k: out[k] for k in ks},
            "chance": {k: min(1.0, int(k[3:]) * chance) for k in ks},
            "sizes": {"images": out["num_images"], "classes": out["num_classes"]},
            "protocol": {"templates": list(ZEROSHOT_TEMPLATES), "classes": "colour shape pairs"}}


def run_vqa(args, device) -> Dict:
    from ..model import VLMo
    from .vqa import evaluate_vqa, vqa_soft_scores
    _require_embedded(args)
    checkpoint = Path(args.checkpoint)
    model = VLMo.from_pretrained(checkpoint).to(device)
    if model.classifier is None:
        raise ValueError(f"{checkpoint} has no answer classifier (config.num_classes = 0): fine-tune it "
                         "for VQA first (train/finetune.py --task vqa)")
    tok = _tokenizer(checkpoint)
    world = _embedded_world(args)
    vocab = world.answer_vocab
    saved = checkpoint / ANSWER_VOCAB_FILE
    if saved.is_file() and json.loads(saved.read_text()) != vocab:
        raise ValueError(f"{saved} differs from the embedded world's answer vocabulary: the model was "
                         "fine-tuned on other answers")
    items = [world.vqa_item(args.split, i) for i in range(_count(args, world))]
    ids, mask = tok.encode_batch([it["question"] for it in items], max_len=model.config.max_text_len)
    targets = vqa_soft_scores([[it["answer"]] * 3 for it in items], world.answer_to_id)
    out = evaluate_vqa(model, _render([it["scene"] for it in items], model.config.img_size), ids, mask,
                       targets, batch_size=args.batch_size, device=device, progress=not args.no_progress)
    # chance: always answering the split's most common answer
    counts = torch.bincount(targets.argmax(1), minlength=len(vocab))
    return {"model": model, "metrics": {"vqa_score": out["vqa_score"]},
            "chance": {"vqa_score": float(counts.max()) / len(items)},
            "sizes": {"questions": len(items), "answers": len(vocab)},
            "protocol": {"score": "min(#humans/3, 1); embedded answers are exact (score 1)"}}


def run_nlvr2(args, device) -> Dict:
    from .nlvr2 import NLVR2Model, evaluate_nlvr2
    _require_embedded(args)
    checkpoint = Path(args.checkpoint)
    model = NLVR2Model.from_pretrained(checkpoint).to(device)
    tok = _tokenizer(checkpoint)
    world = _embedded_world(args)
    items = [world.nlvr2_item(args.split, i) for i in range(_count(args, world))]
    size = model.config.img_size
    left = _render([it["scenes"][0] for it in items], size)
    right = _render([it["scenes"][1] for it in items], size)
    ids, mask = tok.encode_batch([it["statement"] for it in items], max_len=model.config.max_text_len)
    labels = torch.tensor([it["label"] for it in items])
    out = evaluate_nlvr2(model, ids, mask, left, right, labels, batch_size=args.batch_size,
                         device=device, progress=not args.no_progress)
    majority = max(float(labels.float().mean()), 1 - float(labels.float().mean()))
    return {"model": model, "metrics": {"accuracy": out["accuracy"]}, "chance": {"accuracy": majority},
            "sizes": {"examples": len(items)}, "protocol": {"chance": "majority label"}}


RUNNERS = {"retrieval": run_retrieval, "zeroshot": run_zeroshot, "vqa": run_vqa, "nlvr2": run_nlvr2}


def run(args) -> Dict:
    """Run one evaluation; returns the JSON-ready result (also written to args.out)."""
    from ..inference import model_fingerprint
    from ..io import atomic_write_json
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: not a save_pretrained folder (no config.json)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    t0 = time.perf_counter()
    out = RUNNERS[args.task](args, device)
    seconds = time.perf_counter() - t0
    model = out.pop("model")
    summary = out.pop("summary", None)
    result = {"task": args.task, "data": str(args.data), "split": args.split, "seed": args.seed,
              "checkpoint": str(checkpoint), "model_hash": model_fingerprint(model),
              "device": str(device), "seconds": seconds, **out}
    if args.out:
        atomic_write_json(args.out, result)
    lines = [f"{args.task} on {args.data}:{args.split} ({', '.join(f'{k} {v}' for k, v in out['sizes'].items())})"]
    lines.append(summary if summary else
                 "result: " + " ".join(f"{k}={100 * v:.2f}" for k, v in out["metrics"].items()))
    lines.append("chance: " + " ".join(f"{k}={100 * v:.2f}" for k, v in out["chance"].items()))
    if args.out:
        lines.append(f"saved {args.out}")
    print("\n".join(lines))
    return result


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
