"""Image-text retrieval evaluation: R@1/5/10 in both directions, two protocols.

- ITC (dual encoder): each image and each caption is encoded ONCE (batched, linear in the
  corpus size), then one similarity matmul of the L2-normalised features ranks everything.
- ITC + ITM re-rank (the reference implementation's protocol, `compute_irtr_recall_with_rerank`
  in microsoft/unilm vlmo): for every query the top `rerank_k` ITC candidates go through
  the fusion encoder; a candidate's final score is the ITM *positive logit* (raw logit of
  class 1, not a probability, as in the reference) plus its ITC cosine similarity. Candidates
  outside the top k stay below every re-ranked candidate, in their ITC order (the reference
  fills them with -100 + ITC).

Several captions per image (COCO / Flickr30k Karpathy splits): `text_to_image[t]` is the index
of caption t's image. image->text (i2t, "TR") is a hit at K when ANY of the image's captions
is among its top K texts; text->image (t2i, "IR") when the caption's own image is among its
top K images.

Ties are counted pessimistically: an item ranks behind every wrong item scoring >= its
score, so a constant scorer gets no credit (torch.topk would break ties arbitrarily).
Recalls are fractions in [0, 1].
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ..env import INTEGER_DTYPES

DEFAULT_KS = (1, 5, 10)
ITM_SCORES = ("logit", "log_prob")


# -- metrics on score matrices (no model: exactly testable) -------------------------------
def _check_text_to_image(text_to_image: Tensor, num_images: int, num_texts: int) -> Tensor:
    if not isinstance(text_to_image, Tensor):
        text_to_image = torch.as_tensor(text_to_image)
    if text_to_image.dim() != 1 or text_to_image.shape[0] != num_texts:
        raise ValueError(f"text_to_image must be 1-D with one entry per text ({num_texts}), "
                         f"got shape {tuple(text_to_image.shape)}")
    if text_to_image.dtype not in INTEGER_DTYPES:
        raise TypeError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")
    text_to_image = text_to_image.long()
    if num_texts and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images):
        raise ValueError(f"text_to_image values must be image indices in [0, {num_images}), got "
                         f"range [{int(text_to_image.min())}, {int(text_to_image.max())}]")
    counts = torch.bincount(text_to_image, minlength=num_images)
    if num_images and bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:8].tolist()
        raise ValueError(f"{int((counts == 0).sum())} image(s) have no caption in text_to_image "
                         f"(e.g. {missing}); image->text recall is undefined for them")
    return text_to_image


def _positive_ranks(scores: Tensor, positive: Tensor) -> Tensor:
    """Rank (0 = first) of each row's best positive: the number of negatives scoring >= it."""
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best = torch.where(positive, scores, neg_inf).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def recall_at_k(scores_i2t: Tensor, scores_t2i: Tensor, text_to_image: Tensor,
                ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> Dict[str, float]:
    """Karpathy-style recalls from score matrices.

    scores_i2t: [num_images, num_texts] (row i scores every text for image i);
    scores_t2i: [num_texts, num_images]; for plain ITC pass `sim` and `sim.T`.
    Returns {"i2t_r1": ..., "t2i_r1": ..., ..., "mean": mean of all}.
    """
    if scores_i2t.dim() != 2 or scores_t2i.dim() != 2:
        raise ValueError("scores_i2t and scores_t2i must be 2-D")
    num_images, num_texts = scores_i2t.shape
    if tuple(scores_t2i.shape) != (num_texts, num_images):
        raise ValueError(f"scores_t2i must have shape {(num_texts, num_images)} (texts x images), "
                         f"got {tuple(scores_t2i.shape)}")
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {num_images} "
                         f"images and {num_texts} texts")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    t2i = _check_text_to_image(text_to_image, num_images, num_texts).to(scores_i2t.device)
    image_index = torch.arange(num_images, device=scores_i2t.device)
    i2t_ranks, t2i_ranks = [], []
    for s in range(0, num_images, chunk):   # row chunks bound the [rows, N] masks' memory
        rows = scores_i2t[s:s + chunk]
        positive = t2i[None, :] == image_index[s:s + chunk, None]
        i2t_ranks.append(_positive_ranks(rows, positive))
    t2i_dev = t2i.to(scores_t2i.device)
    image_index = image_index.to(scores_t2i.device)
    for s in range(0, num_texts, chunk):
        rows = scores_t2i[s:s + chunk]
        positive = image_index[None, :] == t2i_dev[s:s + chunk, None]
        t2i_ranks.append(_positive_ranks(rows, positive))
    i2t_rank, t2i_rank = torch.cat(i2t_ranks), torch.cat(t2i_ranks)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).double().mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).double().mean())
    out["mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(text_to_image: Tensor, num_images: int,
                  ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """Expected R@K of a uniformly random ranking, the baseline to print beside results.
    i2t: an image with c of the Nt captions is a hit unless all K draws (without replacement)
    miss them: 1 - C(Nt - c, K) / C(Nt, K); t2i: K / Ni."""
    text_to_image = _check_text_to_image(text_to_image, num_images, len(text_to_image))
    nt = int(text_to_image.numel())
    counts = torch.bincount(text_to_image, minlength=num_images).double()
    out = {}
    for k in ks:
        miss = torch.ones_like(counts)
        for j in range(min(k, nt)):
            miss = miss * ((nt - counts - j).clamp(min=0) / (nt - j))
        out[f"i2t_r{k}"] = float((1 - miss).mean())
    for k in ks:
        out[f"t2i_r{k}"] = min(1.0, k / num_images)
    out["mean"] = sum(out.values()) / len(out)
    return out


def rerank_scores(itc_scores: Tensor, candidates: Tensor, itm_scores: Tensor) -> Tensor:
    """Full score matrix after re-ranking: ITM + ITC on each row's candidates; every other
    entry keeps its ITC order but sits below all of that row's re-ranked candidates.

    itc_scores [Q, N]; candidates [Q, k] column indices; itm_scores [Q, k]."""
    if candidates.shape != itm_scores.shape or candidates.shape[0] != itc_scores.shape[0]:
        raise ValueError(f"candidates {tuple(candidates.shape)} and itm_scores "
                         f"{tuple(itm_scores.shape)} must both be [{itc_scores.shape[0]}, k]")
    itc_scores = itc_scores.float()
    fused = itm_scores.float() + itc_scores.gather(1, candidates)
    if candidates.shape[1] == 0:
        return itc_scores.clone()
    # shift the rest so its best entry is 1 below the worst fused candidate of the row
    shift = fused.amin(1, keepdim=True) - 1.0 - itc_scores.amax(1, keepdim=True)
    out = itc_scores + shift
    out.scatter_(1, candidates, fused)
    return out


# -- model-driven evaluation --------------------------------------------------------------
@dataclass
class RetrievalResult:
    """Recalls (fractions) per protocol, and wall time of each protocol in seconds.

    `rerank_seconds` counts only the ITM passes; the re-rank protocol's total time is
    itc_seconds + rerank_seconds (it needs the ITC ranking first)."""
    itc: Dict[str, float]
    rerank: Optional[Dict[str, float]]
    itc_seconds: float
    rerank_seconds: float
    num_images: int
    num_texts: int
    rerank_k: int
    itm_score: str = "logit"
    ks: tuple = DEFAULT_KS
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d

    def summary(self) -> str:
        def row(name, r):
            return name + " ".join(f"{k}={100 * v:.2f}" for k, v in r.items())
        lines = [row(f"ITC      ({self.itc_seconds:.2f}s): ", self.itc)]
        if self.rerank is not None:
            lines.append(row(f"ITC+ITM  (+{self.rerank_seconds:.2f}s, k={self.rerank_k}): ", self.rerank))
        return "\n".join(lines)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _model_dtype(model) -> torch.dtype:
    """Images are cast to the weights' floating dtype (a model cast to bf16 runs in bf16)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total)


@torch.no_grad()
def encode_features(model, images: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                    text_mask: Optional[Tensor] = None, *, batch_size: int = 64, device=None,
                    progress: bool = False) -> Tensor:
    """L2-normalised ITC features of images OR texts, batch by batch, as fp32 on `device`."""
    device = torch.device(device) if device is not None else _model_device(model)
    if (images is None) == (text_ids is None):
        raise ValueError("encode_features needs exactly one of images or text_ids")
    n = images.shape[0] if images is not None else text_ids.shape[0]
    starts = range(0, n, batch_size)
    out = []
    what = "image" if images is not None else "text"
    dtype = _model_dtype(model)
    for s in _progress(starts, progress, f"encode {what}s", len(starts)):
        if images is not None:
            enc = model.encode_image(images[s:s + batch_size].to(device, dtype, non_blocking=True))
        else:
            mask = None if text_mask is None else text_mask[s:s + batch_size].to(device)
            enc = model.encode_text(text_ids[s:s + batch_size].to(device), mask)
        out.append(enc.features.float())
    if not out:
        return torch.empty(0, 0, device=device)
    return torch.cat(out)


@torch.no_grad()
def _itm_on_candidates(model, images: Tensor, text_ids: Tensor, text_mask: Optional[Tensor],
                       image_index: Tensor, text_index: Tensor, *, batch_size: int, device,
                       itm_score: str, progress: bool, desc: str) -> Tensor:
    """ITM score of the pairs (images[image_index[j]], texts[text_index[j]]), flat, batched."""
    n = image_index.numel()
    image_index, text_index = image_index.flatten().cpu(), text_index.flatten().cpu()
    out = []
    dtype = _model_dtype(model)
    starts = range(0, n, batch_size)
    for s in _progress(starts, progress, desc, len(starts)):
        ii, ti = image_index[s:s + batch_size], text_index[s:s + batch_size]
        imgs = images.index_select(0, ii.to(images.device)).to(device, dtype, non_blocking=True)
        ids = text_ids.index_select(0, ti.to(text_ids.device)).to(device)
        mask = None if text_mask is None else text_mask.index_select(0, ti.to(text_mask.device)).to(device)
        logits = model.itm_logits(model.encode_pair(ids, imgs, mask)).float()
        out.append(logits[:, 1] if itm_score == "logit" else torch.log_softmax(logits, -1)[:, 1])
    return torch.cat(out) if out else torch.empty(0, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_retrieval(model, images: Tensor, text_ids: Tensor, text_mask: Optional[Tensor],
                       text_to_image: Tensor, *, batch_size: int = 64, rerank_k: int = 16,
                       device=None, progress: bool = False, itm_score: str = "logit",
                       ks: Sequence[int] = DEFAULT_KS) -> RetrievalResult:
    """R@K of `model` on a retrieval set, ITC and (rerank_k > 0) ITC + ITM re-rank.

    images [Ni, 3, H, W] (any device; moved batch by batch); text_ids / text_mask [Nt, L]
    (mask 1 = real token, or None); text_to_image [Nt] (each caption's image index).
    itm_score: "logit" (the reference: raw positive-class logit) or "log_prob"
    (log-softmax of the positive class). rerank_k=0 skips the re-rank protocol.
    The model is put in eval mode for the call and restored afterwards.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [N, C, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not isinstance(text_ids, Tensor) or text_ids.dim() != 2:
        raise ValueError("text_ids must be a [N, L] integer tensor")
    if text_mask is not None and text_mask.shape != text_ids.shape:
        raise ValueError(f"text_mask must have the shape of text_ids {tuple(text_ids.shape)}, "
                         f"got {tuple(text_mask.shape)}")
    if itm_score not in ITM_SCORES:
        raise ValueError(f"itm_score must be one of {ITM_SCORES}, got {itm_score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be >= 0, got {rerank_k}")
    num_images, num_texts = images.shape[0], text_ids.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {num_images} "
                         f"images and {num_texts} texts")
    text_to_image = _check_text_to_image(text_to_image, num_images, num_texts)
    device = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    try:
        _sync(device)
        t0 = time.perf_counter()
        image_features = encode_features(model, images=images, batch_size=batch_size, device=device,
                                         progress=progress)
        text_features = encode_features(model, text_ids=text_ids, text_mask=text_mask,
                                        batch_size=batch_size, device=device, progress=progress)
        sim = image_features @ text_features.T          # [Ni, Nt] cosine similarities
        itc = recall_at_k(sim, sim.T, text_to_image, ks)
        _sync(device)
        itc_seconds = time.perf_counter() - t0

        rerank, rerank_seconds = None, 0.0
        if rerank_k > 0:
            t0 = time.perf_counter()
            k_texts, k_images = min(rerank_k, num_texts), min(rerank_k, num_images)
            i2t_cand = sim.topk(k_texts, dim=1).indices                       # [Ni, k]
            t2i_cand = sim.T.topk(k_images, dim=1).indices                    # [Nt, k]
            rows_i = torch.arange(num_images, device=device)[:, None].expand_as(i2t_cand)
            itm_i2t = _itm_on_candidates(model, images, text_ids, text_mask, rows_i, i2t_cand,
                                         batch_size=batch_size, device=device, itm_score=itm_score,
                                         progress=progress, desc="ITM re-rank i2t").view_as(i2t_cand)
            rows_t = torch.arange(num_texts, device=device)[:, None].expand_as(t2i_cand)
            itm_t2i = _itm_on_candidates(model, images, text_ids, text_mask, t2i_cand, rows_t,
                                         batch_size=batch_size, device=device, itm_score=itm_score,
                                         progress=progress, desc="ITM re-rank t2i").view_as(t2i_cand)
            rerank = recall_at_k(rerank_scores(sim, i2t_cand, itm_i2t),
                                 rerank_scores(sim.T, t2i_cand, itm_t2i), text_to_image, ks)
            _sync(device)
            rerank_seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    return RetrievalResult(itc=itc, rerank=rerank, itc_seconds=itc_seconds,
                           rerank_seconds=rerank_seconds, num_images=num_images,
                           num_texts=num_texts, rerank_k=rerank_k, itm_score=itm_score,
                           ks=tuple(ks))
