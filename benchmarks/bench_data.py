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

`ms` is the mean wall time per batch over the timed batches of a round (after the warm-up
batch, which starts the workers, and the 2 batches per worker they prefetch meanwhile),
best of --rounds rounds interleaved across rows (the machine is shared: the best round is
the least disturbed); `items_per_s` = batch_size / ms;
`x_vs_ref` (same worker count) and `x_vs_floor` (single-process floor) are ratios of items/s
from the same run.

Shard readers (`--part shards`, written to data-streaming-<device>.json/.md): the same
"vl" loader over WebDataset shards the benchmark writes (32 px JPEGs, 16 samples a shard) at
10, 100 and 1,000 shards, for
  indexed_tar        build_pretrain_loader(..., stream=False): formats.read_tar_shards scans
                     every member header of every shard first, then reads by offset.
  webdataset_stream  build_pretrain_loader(..., stream=True): streaming.py, shards opened
                     when a worker reaches them.
passes: `startup` = the build_pretrain_loader call (ms); `first_batch` = iter() to the first
batch (worker start and the first shards' reads included); `steady` = ms per batch over the
batches after those (items_per_s = batch / ms). Best of --rounds rounds (default 2, 1 with
--quick), interleaved across rows, page cache warm (the shards were just written).

  python benchmarks/bench_data.py            # CPU, both parts
  python benchmarks/bench_data.py --part shards
  python benchmarks/bench_data.py --quick    # smoke run
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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


def time_batches(iterable_factory: Callable[[], object], n_batches: int, skip: int = 1) -> float:
    """Mean seconds per batch over n_batches, after `skip` batches: the warm-up one (which
    starts the workers) and those the workers prefetched meanwhile (2 per worker), which
    would otherwise come for free and inflate the rate."""
    it = iter(iterable_factory())
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    got = 0
    for _ in it:
        got += 1
        if got == n_batches:
            break
    if got < n_batches:
        raise RuntimeError(f"only {got} batches after the {skip} skipped ones: raise the dataset size")
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


def write_synthetic_shards(directory: Path, num_shards: int, per_shard: int, size: int = 32,
                           seed: int = 0) -> str:
    """num_shards img2dataset-style shards {00000..}.tar of per_shard samples (a size x size
    JPEG of seeded noise over a gradient, a .txt caption of the embedded world, a .json);
    returns their brace pattern."""
    import io
    import tarfile
    from PIL import Image
    world = EmbeddedWorld(seed)
    captions = [world.caption(world.scene("train", i), 0).text for i in range(64)]
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, size, dtype=np.float32)[None, :, None]
    for s in range(num_shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                pixels = np.clip(ramp + rng.integers(0, 96, (size, size, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                caption = captions[(s * per_shard + i) % len(captions)]
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key, "caption": caption}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(directory / f"{{00000..{num_shards - 1:05d}}}.tar")


def bench_shards(args, tok) -> None:
    """Startup, first batch and steady state of the indexed and the streaming tar readers at
    10, 100 and 1,000 shards (rows of data-streaming-<device>.json; see the module docstring)."""
    res = Results("data-streaming", torch.device("cpu"))
    shard_counts = [10, 100] if args.quick else [10, 100, 1000]
    per_shard, size, B = 16, 32, 16
    workers = args.workers if args.workers is not None else [0, 2]
    workers = [w for w in workers if w <= (os.cpu_count() or 1)]
    rounds = args.rounds or (1 if args.quick else 2)
    impls = {"indexed_tar": False, "webdataset_stream": True}
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    tmp = tempfile.TemporaryDirectory(prefix="bench_shards_")
    patterns = {}
    for n in shard_counts:
        folder = Path(tmp.name) / f"n{n}"
        folder.mkdir()
        t0 = time.perf_counter()
        patterns[n] = write_synthetic_shards(folder, n, per_shard, size)
        print(f"wrote {n} shards in {time.perf_counter() - t0:.1f} s", flush=True)
    best: dict = {}
    for r in range(rounds):
        for n in shard_counts:
            for w in workers:
                # the batches after the first (and those the workers prefetched meanwhile) that one
                # epoch still holds, at most 24
                timed = min(24, n * per_shard // B - 1 - 2 * w)
                for impl, stream in impls.items():
                    t0 = time.perf_counter()
                    loader = build_pretrain_loader(patterns[n], tok, "vl", B, img_size=size, patch_size=16,
                                                   max_text_len=16, num_workers=w, seed=0, stream=stream)
                    t1 = time.perf_counter()
                    it = iter(loader)
                    next(it)
                    t2 = time.perf_counter()
                    for _ in range(2 * w):
                        next(it)
                    t3 = time.perf_counter()
                    for _ in range(timed):
                        next(it)
                    t4 = time.perf_counter()
                    del it, loader
                    key = (n, w, impl)
                    got = {"startup": (t1 - t0) * 1e3, "first_batch": (t2 - t1) * 1e3,
                           "steady": (t4 - t3) * 1e3 / timed}
                    old = best.get(key, {})
                    best[key] = {k: min(v, old.get(k, float("inf"))) for k, v in got.items()}
        print(f"shards: round {r + 1}/{rounds} done", flush=True)
    for n in shard_counts:
        for w in workers:
            case = f"shards={n} per_shard={per_shard} S={size} B={B} workers={w}"
            for impl in impls:
                row = best[(n, w, impl)]
                res.add(case, impl, "startup", row["startup"])
                res.add(case, impl, "first_batch", row["first_batch"])
                res.add(case, impl, "steady", row["steady"], items_per_s=round(B / row["steady"] * 1e3, 1))
                print(f"{case} {impl}: startup {row['startup']:.1f} ms, first batch {row['first_batch']:.1f} ms, "
                      f"{B / row['steady'] * 1e3:.0f} items/s", flush=True)
    res.notes.append(f"best of {rounds} interleaved rounds; steady = mean ms per batch over up to 24 batches after "
                     f"the first batch and the 2 per worker prefetched meanwhile; shards written by the benchmark "
                     f"({per_shard} samples of {size}x{size} JPEG + .txt + .json each), page cache warm; "
                     f"torch threads: {torch.get_num_threads()}, workers use 1 thread each")
    if load:
        res.notes.append("load average at start (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in load)
                         + f" on {os.cpu_count()} cores (shared machine: absolute numbers are noisy)")
    res.write(args.out)
    tmp.cleanup()


def main(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--part", choices=("loaders", "shards", "all"), default="all",
                   help="loaders: items/s per source and worker count (data-<device>.json); shards: indexed vs "
                        "streaming tar readers at 10/100/1,000 shards (data-streaming-<device>.json)")
    p.add_argument("--workers", type=int, nargs="*", default=None,
                   help="worker counts (default 0 1 2; 0 2 for --part shards)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per row, interleaved across impls; the best round is reported "
                        "(default 3, 1 with --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.part in ("shards", "all"):
        bench_shards(args, build_tokenizer("embedded"))
    if args.part == "shards":
        return
    device = torch.device("cpu")
    res = Results("data", device)
    tiny = VLMoConfig.preset("tiny")
    sizes = [tiny.img_size, 224]
    workers = args.workers if args.workers is not None else ([0, 2] if args.quick else [0, 1, 2])
    workers = [w for w in workers if w <= (os.cpu_count() or 1)]
    rounds = args.rounds or (1 if args.quick else 3)
    B = args.batch_size
    n_batches = 3 if args.quick else 8
    n_items = B * (n_batches + 2 + 2 * max(workers))
    tok = build_tokenizer("embedded")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    manifest = write_jpeg_manifest(Path(tmp.name), min(n_items, 1024))
    refs = [ImageRef(str(manifest.parent / json.loads(line)["image"])) for line in manifest.read_text().splitlines()]
    world = EmbeddedWorld(0)

    def batches_forever(make_batch):
        def factory():
            i = 0
            while True:
                yield make_batch(i)
                i += 1
        return factory

    for size in sizes:
        patch = tiny.patch_size if size == tiny.img_size else 16
        text_len = tiny.max_text_len if size == tiny.img_size else 40
        eval_tf = ImageTransform(size, train=False)
        # (case, impl, factory): every row of this size, timed round-robin
        plan = [
            (f"src=embedded S={size} B={B} workers=0", "floor", batches_forever(
                lambda i: [render_scene(world.scene("train", i * B + k), size) for k in range(B)])),
            (f"src=jsonl_jpeg S={size} B={B} workers=0", "floor", batches_forever(
                lambda i: [eval_tf(decode_image(refs[(i * B + k) % len(refs)]))[0] for k in range(B)])),
        ]
        for w in workers:
            for src, source in (("embedded", "embedded"), ("jsonl_jpeg", manifest)):
                kw = dict(img_size=size, patch_size=patch, max_text_len=text_len, num_workers=w, seed=0)
                if src == "embedded":
                    kw["num_samples"] = n_items
                case = f"src={src} S={size} B={B} workers={w}"
                plan.append((case, "vlmo_fast",
                             lambda source=source, kw=kw: build_pretrain_loader(source, tok, "vl", B, **kw)))
                if src == "jsonl_jpeg":
                    ds = TorchvisionRefDataset(manifest, size)
                    plan.append((case, "torchvision_ref", lambda ds=ds, w=w: torch.utils.data.DataLoader(
                        ds, B, shuffle=True, num_workers=w)))
        best = {}
        for r in range(rounds):
            for case, impl, factory in plan:
                w = int(case.rsplit("workers=", 1)[1])
                sec = time_batches(factory, n_batches, skip=1 + 2 * w)
                best[(case, impl)] = min(sec, best.get((case, impl), float("inf")))
            print(f"S={size}: round {r + 1}/{rounds} done", flush=True)
        rate = {k: B / v for k, v in best.items()}
        for case, impl, _ in plan:
            src = "embedded" if "src=embedded" in case else "jsonl_jpeg"
            floor = rate[(f"src={src} S={size} B={B} workers=0", "floor")]
            ref = rate.get((case, "torchvision_ref"))
            extra = {"items_per_s": round(rate[(case, impl)], 1)}
            if impl == "vlmo_fast":
                extra["x_vs_floor"] = round(rate[(case, impl)] / floor, 2)
                extra["x_vs_ref"] = None if ref is None else round(rate[(case, impl)] / ref, 2)
            res.add(case, impl, "load", best[(case, impl)] * 1e3, **extra)
            print(f"{case} {impl}: {rate[(case, impl)]:.0f} items/s", flush=True)
    res.notes.append(f"best of {rounds} interleaved rounds of {n_batches} batches per row (after a warm-up batch); "
                     f"torch threads: {torch.get_num_threads()}; workers use 1 thread each")
    if load:
        res.notes.append("load average at start (1/5/15 min): " + " / ".join(f"{x:.1f}" for x in load)
                         + f" on {os.cpu_count()} cores — the machine was shared with other jobs, so "
                         "absolute numbers are noisy and extra workers cannot add throughput beyond the free cores")
    res.notes.append(f"JPEG manifest: {min(n_items, 1024)} JPEGs of 256x256 (quality 90) written by the benchmark; "
                     "vlmo_fast decodes JPEGs in draft mode at the scale the crop needs, the floor decodes full size")
    res.write(args.out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
