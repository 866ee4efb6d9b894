"""Data-loading throughput: items/s of the stage-3 ("vl") pretraining loader per worker count,
at the tiny preset's image size and at the base size (224), for the embedded procedural world
and for a JSONL manifest of JPEGs that the benchmark writes first.

impl names (stable across runs):
  vlmo_fast        build_pretrain_loader(..., stage="vl"): images + captions, tokenised,
                   whole-word MLM masks, image/caption ids (the full batch the trainer gets).
  torchvision_ref  reference-style pipeline on the same JPEG manifest: a map-style Dataset
                   with PIL decode + torchvision RandomResizedCrop(scale 0.5-1) + ToTensor +
                   Normalize(0.5, 0.5), default collate, captions untouched (no tokenising, no
                   masks): what the reference's loaders do per image.
  floor            the single-process floor of each source: embedded = scene sampling +
                   rendering only; jpeg = PIL decode + resize only (no crop randomness,
                   no collate, no text).

`ms` is the mean wall time per batch over the timed batches (after one warm-up batch, which
also starts the workers); `items_per_s` = batch_size / ms; `x_vs_ref` and `x_vs_floor` are
ratios of items/s from the same run and the same worker count.

  python benchmarks/bench_data.py            # CPU, both sizes, workers 0/1/2
  python benchmarks/bench_data.py --quick    # smoke run
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, base_parser  # noqa: E402

from vlmo_fast.config import VLMoConfig  # noqa: E402
from vlmo_fast.data import EmbeddedWorld, build_pretrain_loader, build_tokenizer, render_scene  # noqa: E402
from vlmo_fast.data.formats import ImageRef  # noqa: E402
from vlmo_fast.data.transforms import ImageTransform, decode_image  # noqa: E402


def write_jpeg_manifest(directory: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """n JPEGs (embedded scenes rendered at `size`, quality 90) and a JSONL manifest of them."""
    from PIL import Image
    world = EmbeddedWorld(seed)
    rows = []
    for i in range(n):
        scene = world.scene("train", i)
        arr = ((render_scene(scene, size) + 1) * 127.5).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
        name = f"{i:05d}.jpg"
        Image.fromarray(arr).save(directory / name, quality=90)
        rows.append({"image": name, "caption": world.caption(scene, 0).text})
    path = directory / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def time_batches(iterable_factory: Callable[[], object], batch_size: int, n_batches: int) -> float:
    """Mean seconds per batch over n_batches after one warm-up batch."""
    it = iter(iterable_factory())
    next(it)
    t0 = time.perf_counter()
    got = 0
    for _ in it:
        got += 1
        if got == n_batches:
            break
    if got == 0:
        raise RuntimeError("no batches after the warm-up one: raise the dataset size")
    return (time.perf_counter() - t0) / got


class TorchvisionRefDataset(torch.utils.data.Dataset):
    def __init__(self, manifest: Path, img_size: int):
        from torchvision import transforms
        self.rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        self.base = manifest.parent
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(img_size, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from PIL import Image
        row = self.rows[i]
        with Image.open(self.base / row["image"]) as img:
            return self.transform(img.convert("RGB")), row["caption"]


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--workers", type=int, nargs="*", default=None, help="worker counts (default 0 1 2)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cpu")
    res = Results("data", device)
    tiny = VLMoConfig.preset("tiny")
    sizes = [tiny.img_size, 224]
    workers = args.workers if args.workers is not None else ([0, 2] if args.quick else [0, 1, 2])
    workers = [w for w in workers if w <= (os.cpu_count() or 1)]
    B = args.batch_size
    n_batches = 3 if args.quick else 12
    n_items = B * (n_batches + 2) * 2
    tok = build_tokenizer("embedded")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    manifest = write_jpeg_manifest(Path(tmp.name), min(n_items, 1024))
    floor_tf = {s: ImageTransform(s, train=False) for s in sizes}

    def row(case: str, impl: str, sec_per_batch: Optional[float], **extra):
        ips = None if sec_per_batch is None else B / sec_per_batch
        res.add(case, impl, "load", None if sec_per_batch is None else sec_per_batch * 1e3,
                items_per_s=None if ips is None else round(ips, 1), **extra)
        return ips

    for size in sizes:
        patch = tiny.patch_size if size == tiny.img_size else 16
        # floors (single process)
        world = EmbeddedWorld(0)
        def render_floor():
            i = 0
            while True:
                yield [render_scene(world.scene("train", i * B + k), size) for k in range(B)]
                i += 1
        floor = {"embedded": row(f"src=embedded S={size} B={B} workers=0", "floor",
                                 time_batches(render_floor, B, n_batches))}
        refs = [ImageRef(str(manifest.parent / json.loads(line)["image"]))
                for line in manifest.read_text().splitlines()]
        def decode_floor():
            i = 0
            while True:
                yield [floor_tf[size](decode_image(refs[(i * B + k) % len(refs)]))[0] for k in range(B)]
                i += 1
        floor["jpeg"] = row(f"src=jsonl_jpeg S={size} B={B} workers=0", "floor", time_batches(decode_floor, B, n_batches))
        for w in workers:
            for src, source in (("embedded", "embedded"), ("jsonl_jpeg", manifest)):
                case = f"src={src} S={size} B={B} workers={w}"
                kw = dict(img_size=size, patch_size=patch, max_text_len=tiny.max_text_len if size == tiny.img_size else 40,
                          num_workers=w, seed=0)
                if src == "embedded":
                    kw["num_samples"] = n_items
                ours = row(case, "vlmo_fast", time_batches(
                    lambda: build_pretrain_loader(source, tok, "vl", B, **kw), B, n_batches))
                ref = None
                if src == "jsonl_jpeg":
                    ds = TorchvisionRefDataset(manifest, size)
                    ref = row(case, "torchvision_ref", time_batches(
                        lambda: torch.utils.data.DataLoader(ds, B, shuffle=True, num_workers=w), B, n_batches))
                fl = floor["embedded" if src == "embedded" else "jpeg"]
                res.rows[-1 if ref is None else -2].update(
                    x_vs_floor=round(ours / fl, 2) if fl else None,
                    x_vs_ref=round(ours / ref, 2) if ref else None)
                print(f"{case}: {ours:.0f} items/s" + (f" (torchvision_ref {ref:.0f})" if ref else ""), flush=True)
    res.notes.append(f"torch threads: {torch.get_num_threads()}; workers use 1 thread each")
    if load:
        res.notes.append("load average at start (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in load)
                         + " — the machine was shared with other jobs, so absolute numbers are noisy")
    res.notes.append(f"JPEG manifest: {min(n_items, 1024)} JPEGs of 256x256 (quality 90) written by the benchmark")
    res.write(args.out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
