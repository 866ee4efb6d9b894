"""Zero-shot classification from text prompts (CLIP protocol with the ITC dual encoder).

Each class name is written into every prompt template ("a photo of a {}."), the prompts are
encoded by the text encoder, their L2-normalised features averaged and re-normalised: one
class embedding per class. An image's prediction is the class with the highest cosine
similarity to its image feature.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..env import INTEGER_DTYPES

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
    if not class_names:
        raise ValueError("class_names is empty: zero-shot classification needs at least one class")
    if not templates:
        raise ValueError("templates is empty: give at least one prompt template such as '{}'")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' placeholder for the class name")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names has duplicates")
    return [t.format(name) for name in class_names for t in templates]


def class_embeddings_from_prompts(prompt_features: Tensor, num_classes: int) -> Tensor:
    """[num_classes * T, D] prompt features (class-major) -> [num_classes, D] unit vectors."""
    if prompt_features.shape[0] % num_classes:
        raise ValueError(f"{prompt_features.shape[0]} prompt features do not split into "
                         f"{num_classes} classes")
    per_class = F.normalize(prompt_features.float(), dim=-1).view(num_classes, -1, prompt_features.shape[-1])
    return F.normalize(per_class.mean(1), dim=-1)


def zeroshot_accuracy(image_features: Tensor, class_embeddings: Tensor, labels,
                      ks: Sequence[int] = (1,)) -> Dict[str, float]:
    """Top-k accuracy of cosine-similarity classification. Ties count against the image
    (a wrong class scoring >= the right one ranks before it)."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype not in INTEGER_DTYPES:
        raise ValueError(f"labels must be a 1-D integer tensor of class indices, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    labels = labels.long().to(image_features.device)
    n, c = image_features.shape[0], class_embeddings.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} images")
    if n == 0:
        raise ValueError("zeroshot_accuracy needs at least one image")
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must be class indices in [0, {c}), got [{int(labels.min())}, "
                         f"{int(labels.max())}]: unknown class label")
    if image_features.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"image features have size {image_features.shape[1]} but class embeddings "
                         f"{class_embeddings.shape[1]}")
    scores = F.normalize(image_features.float(), dim=-1) @ class_embeddings.float().to(image_features.device).T
    right = scores.gather(1, labels[:, None])
    rank = (scores >= right).sum(1) - 1   # wrong classes at or above the right one
    return {f"top{k}": float((rank < k).double().mean()) for k in ks}


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, class_names: Sequence[str],
                        templates: Sequence[str] = DEFAULT_TEMPLATES, *, max_len: Optional[int] = None,
                        batch_size: int = 64, device=None) -> Tensor:
    """Class embeddings [C, D] from the model's text encoder."""
    from .retrieval import encode_features
    prompts = class_prompts(class_names, templates)
    max_len = max_len or model.config.max_text_len
    ids, mask = tokenizer.encode_batch(prompts, max_len=max_len)
    was_training = model.training
    model.eval()
    try:
        feats = encode_features(model, text_ids=ids, text_mask=mask, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    return class_embeddings_from_prompts(feats, len(class_names))


@torch.no_grad()
def evaluate_zeroshot(model, tokenizer, images: Tensor, labels, class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, *, batch_size: int = 64,
                      device=None, progress: bool = False) -> Dict[str, float]:
    from .retrieval import encode_features
    classes = zeroshot_classifier(model, tokenizer, class_names, templates, batch_size=batch_size,
                                  device=device)
    was_training = model.training
    model.eval()
    try:
        feats = encode_features(model, images=images, batch_size=batch_size, device=device,
                                progress=progress)
    finally:
        model.train(was_training)
    ks = (1, 5) if len(class_names) > 5 else (1,)
    out = zeroshot_accuracy(feats, classes.to(feats.device), labels, ks)
    out.update(num_images=int(images.shape[0]), num_classes=len(class_names),
               chance=1.0 / len(class_names))
    return out
