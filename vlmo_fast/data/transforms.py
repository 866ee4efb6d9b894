"""Image decoding (Pillow) and the reference's transforms, with explicit seeded randomness.

Train: RandomResizedCrop(img_size, scale=(0.5, 1), ratio=(3/4, 4/3)), optional horizontal
flip (off by default: captions name left and right; when on, "left" and "right" swap in the
caption), normalisation mean = std = 0.5 -> [-1, 1]. Eval: resize the shorter side to
img_size, centre crop. The crop and flip are drawn from a numpy Generator the caller seeds per
item (seed, epoch, index), so they do not depend on the worker that runs them.
"""
from __future__ import annotations

import io
import math
import re
from typing import Optional, Tuple

import numpy as np

from .formats import DataError, ImageRef

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """'a ring left of a cross on the right' -> 'a ring right of a cross on the left'."""
    def sub(m):
        w = m.group(0)
        out = "right" if w.lower() == "left" else "left"
        return out.capitalize() if w[0].isupper() else out
    return _LEFT_RIGHT.sub(sub, text)


def decode_image(ref: ImageRef, origin: str = ""):
    """A PIL RGB image; DataError naming the file (and the record's origin) when the file is
    missing or not a decodable image."""
    from PIL import Image, UnidentifiedImageError
    where = f" ({origin})" if origin else ""
    try:
        data = ref.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file {ref} does not exist{where}") from None
    except OSError as e:
        raise DataError(f"image file {ref} could not be read{where}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image file {ref} is corrupt or not an image{where}: {e}") from None


def to_normalised_array(img) -> np.ndarray:
    """PIL RGB -> float32 [3, H, W], (x / 255 - 0.5) / 0.5."""
    arr = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)) * (2.0 / 255.0) - 1.0


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = (0.5, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop.get_params, with a numpy Generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # fallback: central crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageTransform:
    """train: random resized crop (+ optional flip); eval: resize + centre crop.

    __call__(pil_image, rng=None, caption=None) -> (float32 [3, S, S], caption)
    """

    def __init__(self, img_size: int, train: bool = True, *, scale: Tuple[float, float] = (0.5, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False):
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.img_size, self.train, self.scale, self.ratio, self.flip = int(img_size), bool(train), scale, ratio, bool(flip)

    def __call__(self, img, rng: Optional[np.random.Generator] = None, caption: Optional[str] = None):
        from PIL import Image
        s = self.img_size
        if self.train:
            if rng is None:
                raise ValueError("the train transform needs a seeded numpy Generator (rng=)")
            left, top, w, h = random_resized_crop_box(img.width, img.height, rng, self.scale, self.ratio)
            img = img.resize((s, s), Image.BICUBIC, box=(left, top, left + w, top + h))
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                if caption is not None:
                    caption = swap_left_right(caption)
        else:
            scale = s / min(img.width, img.height)
            w, h = max(s, round(img.width * scale)), max(s, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        return to_normalised_array(img), caption
