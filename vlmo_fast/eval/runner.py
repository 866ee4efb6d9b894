"""Evaluate a checkpoint folder on one task: the code behind `train/evaluate.py` and
`python -m vlmo_fast evaluate`.

    python train/evaluate.py --task retrieval --checkpoint runs/tiny/vl/final --split test_comp
    python train/evaluate.py --task retrieval --checkpoint ckpt --data coco_karpathy.json \
        --split test --image-root /data/coco
    python train/evaluate.py --task zeroshot  --checkpoint ckpt --split test
    python train/evaluate.py --task vqa       --checkpoint vqa_ckpt     (fine-tuned, answer head)
    python train/evaluate.py --task nlvr2     --checkpoint nlvr2_ckpt   (fine-tuned, NLVR2 head)

The checkpoint is a `save_pretrained` folder (config.json + model.safetensors) with the
tokenizer saved beside it (vocab.txt), as `train/pretrain.py` writes to <stage>/final; a VQA
checkpoint also has answer_vocab.json, an NLVR2 one nlvr2_head.safetensors.

Data (all read through vlmo_fast.data): "embedded" (default) is the embedded world's
held-out splits: "val", "test" (i.i.d.) and "test_comp" (compositional: colour+shape pairs
never seen in training); or files: retrieval a Karpathy JSON / manifest, vqa a VQAv2
questions JSON (+ --annotations), nlvr2 an NLVR2 JSONL, zeroshot a class-per-folder tree.

Tasks on the embedded world:
- retrieval: scenes with all their captions (R@1/5/10, ITC and ITC+ITM re-rank);
- zeroshot: single-object scenes classified as "<colour> <shape>" (48 classes; --attribute
  shape / colour for 6 / 8) from the data layer's prompts; on test_comp every such object is
  a pair held out of training;
- vqa: one question per scene over the world's closed answer set (exact answers: score 1);
- nlvr2: a true/false statement about two scenes (balanced labels).
Unreadable samples are errors here (training substitutes them; an evaluation must not).
The result (metrics, chance, sizes, model fingerprint, wall time) is printed and, with
--out, written atomically as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch

TASKS = ("retrieval", "vqa", "nlvr2", "zeroshot")
ANSWER_VOCAB_FILE = "answer_vocab.json"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--task", required=True, choices=TASKS)
    a("--checkpoint", required=True, help="save_pretrained folder (config.json, model.safetensors, vocab.txt)")
    a("--data", default="embedded",
      help='"embedded" (held-out splits of the embedded world), or a file: retrieval a Karpathy JSON / '
           'manifest, vqa a VQAv2 questions JSON (+ --annotations), nlvr2 an NLVR2 JSONL, zeroshot a '
           'folder with one subfolder per class')
    a("--split", default="test", help='embedded: val | test | test_comp; Karpathy JSON: its split name')
    a("--image-root", default=None, help="folder the data file's image paths are relative to")
    a("--annotations", default=None, help="vqa with --data questions.json: the VQAv2 annotations JSON")
    a("--attribute", default="colour_shape", choices=("colour_shape", "shape", "colour"),
      help="zeroshot on the embedded world: what the classes are")
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


def _source(args):
    if args.data == "embedded":
        from ..data import SPLITS
        if args.split not in SPLITS:
            raise ValueError(f"--split must be one of {SPLITS} for the embedded world, got {args.split!r}")
        return "embedded"
    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} not found")
    return path


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
    ev = build_retrieval_eval_set(_source(args), tok, split=args.split, img_size=c.img_size,
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


def run_zeroshot(args, device) -> Dict:
    from ..data import build_zero_shot_eval_set
    from ..model import VLMo
    from .zeroshot import evaluate_zeroshot
    checkpoint = Path(args.checkpoint)
    model = VLMo.from_pretrained(checkpoint).to(device)
    tok = _tokenizer(checkpoint)
    zs = build_zero_shot_eval_set(_source(args), args.split, img_size=model.config.img_size,
                                  num_images=args.num_items or 200, attribute=args.attribute,
                                  seed=args.seed)
    out = evaluate_zeroshot(model, tok, zs.images, zs.labels, zs.class_names, zs.prompts,
                            batch_size=args.batch_size, device=device, progress=not args.no_progress)
    chance = out.pop("chance")
    ks = [k for k in out if k.startswith("top")]
    return {"model": model, "metrics": {k: out[k] for k in ks},
            "chance": {k: min(1.0, int(k[3:]) * chance) for k in ks},
            "sizes": {"images": out["num_images"], "classes": out["num_classes"]},
            "protocol": {"prompts": list(zs.prompts), "attribute": args.attribute,
                         "classes": list(zs.class_names)}}


def _task_loader(args, task: str, tok, config, **options):
    from ..data.tasks import build_task_loader
    if args.annotations:
        options["annotations"] = args.annotations
    if args.image_root:
        options["image_root"] = args.image_root
    # evaluation must not substitute unreadable samples (the data layer's training default)
    return build_task_loader(task, _source(args), tok, args.split, args.batch_size, seed=args.seed,
                             img_size=config.img_size, max_text_len=config.max_text_len,
                             num_samples=args.num_items, shuffle=False, skip_bad=False, **options)


def _progress_over(loader, enabled: bool, desc: str):
    from .retrieval import _progress
    return _progress(loader, enabled, desc, len(loader))


def run_vqa(args, device) -> Dict:
    from ..model import VLMo
    from .vqa import evaluate_vqa_batches
    checkpoint = Path(args.checkpoint)
    model = VLMo.from_pretrained(checkpoint).to(device)
    if model.classifier is None:
        raise ValueError(f"{checkpoint} has no answer classifier (config.num_classes = 0): fine-tune it "
                         "for VQA first (train/finetune.py --task vqa)")
    tok = _tokenizer(checkpoint)
    saved = checkpoint / ANSWER_VOCAB_FILE
    options = {}
    if saved.is_file():
        options["answer_vocab"] = json.loads(saved.read_text())
    elif args.data != "embedded":
        raise FileNotFoundError(f"{saved} is missing: a VQAv2 evaluation needs the answer vocabulary the "
                                "model was fine-tuned with")
    loader = _task_loader(args, "vqa", tok, model.config, **options)
    vocab = loader.answer_vocab
    if len(vocab) != model.config.num_classes:
        raise ValueError(f"the model classifies over {model.config.num_classes} answers but the answer "
                         f"vocabulary has {len(vocab)}: fine-tuned on other answers?")
    if saved.is_file() and args.data == "embedded" and options["answer_vocab"] != list(vocab):
        raise ValueError(f"{saved} differs from the embedded world's answer vocabulary")
    counts = torch.zeros(len(vocab))
    targets_seen = []

    def batches():
        for batch in _progress_over(loader, not args.no_progress, "VQA"):
            counts.add_(batch["vqa_targets"].sum(0))
            targets_seen.append(batch["vqa_targets"].shape[0])
            yield batch

    out = evaluate_vqa_batches(model, batches(), device=device)
    # chance: always answering the answer with the largest total score on this split
    return {"model": model, "metrics": {"vqa_score": out["vqa_score"]},
            "chance": {"vqa_score": float(counts.max()) / max(1, sum(targets_seen))},
            "sizes": {"questions": out["num_questions"], "answers": len(vocab)},
            "upper_bound": {"vqa_score": out["upper_bound"]},
            "protocol": {"score": "VQAv2 accuracy: min(#humans/3, 1) averaged over annotator "
                                  "subsets (0.3/0.6/0.9/1); embedded answers are exact (1)"}}


def run_nlvr2(args, device) -> Dict:
    from .nlvr2 import NLVR2Model, evaluate_nlvr2_batches
    checkpoint = Path(args.checkpoint)
    model = NLVR2Model.from_pretrained(checkpoint).to(device)
    tok = _tokenizer(checkpoint)
    loader = _task_loader(args, "nlvr2", tok, model.config)
    positives = []

    def batches():
        for batch in _progress_over(loader, not args.no_progress, "NLVR2"):
            positives.append(batch["labels"])
            yield batch

    out = evaluate_nlvr2_batches(model, batches(), device=device)
    rate = float(torch.cat(positives).float().mean())
    return {"model": model, "metrics": {"accuracy": out["accuracy"]},
            "chance": {"accuracy": max(rate, 1 - rate)},
            "sizes": {"examples": out["num_examples"]}, "protocol": {"chance": "majority label"}}


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


_PROTOCOL_NAMES = {"itc": "ITC", "itc_itm_rerank": "ITC+ITM re-rank"}


def _metric_rows(result: Dict):
    """(row label, value, chance) of one result JSON, in table order. Also takes the bare
    `RetrievalResult.to_dict()` (+ "split", "chance") that train/pretrain.py writes."""
    if "task" not in result and "itc" in result:
        result = {**result, "task": "retrieval",
                  "metrics": {"itc": result["itc"], "itc_itm_rerank": result.get("rerank")}}
    for key in ("task", "metrics", "split"):
        if key not in result:
            raise ValueError(f"not an evaluation result (no {key!r}): keys {sorted(result)[:8]}")
    task, metrics, chance = result["task"], result["metrics"], result.get("chance", {})
    if task == "retrieval":
        for proto, values in metrics.items():
            if values is None:
                continue
            # i2t before t2i, then by K (JSON files may hold the keys sorted as strings)
            order = sorted((k for k in values if k != "mean"),
                           key=lambda k: (k.split("_r")[0], int(k.split("_r")[1])))
            for key in order:
                yield (f"retrieval {_PROTOCOL_NAMES.get(proto, proto)} {key.replace('_r', ' R@')}",
                       values[key], chance.get(key))
    else:
        for key, value in metrics.items():
            yield f"{task} {key}", value, chance.get(key)


def _checkpoint_label(result) -> str:
    """A short name for the checkpoint a result came from: its folder, without a trailing
    `final` (runs/ft-vqa/final -> ft-vqa, runs/demo/vl/final -> demo/vl)."""
    parts = Path(str(result.get("checkpoint", "?"))).parts
    if parts and parts[-1] == "final":
        parts = parts[:-1]
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2] not in ("runs", ".") else (parts[-1] if parts else "?")


def results_table(results) -> str:
    """Markdown table of evaluation results (dicts as `run` returns / --out writes): one row
    per task metric, one column per split, then chance (of the first split that has it)."""
    splits, rows, chance = [], {}, {}
    # several checkpoints (pretrained, fine-tuned) may report the same task: their rows are
    # told apart by the checkpoint's name, never merged
    several = len({_checkpoint_label(r) for r in results}) > 1
    for r in results:
        rows_of_r = list(_metric_rows(r))   # validates the result first
        if r["split"] not in splits:
            splits.append(r["split"])
        for label, value, ch in rows_of_r:
            if several:
                label = f"{_checkpoint_label(r)}: {label}"
            rows.setdefault(label, {})[r["split"]] = value
            if ch is not None:
                chance.setdefault(label, ch)
    head = "| metric | " + " | ".join(splits) + " | chance |"
    lines = [head, "|" + "---|" * (len(splits) + 2)]
    for label, by_split in rows.items():
        cells = [f"{100 * by_split[s]:.1f}" if s in by_split else "-" for s in splits]
        ch = chance.get(label)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'-' if ch is None else f'{100 * ch:.1f}'} |")
    return "\n".join(lines) + "\n"


def table_main(argv=None) -> str:
    """`python train/results_table.py results/*.json`: print the markdown table."""
    parser = argparse.ArgumentParser(prog="results_table", description="Markdown table of evaluate.py "
                                     "--out JSON files (percent; one column per split)")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    results = []
    for f in args.files:
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: {f}: {exc}", file=sys.stderr)
            raise SystemExit(2)
    try:
        table = results_table(results)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    print(table, end="")
    return table


def main(argv=None) -> Dict:
    from ..errors import run_or_exit
    return run_or_exit(run, build_parser().parse_args(argv))
