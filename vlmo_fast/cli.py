"""`vlmo-fast` / `python -m vlmo_fast`: embeddings, retrieval index, search, evaluation,
checkpoint conversion and export from the command line.

    vlmo-fast encode   --checkpoint CKPT --images a.png b.png --out img.npy
    vlmo-fast encode   --checkpoint CKPT --texts "a red circle" "two squares" --out txt.npy
    vlmo-fast index    --checkpoint CKPT --images photos/ --out photos.index
    vlmo-fast index    --checkpoint CKPT --images photos/ --out photos.index --faiss ivf --nprobe 16
    vlmo-fast search   --checkpoint CKPT --index photos.index --text "a red circle" -k 5
    vlmo-fast evaluate --task retrieval --checkpoint CKPT --split test_comp
    vlmo-fast convert  --from vlmo_base.pth --to ckpt/ --preset base      (reference -> ours)
    vlmo-fast convert  --from ckpt/ --to vlmo_ref.pth                       (ours -> reference)
    vlmo-fast export   --checkpoint CKPT --onnx onnx/ [--hf hf_folder/]   (--hf: transformers folder)
    vlmo-fast plan     --preset base --gpus 64 --gpu h100 --batch-size 1024 --zero 2 \
                       --pairs 4e6 --steps 200000                   (capacity plan, modelled)

CKPT is a save_pretrained folder (config.json + model.safetensors, tokenizer vocab.txt beside
them for texts), or a folder written by `export --hf`. Optional extras: `--faiss` (and
searching a FAISS index) needs vlmo_fast[faiss], `--hf` needs vlmo_fast[hf]. Exit status (`vlmo_fast.errors`): 0 done; 2 bad input (argument, file or
data), with one line `error: ...` on stderr; anything else is a bug and prints a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator, List, Optional

from .errors import run_or_exit

# optional dependency (top-level module) -> the vlmo_fast extra that installs it
EXTRAS = {"faiss": "faiss", "transformers": "hf"}
FAISS_KNOBS = ("nprobe", "ef_search", "rerank")


@contextlib.contextmanager
def _needs_extra(what: str) -> Iterator[None]:
    """A missing optional dependency is bad input (exit 2, one line naming the extra), not a
    traceback; any other ImportError stays a bug."""
    try:
        yield
    except ImportError as e:
        module = (e.name or "").split(".")[0]
        if module not in EXTRAS:
            raise
        raise ValueError(f"{what} needs {module}, which is not installed: "
                         f"pip install 'vlmo_fast[{EXTRAS[module]}]'") from None


# -- encode ----------------------------------------------------------------------------------
def _image_inputs(spec: List[str]):
    """--images: one folder, one manifest, or image files -> (paths, ids)."""
    from .index import resolve_corpus
    if len(spec) == 1 and (Path(spec[0]).is_dir() or Path(spec[0]).suffix.lower() in
                           (".txt", ".csv", ".tsv", ".jsonl", ".json")):
        return resolve_corpus(spec[0])
    for p in spec:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image file not found: {p}")
    return list(spec), list(spec)


def _read_texts(args) -> List[str]:
    if args.texts_file:
        path = Path(args.texts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--texts-file {path} not found")
        try:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--texts-file {path}: not UTF-8 text ({e})") from None
        if not texts:
            raise ValueError(f"--texts-file {path} holds no text (one text per line)")
        return texts
    return list(args.texts)


def _encoder(args, texts: bool = False):
    """The checkpoint's Encoder; texts=True: the queries are texts, so the tokenizer saved
    beside the weights is required (checked before the weights load)."""
    from .inference import Encoder
    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt}: not a save_pretrained folder (no config.json)")
    if texts and not (ckpt / "vocab.txt").is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt} has no vocab.txt: texts need the tokenizer the model "
                                "was trained with, saved beside the weights (tokenizer.save(folder), or "
                                "`vlmo-fast convert ... --vocab VOCAB`)")
    return Encoder.from_pretrained(ckpt, device=args.device, batch_size=args.batch_size,
                                   progress=not args.no_progress)


def cmd_encode(args) -> int:
    import numpy as np
    from .io import atomic_write, atomic_write_json
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must end in .npy, got {out}")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the path of a .npy file")
    encoder = _encoder(args, texts=not args.images)
    if args.images:
        images, ids = _image_inputs(args.images)
        emb = encoder.embed_images(images)
        kind = "image"
    else:
        ids = _read_texts(args)
        emb = encoder.embed_texts(ids)
        kind = "text"
    data = emb.numpy()

    def write(tmp: str):
        with open(tmp, "wb") as f:
            np.save(f, data)

    atomic_write(out, write)
    atomic_write_json(out.with_suffix(".json"), {"kind": kind, "ids": [str(i) for i in ids],
                                                 "shape": list(data.shape),
                                                 "model_hash": encoder.fingerprint})
    print(f"{len(ids)} {kind} embeddings of size {data.shape[1]} -> {out} (+ {out.with_suffix('.json').name})")
    return 0


# -- index / search --------------------------------------------------------------------------
def _faiss_knobs(args) -> dict:
    """--nprobe / --ef-search / --rerank that were given."""
    return {name: getattr(args, name) for name in FAISS_KNOBS if getattr(args, name) is not None}


def _knob_flags(knobs: dict) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in knobs)


def cmd_index(args) -> int:
    from .index import RetrievalIndex, backend_class
    knobs = _faiss_knobs(args)
    if knobs and not args.faiss:
        raise ValueError(f"{_knob_flags(knobs)}: search settings of a FAISS index; add --faiss KIND")
    backend = "faiss" if args.faiss else "exact"
    with _needs_extra("--faiss"):
        backend_class(backend)   # before the weights load and the images are embedded
    encoder = _encoder(args)
    images, ids = _image_inputs(args.images)
    options = dict(kind=args.faiss, **knobs) if args.faiss else {}
    index = RetrievalIndex.build(encoder, images, ids=ids, directory=args.out, backend=backend, **options)
    what = f"FAISS {index.factory}" if args.faiss else "exact"
    print(f"indexed {len(index)} images ({what}, {index.dim}-d, model {index.model_hash}) -> {args.out}")
    return 0


def cmd_search(args) -> int:
    from .index import RetrievalIndex
    encoder = _encoder(args, texts=bool(args.text))
    with _needs_extra(f"--index {args.index} (a FAISS index)"):
        index = RetrievalIndex.load(args.index, encoder=encoder, verify=not args.no_verify)
    knobs = _faiss_knobs(args)
    if knobs and index.backend != "faiss":
        raise ValueError(f"{_knob_flags(knobs)}: search settings of a FAISS index, but --index {args.index} "
                         f"is an {index.backend} index")
    if args.text:
        queries, hits = args.text, index.search_text(encoder, args.text, k=args.k, **knobs)
    else:
        queries, hits = args.image, index.search_image(encoder, args.image, k=args.k, **knobs)
    if args.json:
        print(json.dumps([{"query": q, "hits": [{"id": i, "score": s} for i, s in h]}
                          for q, h in zip(queries, hits)], indent=2))
    else:
        for q, h in zip(queries, hits):
            print(f"{q}:")
            for rank, (i, s) in enumerate(h, 1):
                print(f"  {rank:3d}. {s:+.4f}  {i}")
    return 0


# -- evaluate --------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from .eval.runner import run
    run(args)
    return 0


# -- convert ---------------------------------------------------------------------------------
def _load_torch_checkpoint(path: Path, trust_pickle: bool):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trust_pickle:
            raise ValueError(f"{path} could not be read as plain tensors ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); if you trust the file, pass "
                             "--trust-pickle to unpickle it fully") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def cmd_convert(args) -> int:
    import torch
    from .checkpoint import export_reference_state_dict, load_reference_state_dict
    from .config import VLMoConfig
    from .io import atomic_write
    from .model import VLMo
    src, dst = Path(args.source), Path(args.target)
    if src.is_dir():   # ours -> reference
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"--from {src}: not a save_pretrained folder (no config.json)")
        if dst.is_dir():
            raise IsADirectoryError(f"--to {dst} is a folder; converting a save_pretrained folder writes one "
                                    "reference checkpoint file: give a .pth path")
        if dst.exists() and not args.overwrite:
            raise FileExistsError(f"--to {dst} exists; pass --overwrite to replace it")
        model = VLMo.from_pretrained(src)
        state = export_reference_state_dict(model)
        atomic_write(dst, lambda tmp: torch.save({"state_dict": state}, tmp))
        print(f"reference state_dict ({len(state)} tensors) -> {dst}")
        return 0
    if not src.is_file():
        raise FileNotFoundError(f"--from {src} not found")
    if (args.preset is None) == (args.config is None):
        raise ValueError("converting a reference checkpoint needs exactly one of --preset NAME or --config JSON "
                         "(the architecture is not stored in it)")
    if args.config and not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config} not found")
    config = VLMoConfig.preset(args.preset) if args.preset else VLMoConfig.from_json(Path(args.config))
    tokenizer = None
    if args.vocab:   # read before the weights: a bad --vocab fails before any work
        from .data import WordPieceTokenizer
        tokenizer = WordPieceTokenizer.load(args.vocab)
    overrides = {}
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if overrides:
        config = config.replace(**overrides)
    model = VLMo(config)
    missing, unexpected = load_reference_state_dict(model, _load_torch_checkpoint(src, args.trust_pickle),
                                                    strict=not args.non_strict)
    from .export import staged_directory
    with staged_directory(dst, overwrite=args.overwrite) as stage:
        model.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save(stage)
    print(f"{src} -> {dst} (preset {config.name})" +
          (f"; not in the checkpoint: {len(missing)}, ignored: {len(unexpected)}" if missing or unexpected else ""))
    return 0


# -- export ----------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .export import check_onnx, export_onnx
    from .model import VLMo
    if not args.onnx and not args.hf:
        raise ValueError("export needs --onnx DIR and/or --hf DIR")
    if args.hf:
        with _needs_extra("--hf (a transformers folder)"):
            from .hf import export_hf   # before any work
    ckpt = Path(args.checkpoint)
    model = VLMo.from_pretrained(ckpt)
    if args.onnx:
        export_onnx(model, args.onnx, overwrite=args.overwrite, exporter=args.onnx_exporter)
        line = f"ONNX towers -> {args.onnx}"
        try:
            diffs = check_onnx(model, args.onnx)
            line += "; max |onnxruntime - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        except ImportError:
            line += " (onnxruntime not installed: not checked)"
        print(line)
    if args.hf:
        tokenizer = None
        if (ckpt / "vocab.txt").is_file():
            from .data import WordPieceTokenizer
            tokenizer = WordPieceTokenizer.load(ckpt)
        export_hf(model, args.hf, tokenizer, overwrite=args.overwrite)
        print(f"transformers folder (AutoModel.from_pretrained; trust_remote_code=True without vlmo_fast) "
              f"-> {args.hf}")
    return 0


# -- parser ----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="save_pretrained folder")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the weights load: cpu)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")


def _faiss_arguments(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument("--nprobe", type=int, default=None, help=f"IVF lists visited per query ({scope})")
    p.add_argument("--ef-search", type=int, default=None, help=f"HNSW candidate list size ({scope})")
    p.add_argument("--rerank", type=int, default=None,
                   help=f"fetch R x k candidates and score them exactly from the stored embeddings ({scope})")


def build_parser() -> argparse.ArgumentParser:
    from .eval.runner import add_arguments
    parser = argparse.ArgumentParser(prog="vlmo-fast", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("encode", help="L2-normalised embeddings of images or texts -> .npy (+ ids .json)")
    _common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--images", nargs="+", help="image files, or one folder / manifest")
    group.add_argument("--texts", nargs="+", help="texts (quote each)")
    group.add_argument("--texts-file", help="a file with one text per line")
    p.add_argument("--out", required=True, help="output .npy; ids and model hash go to the same name .json")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("index", help="build a retrieval index of images (folder, manifest or files)")
    _common(p)
    p.add_argument("--images", nargs="+", required=True, help="a folder, a manifest, or image files")
    p.add_argument("--out", required=True, help="index folder (created, or rebuilt atomically)")
    p.add_argument("--faiss", default=None, metavar="KIND",
                   help="a FAISS index (vlmo_fast[faiss]): flat (exact), ivf, ivfpq, hnsw, or a "
                        "faiss.index_factory string such as IVF1024,PQ32; default: the exact scan")
    _faiss_arguments(p, "the index's default")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="top-k images of an index for texts or images")
    _common(p)
    p.add_argument("--index", required=True, help="index folder (from `index`)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", nargs="+", help="text queries")
    group.add_argument("--image", nargs="+", help="image queries (files)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of the index's files (a trusted local index; sizes and "
                        "shapes are still checked)")
    _faiss_arguments(p, "for this search (a FAISS index); default: the index's own")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("evaluate", help="retrieval / vqa / nlvr2 / zeroshot evaluation of a checkpoint")
    add_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("convert", help="reference VLMo checkpoint <-> save_pretrained folder")
    p.add_argument("--from", dest="source", required=True,
                   help="a reference .pth/.ckpt (-> ours) or a save_pretrained folder (-> reference)")
    p.add_argument("--to", dest="target", required=True, help="output folder (ours) or .pth file (reference)")
    p.add_argument("--preset", default=None, help="architecture of a reference checkpoint: base, large, base_plus")
    p.add_argument("--config", default=None, help="or a config.json with the architecture")
    p.add_argument("--img-size", type=int, default=None, help="resolution the checkpoint was trained at")
    p.add_argument("--num-classes", type=int, default=None, help="VQA answer head size, if it has one")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (or tokenizer folder) to save beside the weights")
    p.add_argument("--non-strict", action="store_true", help="load the matching part, report the rest")
    p.add_argument("--trust-pickle", action="store_true", help="allow a full (unsafe) unpickle of the .pth")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --to folder or file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="ONNX image/text towers and/or a transformers (Hugging Face) folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", default=None, help="folder for image_encoder.onnx + text_encoder.onnx")
    p.add_argument("--onnx-exporter", default="torchscript", choices=("torchscript", "dynamo"),
                   help="torch's ONNX exporter: TorchScript tracing or torch.export (needs onnxscript)")
    p.add_argument("--hf", default=None,
                   help="transformers folder (vlmo_fast[hf]): AutoModel.from_pretrained after `import "
                        "vlmo_fast`, or trust_remote_code=True without it; VLMo.from_pretrained reads it too")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    from .plan import add_parser as add_plan_parser   # `vlmo-fast plan`: the capacity planner
    add_plan_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns 0 when done. Bad input raises SystemExit(2) after one line
    on stderr (`vlmo_fast.errors.run_or_exit`), as argparse does for a bad flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "k", 1) < 1:
        parser.error(f"-k must be >= 1, got {args.k}")
    return run_or_exit(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
