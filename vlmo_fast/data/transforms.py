"""Image decoding (Pillow) and the reference's transforms, with explicit seeded randomness.

Train: RandomResizedCrop(img_size, scale=(0.5, 1), ratio=(3/4, 4/3)), optional horizontal
flip (off by default: captions name left and right; when on, "left" and "right" swap in the
caption), normalisation mean = std = 0.5 -> [-1, 1]. Eval: resize the shorter side to
img_size, centre crop. The crop and flip are drawn from a numpy Generator the caller seeds per
item (seed, epoch, index), so they do not depend on the worker that runs them.

Decoding never lets a bad file through as something else: every failure (missing, truncated,
not an image, a decompression bomb, a pixel format that has no RGB reading) is a one-line
DataError naming the file, the reason and the record, which the training datasets count as a
skipped sample and evaluation / the CLI report. Images whose header claims more than
`max_image_pixels()` pixels (default 8192 x 8192 = 67,108,864: a 1-bit 20000 x 20000 PNG is
48 KB on disk and 1.2 GB as RGB) are refused before any pixel is decoded; set it per
transform (`max_pixels=`), per dataset (`max_image_pixels=`) or for the process
(VLMO_FAST_MAX_IMAGE_PIXELS). Pillow's own bomb check (DecompressionBombError above 2 x
PIL.Image.MAX_IMAGE_PIXELS, 179 Mpx by default) still applies above that; raise both for
larger images.
Pixel formats wider than 8 bits are scaled by their real range, not clipped as Pillow's
convert("RGB") does (a 16-bit PNG came out almost white, a float TIFF black): 16-bit
("I;16*", and "I" with values in 0..65535) by 65535; 32-bit float ("F") is read as [0, 1]
(the usual convention for float images), values further than 1e-3 outside it, NaN or inf
are refused; a 32-bit integer image outside 0..65535 is refused.
"""
from __future__ import annotations

import io
import math
import re
from typing import Optional, Tuple

import numpy as np

from ..env import env_choice
from .formats import DataError, ImageRef

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """'a ring left of a cross on the right' -> 'a ring right of a cross on the left'."""
    def sub(m):
        w = m.group(0)
        out = "right" if w.lower() == "left" else "left"
        return out.capitalize() if w[0].isupper() else out
    return _LEFT_RIGHT.sub(sub, text)


# 67 Mpx: 200 MB as RGB per decoding worker, far above any photo a 224-384 px model needs
# (COCO / CC3M / LAION images are a few Mpx) and below Pillow's own warning (89.5 Mpx)
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_PIXELS_ENV = "VLMO_FAST_MAX_IMAGE_PIXELS"
_FLOAT_RANGE_SLACK = 1e-3
# modes Pillow converts to RGB correctly; the wider ones are scaled in `to_rgb`
_RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                                    "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def max_image_pixels(value: Optional[int] = None) -> int:
    """The largest image (width x height) decoded: `value`, else VLMO_FAST_MAX_IMAGE_PIXELS
    (read per call), else DEFAULT_MAX_IMAGE_PIXELS."""
    if value is None:
        raw = env_choice(MAX_IMAGE_PIXELS_ENV)
        if raw is None:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"environment variable {MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a whole number "
                             f"of pixels, e.g. {DEFAULT_MAX_IMAGE_PIXELS}") from None
        what = f"environment variable {MAX_IMAGE_PIXELS_ENV}"
    else:
        what = "max_image_pixels"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number of pixels >= 1, got {value!r}")
    return value


def _reason(e: BaseException) -> str:
    """An exception's message on one line (Pillow's can span lines), or its class name."""
    return " ".join(str(e).split()) or type(e).__name__


def open_image(ref: ImageRef, origin: str = "", max_pixels: Optional[int] = None):
    """A lazily decoded PIL image (header read, pixels not yet); DataError naming the file
    (and the record's origin) when it is missing, not an image, or larger than
    `max_image_pixels(max_pixels)`."""
    from PIL import Image, UnidentifiedImageError
    where = f" ({origin})" if origin else ""
    limit = max_image_pixels(max_pixels)
    try:
        data = ref.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file {ref} does not exist{where}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"image file {ref} could not be read{where}: {_reason(e)}") from None
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow checks the header's size inside open(), before the limit below can; the warning
        # arrives as an exception only under -W error / simplefilter("error")
        raise DataError(f"image file {ref} is a decompression bomb or an oversized image{where}: {_reason(e)} "
                        f"(to read it, raise PIL.Image.MAX_IMAGE_PIXELS and {MAX_IMAGE_PIXELS_ENV})") from None
    except UnidentifiedImageError:
        raise DataError(f"image file {ref} is corrupt or not an image{where}: no format Pillow reads matches "
                        f"its bytes") from None
    except Exception as e:   # Pillow's parsers raise many types on bad bytes (OSError, SyntaxError, struct.error...)
        raise DataError(f"image file {ref} is corrupt or not an image{where}: {_reason(e)}") from None
    width, height = img.size
    if width * height > limit:
        raise DataError(f"image file {ref} is {width}x{height} = {width * height:,} pixels, over the limit of "
                        f"{limit:,}{where}: a decompression bomb or an oversized image (allow more with "
                        f"max_image_pixels= or {MAX_IMAGE_PIXELS_ENV})")
    return img


def to_rgb(img, what: str = "image", where: str = ""):
    """A PIL image of any mode -> RGB, wide pixel formats scaled by their real range (module
    docstring); DataError `what` ... `where` for one that has no RGB reading."""
    from PIL import Image
    mode = img.mode
    if mode in _RGB_CONVERTIBLE_MODES:
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{what} is a 32-bit integer image with values in [{values.min()}, {values.max()}]"
                            f"{where}: only 0..65535 (16-bit) has a known range; save it with 8 or 16 bits")
        scaled = values.astype(np.float32) * np.float32(255 / 65535)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if not np.isfinite(values).all():
            raise DataError(f"{what} is a floating-point image with NaN or infinite values{where}")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < -_FLOAT_RANGE_SLACK or hi > 1 + _FLOAT_RANGE_SLACK:
            raise DataError(f"{what} is a floating-point image with values in [{lo:g}, {hi:g}]{where}: float "
                            f"images are read as 0 (black) .. 1 (white); rescale it or save it with 8 or 16 bits")
        scaled = np.clip(values, 0, 1) * 255
    else:
        raise DataError(f"{what} has the pixel format {mode!r}, which has no RGB reading{where}")
    return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")


def load_rgb(img, ref: ImageRef, origin: str = "", draft_size: Optional[Tuple[int, int]] = None):
    """Decode `img` (from open_image) to RGB. draft_size: the smallest full-image size still
    needed; JPEGs then decode at 1/2, 1/4 or 1/8 scale in the DCT when that is enough, which
    is several times faster for small training sizes."""
    where = f" ({origin})" if origin else ""
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
    except Exception as e:   # truncated data, decoder errors: Pillow raises many types
        raise DataError(f"image file {ref} is corrupt or not an image{where}: {_reason(e)}") from None
    try:
        return to_rgb(img, f"image file {ref}", where)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"image file {ref} could not be converted to RGB{where}: {_reason(e)}") from None


def decode_image(ref: ImageRef, origin: str = "", max_pixels: Optional[int] = None):
    """A PIL RGB image at full resolution; DataError naming the file when missing or corrupt."""
    return load_rgb(open_image(ref, origin, max_pixels), ref, origin)


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
    max_pixels: the largest image `load` decodes (default: `max_image_pixels()`).

    __call__(pil_image, rng=None, caption=None) -> (float32 [3, S, S], caption)
    """

    def __init__(self, img_size: int, train: bool = True, *, scale: Tuple[float, float] = (0.5, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = False, max_pixels: Optional[int] = None):
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if max_pixels is not None:
            max_image_pixels(max_pixels)      # checked now; None: the environment's, read per image
        self.img_size, self.train, self.scale, self.ratio, self.flip = int(img_size), bool(train), scale, ratio, bool(flip)
        self.max_pixels = max_pixels

    def load(self, ref: ImageRef, origin: str = "", rng: Optional[np.random.Generator] = None,
             caption: Optional[str] = None):
        """Decode and transform in one go: the crop is chosen from the header's size first, so
        a JPEG decodes only at the resolution the crop needs (PIL draft mode). Same crop and
        flip as __call__ on the fully decoded image, up to resampling differences."""
        img = open_image(ref, origin, self.max_pixels)
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
