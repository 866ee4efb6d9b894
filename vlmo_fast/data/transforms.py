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


def open_image(ref: ImageRef, origin: str = ""):
    """A lazily decoded PIL image (header read, pixels not yet); DataError naming the file
    (and the record's origin) when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError
    where = f" ({origin})" if origin else ""
    try:
        data = ref.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file {ref} does not exist{where}") from None
    except OSError as e:
        raise DataError(f"image file {ref} could not be read{where}: {e}") from None
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image file {ref} is corrupt or not an image{where}: {e}") from None


def load_rgb(img, ref: ImageRef, origin: str = "", draft_size: Optional[Tuple[int, int]] = None):
    """Decode `img` (from open_image) to RGB. draft_size: the smallest full-image size still
    needed; JPEGs then decode at 1/2, 1/4 or 1/8 scale in the DCT when that is enough, which
    is several times faster for small training sizes."""
    where = f" ({origin})" if origin else ""
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image file {ref} is corrupt or not an image{where}: {e}") from None


def decode_image(ref: ImageRef, origin: str = ""):
    """A PIL RGB image at full resolution; DataError naming the file when missing or corrupt."""
    return load_rgb(open_image(ref, origin), ref, origin)


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

    def load(self, ref: ImageRef, origin: str = "", rng: Optional[np.random.Generator] = None,
             caption: Optional[str] = None):
        """Decode and transform in one go: the crop is chosen from the header's size first, so
        a JPEG decodes only at the resolution the crop needs (PIL draft mode). Same crop and
        flip as __call__ on the fully decoded image, up to resampling differences."""
        img = open_image(ref, origin)
        W, H = img.size
        s = self.img_size
        if self.train:
            if rng is None:
                raise ValueError("the train transform needs a seeded numpy Generator (rng=)")
            box = random_resized_crop_box(W, H, rng, self.scale, self.ratio)
            need = (math.ceil(W * s / box[2]), math.ceil(H * s / box[3]))
        else:
            box = None
            short = min(W, H)
            need = (math.ceil(W * s / short), math.ceil(H * s / short))
        img = load_rgb(img, ref, origin, draft_size=need)
        if box is not None and img.size != (W, H):   # decoded at a reduced scale: scale the box
            fx, fy = img.width / W, img.height / H
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return self._apply(img, rng, caption, box)

    def __call__(self, img, rng: Optional[np.random.Generator] = None, caption: Optional[str] = None):
        box = None
        if self.train:
            if rng is None:
                raise ValueError("the train transform needs a seeded numpy Generator (rng=)")
            box = random_resized_crop_box(img.width, img.height, rng, self.scale, self.ratio)
        return self._apply(img, rng, caption, box)

    def _apply(self, img, rng, caption, box):
        from PIL import Image
        s = self.img_size
        if self.train:
            left, top, w, h = box
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
