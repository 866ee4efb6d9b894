"""Getting embeddings out: `Encoder`, a small inference wrapper around a trained VLMo.

    enc = Encoder.from_pretrained("checkpoints/vlmo-tiny")     # weights + config + tokenizer
    img = enc.embed_images(["cat.png", "dog.jpg"])             # [2, D] L2-normalised, fp32, CPU
    txt = enc.embed_texts(["a cat", "a dog"])                  # [2, D]
    sim = img @ txt.T                                          # cosine similarities
    p = enc.itm_score(["cat.png"], ["a cat on a mat"])         # ITM match probability

Images are file paths, PIL images, or a float tensor [N, 3, H, W] already normalised to
[-1, 1] (mean = std = 0.5, the reference's normalisation) at the model's resolution. Files
and PIL images go through the data layer's evaluation transform (RGB, shorter side resized
bicubic, centre crop to the model's `img_size`); a file that is missing or cannot be decoded
(corrupt, over the pixel limit `VLMO_FAST_MAX_IMAGE_PIXELS`, a pixel format with no RGB
reading) raises `vlmo_fast.data.formats.DataError` (a ValueError) with a one-line message
naming the file and the reason.

Texts longer than the model accepts (`config.max_text_len` tokens including [CLS]/[SEP])
are TRUNCATED with a warning that says how many were cut (pass `on_long_text="error"` to
raise instead, or "ignore" to truncate silently).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

ImageInput = Union[Tensor, Sequence[Union[str, os.PathLike, "PIL.Image.Image"]]]  # noqa: F821
LONG_TEXT_POLICIES = ("warn", "error", "ignore")


def load_image(image, img_size: int) -> Tensor:
    """A path or PIL image -> float tensor [3, img_size, img_size] in [-1, 1], with the data
    layer's evaluation transform (RGB, shorter side resized bicubic, centre crop)."""
    from PIL import Image
    from .data.formats import ImageRef
    from .data.transforms import ImageTransform, to_rgb
    transform = ImageTransform(img_size, train=False)
    if isinstance(image, (str, os.PathLike)):
        array, _ = transform.load(ImageRef(str(image)))     # errors name the file already
    elif isinstance(image, Image.Image):
        # the data layer's conversion: 16-bit and float images scaled by their range, not clipped
        array, _ = transform(to_rgb(image, f"a PIL image of mode {image.mode!r}"))
    else:
        raise TypeError(f"an image must be a path or a PIL image, got {type(image).__name__}")
    return torch.from_numpy(array)


def model_fingerprint(model) -> str:
    """A short hash of a model's config and weights (names, shapes, dtypes and bytes): two
    models share it only when they compute the same embeddings. 16 hex digits."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json"):
        h.update(config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class Encoder:
    """Embeddings and ITM scores from a VLMo dual/fusion encoder, in batches."""

    def __init__(self, model, tokenizer=None, *, device=None, batch_size: int = 64,
                 progress: bool = True, on_long_text: str = "warn"):
        if on_long_text not in LONG_TEXT_POLICIES:
            raise ValueError(f"on_long_text must be one of {LONG_TEXT_POLICIES}, got {on_long_text!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = next(model.parameters()).dtype
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        if tok_vocab is not None and tok_vocab > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tok_vocab} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}: they do not belong together")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.on_long_text = on_long_text
        self._fingerprint: Optional[str] = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *, device=None, **kwargs) -> "Encoder":
        """Weights + config (`VLMo.from_pretrained`) and the tokenizer saved beside them
        (`WordPieceTokenizer.load`, when the folder has one)."""
        from .model import VLMo
        directory = Path(directory)
        model = VLMo.from_pretrained(directory)
        tokenizer = None
        if (directory / "vocab.txt").is_file():
            from .data import WordPieceTokenizer
            tokenizer = WordPieceTokenizer.load(directory)
        encoder = cls(model, tokenizer, device=device, **kwargs)
        return encoder

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """config.json + model.safetensors (+ the tokenizer's files) in `directory`."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        return directory

    @property
    def config(self):
        return self.model.config

    @property
    def embed_dim(self) -> int:
        return int(self.model.itc.image_proj.out_features)

    @property
    def fingerprint(self) -> str:
        """`model_fingerprint` of the wrapped model (computed once; do not modify the
        weights of a model wrapped in an Encoder)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # -- inputs ----------------------------------------------------------------------------
    def _check_image_tensor(self, images: Tensor) -> Tensor:
        c = self.config
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != c.in_chans:
            raise ValueError(f"images must be a [N, {c.in_chans}, H, W] tensor, got shape "
                             f"{tuple(images.shape)}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"an image tensor must be floating point in [-1, 1], got {images.dtype} "
                            "(pass file paths or PIL images to let the Encoder preprocess them)")
        if tuple(images.shape[2:]) != (c.img_size, c.img_size):
            raise ValueError(f"images must be {c.img_size}x{c.img_size} (the model's img_size), got "
                             f"{images.shape[2]}x{images.shape[3]}; pass paths/PIL images to resize, "
                             "or change the model's resolution with model.resize_image")
        if images.numel() and float(images.abs().max()) > 1.5:
            warnings.warn(f"image values reach {float(images.abs().max()):.1f}; VLMo expects "
                          "inputs normalised to [-1, 1] (mean = std = 0.5)", stacklevel=3)
        return images

    def _image_batches(self, images: ImageInput):
        """Yield float [b, 3, H, W] batches on the device; files are read batch by batch."""
        if isinstance(images, Tensor):
            images = self._check_image_tensor(images)
            if images.shape[0] == 0:
                raise ValueError("images is empty: give at least one image")
            for s in range(0, images.shape[0], self.batch_size):
                yield images[s:s + self.batch_size].to(self.device, self.dtype)
            return
        if isinstance(images, (str, os.PathLike)):
            raise TypeError("images must be a list of paths (or PIL images, or a tensor), "
                            "got a single path: wrap it in a list")
        try:
            images = list(images)
        except TypeError:
            raise TypeError(f"images must be a tensor or a list of paths/PIL images, got "
                            f"{type(images).__name__}") from None
        if not images:
            raise ValueError("images is empty: give at least one image")
        size = self.config.img_size
        for s in range(0, len(images), self.batch_size):
            batch = [load_image(im, size) for im in images[s:s + self.batch_size]]
            yield torch.stack(batch).to(self.device, self.dtype)

    @staticmethod
    def _num_images(images: ImageInput) -> int:
        if isinstance(images, Tensor):
            return 1 if images.dim() == 3 else images.shape[0]
        return len(images) if hasattr(images, "__len__") else 0

    def _check_texts(self, texts) -> List[str]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single string: wrap it in a list")
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}") from None
        if not texts:
            raise ValueError("texts is empty: give at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
        return texts

    def tokenize(self, texts: Sequence[str]):
        """(text_ids, text_mask) [N, max_text_len]; over-long texts handled per `on_long_text`."""
        if self.tokenizer is None:
            raise RuntimeError("this Encoder has no tokenizer: build it with Encoder(model, tokenizer) "
                               "or load a folder that has one (vocab.txt, written by tokenizer.save)")
        texts = self._check_texts(texts)
        max_len = self.config.max_text_len
        # one extra slot shows which texts need more than max_len tokens
        _, probe_mask = self.tokenizer.encode_batch(texts, max_len=max_len + 1)
        too_long = torch.nonzero(probe_mask[:, -1]).flatten().tolist()
        if too_long and self.on_long_text != "ignore":
            example = texts[too_long[0]]
            msg = (f"{len(too_long)} of {len(texts)} texts are longer than the model's "
                   f"max_text_len={max_len} tokens (e.g. texts[{too_long[0]}] = "
                   f"{example[:60]!r}{'...' if len(example) > 60 else ''})")
            if self.on_long_text == "error":
                raise ValueError(msg)
            warnings.warn(msg + "; they are truncated", stacklevel=3)
        return self.tokenizer.encode_batch(texts, max_len=max_len)

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, disable=not self.progress, unit="item")

    # -- embeddings ------------------------------------------------------------------------
    @torch.no_grad()
    def iter_image_embeddings(self, images: ImageInput):
        """Yield [b, D] float32 CPU embeddings batch by batch (files are read lazily), for
        corpora that should stream to disk instead of being held in memory."""
        with self._bar(self._num_images(images), "embed images") as bar:
            for batch in self._image_batches(images):
                yield self.model.encode_image(batch).features.float().cpu()
                bar.update(batch.shape[0])

    def embed_images(self, images: ImageInput) -> Tensor:
        """[N, D] float32 L2-normalised ITC image embeddings (on the CPU)."""
        return torch.cat(list(self.iter_image_embeddings(images)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """[N, D] float32 L2-normalised ITC text embeddings (on the CPU)."""
        ids, mask = self.tokenize(texts)
        out = []
        with self._bar(ids.shape[0], "embed texts") as bar:
            for s in range(0, ids.shape[0], self.batch_size):
                enc = self.model.encode_text(ids[s:s + self.batch_size].to(self.device),
                                             mask[s:s + self.batch_size].to(self.device))
                out.append(enc.features.float().cpu())
                bar.update(min(self.batch_size, ids.shape[0] - s))
        return torch.cat(out)

    @torch.no_grad()
    def itm_score(self, images: ImageInput, texts: Sequence[str], *, kind: str = "prob") -> Tensor:
        """ITM score of each (image, text) pair, [N] float32: images[i] with texts[i]. One
        image with many texts (or one text with many images) is broadcast.
        kind: "prob" = softmax probability of "match"; "logit" = raw positive logit (the
        reference's re-rank score)."""
        if kind not in ("prob", "logit"):
            raise ValueError(f"kind must be 'prob' or 'logit', got {kind!r}")
        ids, mask = self.tokenize(texts)
        n_img, n_txt = self._num_images(images), ids.shape[0]
        if n_img != n_txt and 1 not in (n_img, n_txt):
            raise ValueError(f"itm_score pairs images[i] with texts[i]: got {n_img} images and "
                             f"{n_txt} texts (equal counts, or one of them 1)")
        all_images = torch.cat(list(self._image_batches(images)))
        n = max(n_img, n_txt)
        if all_images.shape[0] == 1:
            all_images = all_images.expand(n, -1, -1, -1)
        if ids.shape[0] == 1:
            ids, mask = ids.expand(n, -1), mask.expand(n, -1)
        out = []
        with self._bar(n, "ITM") as bar:
            for s in range(0, n, self.batch_size):
                sl = slice(s, s + self.batch_size)
                logits = self.model.itm_logits(self.model.encode_pair(
                    ids[sl].to(self.device), all_images[sl], mask[sl].to(self.device))).float()
                out.append((logits.softmax(-1)[:, 1] if kind == "prob" else logits[:, 1]).cpu())
                bar.update(logits.shape[0])
        return torch.cat(out)
