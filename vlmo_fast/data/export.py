"""Write the embedded world to disk in the real formats: image files (PNG or JPEG) with a JSONL
manifest, a Karpathy JSON, sidecar .txt captions, or WebDataset-layout .tar shards.

For looking at the data, for trying the file readers and the index/search tools on a corpus
that needs no download, and for feeding the world to other projects.

    python -m vlmo_fast.data.export out/ --split test --num-images 100 --img-size 224 --format jsonl
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..io import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from .render import render_scene
from .world import SPLITS, EmbeddedWorld, WorldConfig

FORMATS = ("jsonl", "karpathy", "folder", "tar")


def _encode(array: np.ndarray, image_format: str) -> bytes:
    from PIL import Image
    pixels = ((array + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if image_format == "jpg" else "PNG", quality=95)
    return buf.getvalue()


def export_world(out_dir: Union[str, Path], split: str = "test", num_images: int = 100, *, img_size: int = 224,
                 fmt: str = "jsonl", seed: int = 0, world_config: Optional[WorldConfig] = None,
                 image_format: str = "png", shard_size: int = 1000) -> Path:
    """Scenes 0..num_images-1 of `split` with all their captions; returns the file to give a
    reader (manifest / Karpathy JSON / image folder / shard pattern). Every file is written
    atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = EmbeddedWorld(seed, world_config)
    items = []
    for i in range(num_images):
        scene = world.scene(split, i)
        items.append((f"{split}_{i:06d}", world.caption_texts(scene), render_scene(scene, img_size)))

    if fmt == "tar":
        n_shards = -(-num_images // shard_size)
        width = max(3, len(str(n_shards - 1)))
        for s in range(n_shards):
            def write(tmp, chunk=items[s * shard_size:(s + 1) * shard_size]):
                with tarfile.open(tmp, "w") as tar:
                    for name, caps, array in chunk:
                        for ext, data in ((image_format, _encode(array, image_format)),
                                          ("json", json.dumps({"caption": caps[0], "captions": caps}).encode())):
                            info = tarfile.TarInfo(f"{name}.{ext}")
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
            atomic_write(out / f"{split}-{s:0{width}d}.tar", write)
        return Path(f"{out}/{split}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar")

    image_dir = out / "images"
    for name, caps, array in items:
        atomic_write_bytes(image_dir / f"{name}.{image_format}", _encode(array, image_format))
        if fmt == "folder":
            atomic_write_text(image_dir / f"{name}.txt", "\n".join(caps) + "\n")
    if fmt == "folder":
        return image_dir
    if fmt == "jsonl":
        rows = [json.dumps({"image": f"images/{name}.{image_format}", "caption": c, "image_id": name})
                for name, caps, _ in items for c in caps]
        return atomic_write_text(out / f"{split}.jsonl", "\n".join(rows) + "\n")
    # Karpathy JSON: every image in the split named by the Karpathy convention
    karpathy_split = {"train": "train", "val": "val"}.get(split, "test")
    images = [{"filepath": "images", "filename": f"{name}.{image_format}", "imgid": k, "split": karpathy_split,
               "sentences": [{"raw": c, "tokens": c.split(), "imgid": k} for c in caps]}
              for k, (name, caps, _) in enumerate(items)]
    return atomic_write_json(out / f"dataset_embedded_{split}.json", {"dataset": "embedded", "images": images})


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m vlmo_fast.data.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--format", dest="fmt", default="jsonl", choices=FORMATS)
    p.add_argument("--image-format", default="png", choices=("png", "jpg"))
    p.add_argument("--seed", type=int, default=0, help="the world's seed")
    args = p.parse_args(argv)
    path = export_world(args.out_dir, args.split, args.num_images, img_size=args.img_size, fmt=args.fmt,
                        seed=args.seed, image_format=args.image_format)
    print(f"wrote {args.num_images} scenes of split {args.split!r}: {path}")
    return path


if __name__ == "__main__":
    main()
