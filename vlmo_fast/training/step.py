"""One pretraining step as ONE module call: `PretrainStep(batch) -> {"loss": ..., "metrics": ...}`.

Running the whole step inside one `forward` is what DeepSpeed ZeRO-3 needs (`engine(batch)`):
it gathers a module's partitioned parameters in its forward hooks, so parameters used outside
their owner's forward (CLS token, positions, the bias table, logit scales, the MIM mask token)
are registered as external parameters of the step module (`vlmo_fast.training.engine`).

Stage objectives (VLMo's recipe, vlmo-reference.md):
- vision: masked image modelling. Masked patches (the loader's BEiT blockwise `patch_mask`) are
  replaced by a learned mask embedding; a linear decoder regresses each masked patch's pixels,
  normalised per patch (no visual tokenizer is available offline). Loss on masked patches only.
- text: MLM on text-only input (language expert everywhere).
- vl: ITC (both ITC heads, 0.5 * (itc + itc_vl)) + ITM with global hard negatives + MLM on
  image-text pairs, weighted by `loss_weights` (reference: itc 1, itm 1, mlm 0.25).

The fast step (vs the reference's six padded passes and per-row sampler loop):
- ITC halves: images and texts of one rank in one packed pass (`layout="packed"`, the VL re-run
  for itc_vl packed as well), or on CPU two padded passes with texts trimmed to the longest
  real text of the step (exact: padded keys are masked, positions are unchanged) -
  the CPU attention core materialises a pack's T x T logits, so packing loses there.
- ITM + MLM pairs: the 3B ITM pairs and the B MLM pairs in ONE fusion pass (packed or trimmed).
- negatives: one call of the extension's sampler over the all-gathered similarities, with
  exclude masks from `image_ids` (two captions of one image are never each other's negative).
- MLM logits only at masked positions (`torch.nonzero_static` on accelerators, with a budget
  of mean + 8 sd of the masked count: no host sync).
- losses and metrics stay on the device; the caller syncs them every N steps.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_gather_rows, world_and_rank
from ..hard_negatives import sample_global_hard_negatives
from ..losses import contrastive_loss

HARD_NEGATIVE_MODES = ("global", "local", "none")
LAYOUTS = ("auto", "packed", "padded")
DEFAULT_LOSS_WEIGHTS = {"itc": 1.0, "itm": 1.0, "mlm": 0.25}


# --------------------------------------------------------------------------- MIM

class MIMHead(nn.Module):
    """Mask embedding + linear pixel decoder of the vision stage (not part of VLMo's weights)."""

    def __init__(self, dim: int, patch_size: int, in_chans: int = 3, init_std: float = 0.02):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder = nn.Linear(dim, patch_size * patch_size * in_chans)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        nn.init.trunc_normal_(self.decoder.weight, std=init_std)
        nn.init.zeros_(self.decoder.bias)

    def no_weight_decay(self) -> set:
        """The mask embedding is a learned input, like the CLS token: not decayed."""
        return {"mask_token"}


def patch_targets(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, P, p*p*C] pixels per patch, normalised per patch (mean 0, var 1)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + 1e-6).sqrt()


# --------------------------------------------------------------------------- masked positions

def masked_positions(labels: Tensor, probability: float = 0.15,
                     static: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """(row, col) of every label != -100, without a host sync on accelerators.

    On CPU (static=False): plain nonzero. Elsewhere: `nonzero_static` with a budget of
    mean + 8 sd of the Binomial(n, p) count (+16), which a 15 % masking exceeds with
    probability < 1e-15; filler rows point at (0, 0) with a -100 label (ignored by the loss).
    Returns (index [K, 2], labels [K])."""
    selected = labels != -100
    if static is None:
        static = labels.device.type != "cpu"
    if not static:
        idx = selected.nonzero()
        return idx, labels[idx[:, 0], idx[:, 1]]
    n = labels.numel()
    mean = n * probability
    budget = min(n, int(mean + 8 * math.sqrt(mean * (1 - probability)) + 16))
    idx = torch.nonzero_static(selected, size=budget, fill_value=-1)
    filler = idx[:, 0] < 0
    idx = idx.clamp(min=0)
    picked = torch.where(filler, torch.full_like(idx[:, 0], -100), labels[idx[:, 0], idx[:, 1]])
    return idx, picked


def mlm_loss_and_accuracy(model, hidden_at: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    logits = model.mlm_head(hidden_at).float()
    valid = labels != -100
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / valid.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
    return loss, acc.detach()


# --------------------------------------------------------------------------- encoders

def packed_dual_encode(model, images: Tensor, text_ids: Tensor, text_mask: Tensor, return_vl: bool):
    """Images and texts (dual encoder) in ONE packed pass, plus the itc_vl re-run of the VL
    layers on the same pack (`VLMo.encode_packed(return_vl=...)`). One host sync (the lengths)."""
    out = model.encode_packed(images=images, text_ids=text_ids, text_mask=text_mask, return_vl=return_vl)
    return out.image_features, out.text_features, out.image_vl_features, out.text_vl_features


def padded_dual_encode(model, images: Tensor, text_ids: Tensor, text_mask: Tensor, return_vl: bool):
    img = model.encode_image(images, return_vl=return_vl)
    txt = model.encode_text(text_ids, text_mask, return_vl=return_vl)
    return img.features, txt.features, img.vl_features, txt.vl_features


def fusion_encode(model, text_ids: Tensor, images: Tensor, text_mask: Tensor, layout: str):
    """Pairs through the fusion encoder -> (pooled [N, d], text_hidden(rows, cols) -> [K, d])."""
    if layout == "packed":
        out = model.encode_packed(pair_text_ids=text_ids, pair_images=images, pair_text_mask=text_mask)
        keep = text_mask.bool()
        # pack index of text token (b, l): the sequence's start + its rank among kept tokens
        offsets = keep.long().cumsum(1) - 1
        starts = out.packing.starts

        def text_hidden(rows: Tensor, cols: Tensor) -> Tensor:
            return out.hidden.index_select(0, starts[rows] + offsets[rows, cols])
        return out.pair_pooled, text_hidden
    out = model.encode_pair(text_ids, images, text_mask)

    def text_hidden(rows: Tensor, cols: Tensor) -> Tensor:
        return out.hidden[rows, cols]
    return out.pooled, text_hidden


def text_encode_hidden(model, text_ids: Tensor, text_mask: Tensor, layout: str):
    """Text-only pass -> text_hidden(rows, cols) -> [K, d] (for text-stage MLM)."""
    if layout == "packed":
        out = model.encode_packed(text_ids=text_ids, text_mask=text_mask)
        offsets = text_mask.long().cumsum(1) - 1
        starts = out.packing.starts
        return lambda rows, cols: out.hidden.index_select(0, starts[rows] + offsets[rows, cols])
    out = model.encode_text(text_ids, text_mask)
    return lambda rows, cols: out.hidden[rows, cols]


def trim_text(length: int, *tensors: Tensor) -> Tuple[Tensor, ...]:
    return tuple(t[:, :length] for t in tensors)


# --------------------------------------------------------------------------- the step

class PretrainStep(nn.Module):
    """batch -> {"loss": scalar with graph, "metrics": {name: detached 0-d tensor}}.

    model: a VLMo (possibly in a stage layout, see `vlmo_fast.training.stages`).
    stage: "vision" | "text" | "vl". hard_negatives: "global" (sampled from the similarities
    of the local rows against the all-gathered batch, the reference), "local" (this rank's
    batch only) or "none" (uniformly random negatives). layout: "packed" | "padded" | "auto"
    (packed on CUDA). generator: the hard-negative sampler's random stream (checkpointed).
    """

    def __init__(self, model: nn.Module, stage: str, *, hard_negatives: str = "global",
                 layout: str = "auto", loss_weights: Optional[Dict[str, float]] = None,
                 mlm_probability: float = 0.15, generator: Optional[torch.Generator] = None,
                 hard_negative_warmup: int = 0, hard_negative_scale: float = 1.0):
        super().__init__()
        if stage not in ("vision", "text", "vl"):
            raise ValueError(f"stage must be 'vision', 'text' or 'vl', got {stage!r}")
        if hard_negatives not in HARD_NEGATIVE_MODES:
            raise ValueError(f"hard_negatives must be one of {HARD_NEGATIVE_MODES}, got {hard_negatives!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for k, v in (loss_weights or {}).items():
            if k not in weights:
                raise ValueError(f"loss_weights: unknown objective {k!r}; expected {sorted(weights)}")
            weights[k] = float(v)
        self.model, self.stage = model, stage
        self.hard_negatives, self.layout = hard_negatives, layout
        if isinstance(hard_negative_warmup, bool) or not isinstance(hard_negative_warmup, int) \
                or hard_negative_warmup < 0:
            raise ValueError(f"hard_negative_warmup must be an int >= 0, got {hard_negative_warmup!r}")
        # optimizer steps 1..hard_negative_warmup draw ITM negatives uniformly (as "none") before
        # the hard ones: the optimizer step is set by the training loop (`set_step`)
        self.hard_negative_warmup, self.step = hard_negative_warmup, 0
        if isinstance(hard_negative_scale, bool) or not isinstance(hard_negative_scale, (int, float)) \
                or not 0.0 <= hard_negative_scale <= 1.0:
            raise ValueError(f"hard_negative_scale must be a number in [0, 1], got {hard_negative_scale!r}")
        # the ITM negatives are drawn from softmax(scale * ITC logits): 1 is the reference,
        # 0 uniform; in between, negatives lean towards the similar ones without being the
        # nearest (a tiny model's ITM cannot learn from the nearest ones: see the README)
        self.hard_negative_scale = float(hard_negative_scale)
        self.loss_weights, self.mlm_probability = weights, mlm_probability
        self.generator = generator
        if stage == "vision":
            c = model.config
            self.mim_head = MIMHead(c.dim, c.patch_size, c.in_chans, c.init_std)
        else:
            self.mim_head = None

    def set_step(self, step: int) -> None:
        """The optimizer step (1-based) the next forward belongs to (TrainLoop calls it; a
        resumed run sets it from the checkpoint's step, so the warm-up resumes exactly)."""
        self.step = int(step)

    # which parameters ZeRO-3 must gather for the whole step (used outside their owner's forward)
    def external_parameters(self):
        m = self.model
        owners = [m, m.token_type_embeddings, m.rel_pos_bias, m.itc, m.itc_vl, m.mlm_head, self.mim_head]
        return [p for owner in owners if owner is not None for p in owner.parameters(recurse=False)]

    def _layout(self, device: torch.device) -> str:
        if self.layout == "auto":
            return "packed" if device.type == "cuda" else "padded"
        return self.layout

    def forward(self, batch: Dict[str, Tensor]) -> Dict[str, object]:
        if self.stage == "vision":
            return self._vision(batch)
        if self.stage == "text":
            return self._text(batch)
        return self._vl(batch)

    # -- stage 1 ---------------------------------------------------------------------------
    def _vision(self, batch):
        m, head = self.model, self.mim_head
        images, patch_mask = batch["images"], batch["patch_mask"]
        hidden = m.encode_image(images, patch_mask=patch_mask, mask_token=head.mask_token).hidden
        pred = head.decoder(hidden[:, 1:]).float()
        target = patch_targets(images.float(), head.patch_size)
        per_patch = (pred - target).pow(2).mean(-1)
        weight = patch_mask.float()
        loss = (per_patch * weight).sum() / weight.sum().clamp(min=1)
        return {"loss": loss, "metrics": {"mim": loss.detach()}}

    # -- stage 2 ---------------------------------------------------------------------------
    def _text(self, batch):
        m = self.model
        ids, mask, labels = batch["mlm_ids"], batch["text_mask"], batch["mlm_labels"]
        layout = self._layout(ids.device)
        if layout == "padded":
            ids, mask, labels = trim_text(int(mask.sum(1).max()), ids, mask, labels)
        text_hidden = text_encode_hidden(m, ids, mask, layout)
        idx, picked = masked_positions(labels, self.mlm_probability)
        loss, acc = mlm_loss_and_accuracy(m, text_hidden(idx[:, 0], idx[:, 1]), picked)
        return {"loss": loss, "metrics": {"mlm": loss.detach(), "mlm_acc": acc}}

    # -- stage 3 ---------------------------------------------------------------------------
    def itc_features(self, batch, layout: Optional[str] = None):
        """(img, txt, img_vl, txt_vl) ITC features of the local batch (vl ones may be None)."""
        m = self.model
        images, text_ids, text_mask = batch["images"], batch["text_ids"], batch["text_mask"]
        layout = layout or self._layout(images.device)
        if layout == "packed":
            return packed_dual_encode(m, images, text_ids, text_mask, return_vl=True)
        return padded_dual_encode(m, images, text_ids, text_mask, return_vl=True)

    def _vl(self, batch):
        m = self.model
        images, text_ids, text_mask = batch["images"], batch["text_ids"], batch["text_mask"]
        mlm_ids, mlm_labels, image_ids = batch["mlm_ids"], batch["mlm_labels"], batch["image_ids"]
        b = images.shape[0]
        world, rank = world_and_rank()
        layout = self._layout(images.device)
        # raw inputs of every rank, for the negatives (the reference gathers them too)
        gathered = [all_gather_rows(t) for t in (images, text_ids, text_mask, image_ids)]
        images_all, text_all, mask_all, image_ids_all = gathered
        if layout == "padded":
            # one host sync: the longest real text among everything this step encodes
            length = int(mask_all.sum(1).max())
            text_ids, text_mask, mlm_ids, mlm_labels = trim_text(length, text_ids, text_mask, mlm_ids, mlm_labels)
            text_all, mask_all = trim_text(length, text_all, mask_all)
        local = dict(batch, text_ids=text_ids, text_mask=text_mask)
        if batch.get("_features_only"):
            # --itc-accum cached, first pass: features only (same RNG draws as the re-forward)
            with torch.no_grad():
                feats = self.itc_features(local, layout)
                scales = [m.itc.logit_scale.detach().clone()]
                if m.itc_vl is not None:
                    scales.append(m.itc_vl.logit_scale.detach().clone())
            return {"features": feats, "logit_scales": scales}
        img, txt, img_vl, txt_vl = self.itc_features(local, layout)
        metrics = {}

        # ITC over the global batch (both heads, as the reference)
        itc_grads = batch.get("_itc_grads")
        if itc_grads is None:
            loss_itc, stats = contrastive_loss(img, txt, m.itc.logit_scale, return_stats=True,
                                               rank_grad_reduction="mean")
            metrics.update(itc=loss_itc.detach(), itc_i2t_acc=stats.i2t_accuracy, itc_t2i_acc=stats.t2i_accuracy)
            if img_vl is not None:
                loss_itc_vl = contrastive_loss(img_vl, txt_vl, m.itc_vl.logit_scale, rank_grad_reduction="mean")
                metrics["itc_vl"] = loss_itc_vl.detach()
                loss_itc = 0.5 * (loss_itc + loss_itc_vl)
        else:
            # --itc-accum cached: the ITC loss of the accumulated batch was computed on cached
            # features; this surrogate has exactly its gradient for this micro-batch's rows
            loss_itc = self._itc_surrogate(itc_grads, (img, txt, img_vl, txt_vl))
        metrics["logit_scale"] = m.itc.logit_scale.detach().reshape(())
        if m.itc_vl is not None:
            metrics["logit_scale_vl"] = m.itc_vl.logit_scale.detach().reshape(())

        # ITM with hard negatives
        with torch.no_grad():
            neg_txt, neg_img = self._sample_negatives(img.detach(), txt.detach(), image_ids,
                                                      image_ids_all, b, world, rank)
        pair_ids = torch.cat([mlm_ids, text_ids, text_all[neg_txt], text_ids])
        pair_mask = torch.cat([text_mask, text_mask, mask_all[neg_txt], text_mask])
        pair_images = torch.cat([images, images, images, images_all[neg_img]])
        pooled, text_hidden = fusion_encode(m, pair_ids, pair_images, pair_mask, layout)
        itm_logits = m.itm_head(pooled[b:]).float()
        itm_labels = torch.cat([torch.ones(b, dtype=torch.long, device=images.device),
                                torch.zeros(2 * b, dtype=torch.long, device=images.device)])
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        metrics["itm"] = loss_itm.detach()
        metrics["itm_acc"] = (itm_logits.argmax(-1) == itm_labels).float().mean().detach()

        # MLM on the first b pairs, logits only at masked positions
        idx, picked = masked_positions(mlm_labels, self.mlm_probability)
        loss_mlm, acc = mlm_loss_and_accuracy(m, text_hidden(idx[:, 0], idx[:, 1]), picked)
        metrics["mlm"] = loss_mlm.detach()
        metrics["mlm_acc"] = acc
        w = self.loss_weights
        loss = w["itc"] * loss_itc + w["itm"] * loss_itm + w["mlm"] * loss_mlm
        out = {"loss": loss, "metrics": metrics}
        if itc_grads is not None:
            # the surrogate's value means nothing: report the objective with the cached ITC value
            out["loss_value"] = (w["itc"] * itc_grads["value"] + w["itm"] * loss_itm.detach()
                                 + w["mlm"] * loss_mlm.detach())
        return out

    def _itc_surrogate(self, grads: Dict[str, Tensor], features: Sequence[Optional[Tensor]]) -> Tensor:
        m = self.model
        total = m.itc.logit_scale.sum() * grads["logit_scale"].sum() / grads["num_micro"]
        for feat, g in zip(features, (grads["img"], grads["txt"], grads.get("img_vl"), grads.get("txt_vl"))):
            if feat is not None and g is not None:
                total = total + (feat.float() * g).sum()
        if m.itc_vl is not None and "logit_scale_vl" in grads:
            total = total + m.itc_vl.logit_scale.sum() * grads["logit_scale_vl"].sum() / grads["num_micro"]
        # the engine divides every micro-batch's loss by the accumulation steps
        return total * grads["num_micro"]

    def _sample_negatives(self, img: Tensor, txt: Tensor, image_ids: Tensor, image_ids_all: Tensor,
                          b: int, world: int, rank: int) -> Tuple[Tensor, Tensor]:
        """Global indices (into the gathered batch) of one negative text per local image and
        one negative image per local text."""
        scale = self.model.itc.logit_scale.detach().float().exp()
        if self.hard_negatives == "local":
            img_all, txt_all, ids_all, offset, sample_rank = img, txt, image_ids, rank * b, 0
        else:
            img_all, txt_all, ids_all, offset, sample_rank = all_gather_rows(img), all_gather_rows(txt), \
                image_ids_all, 0, rank
        sim_i2t = scale * img.float() @ txt_all.float().t()
        sim_t2i = scale * txt.float() @ img_all.float().t()
        # (step 0: a forward outside the training loop, which never set a step: no warm-up)
        if self.hard_negatives == "none" or 0 < self.step <= self.hard_negative_warmup:
            sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
        elif self.hard_negative_scale != 1.0:
            sim_i2t, sim_t2i = self.hard_negative_scale * sim_i2t, self.hard_negative_scale * sim_t2i
        exclude = image_ids[:, None] == ids_all[None, :]
        # a row whose every column shows its own image keeps only the positive excluded
        # (its negative is then another caption of the same image: better than no ITM row)
        full = exclude.all(1, keepdim=True)
        positive = torch.arange(b, device=img.device) + sample_rank * b
        own = torch.zeros_like(exclude)
        own[torch.arange(b, device=img.device), positive] = True
        exclude = torch.where(full, own, exclude)
        neg_txt, neg_img = sample_global_hard_negatives(sim_i2t, sim_t2i, rank=sample_rank,
                                                        exclude_i2t=exclude, exclude_t2i=exclude,
                                                        generator=self.generator)
        return neg_txt + offset, neg_img + offset


# --------------------------------------------------------------------------- cached ITC

def _rng_state():
    return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def cached_itc_accumulation(forward, backward, micro_batches: Sequence[Dict[str, Tensor]],
                            after_backward=None) -> Tuple[list, Dict[str, Tensor]]:
    """GradCache-style ITC over several micro-batches (`--itc-accum cached`).

    1. every micro-batch's ITC features without a graph (RNG state saved per micro-batch);
    2. ONE contrastive loss over all of them (and all ranks): gradients w.r.t. the features
       and the logit scales;
    3. every micro-batch re-run with the same RNG state and its feature gradients, through
       `forward(batch)` / `backward(loss)` (the engine: its gradient accumulation adds them).
    The contrastive batch is then micro x accumulation x world, as if one big batch, at the
    memory of one micro-batch. Returns (per-micro-batch outputs, ITC metrics).
    `after_backward(k)` runs after each backward (the engine's step()).
    """
    num = len(micro_batches)
    states, feats, scales = [], [], None
    for mb in micro_batches:
        states.append(_rng_state())
        out = forward(dict(mb, _features_only=True))
        feats.append(out["features"])
        scales = out["logit_scales"]
    has_vl = feats[0][2] is not None
    leaves = [torch.cat([f[i] for f in feats]).detach().float().requires_grad_(True)
              for i in range(4 if has_vl else 2)]
    scale_leaves = [s.detach().clone().requires_grad_(True) for s in scales[:2 if has_vl else 1]]
    with torch.enable_grad():
        loss_itc, stats = contrastive_loss(leaves[0], leaves[1], scale_leaves[0], return_stats=True,
                                           rank_grad_reduction="mean")
        metrics = {"itc": loss_itc.detach(), "itc_i2t_acc": stats.i2t_accuracy,
                   "itc_t2i_acc": stats.t2i_accuracy}
        total = loss_itc
        if has_vl:
            loss_vl = contrastive_loss(leaves[2], leaves[3], scale_leaves[1], rank_grad_reduction="mean")
            metrics["itc_vl"] = loss_vl.detach()
            total = 0.5 * (loss_itc + loss_vl)
        total.backward()
    sizes = [f[0].shape[0] for f in feats]
    grads = [leaf.grad.split(sizes) for leaf in leaves]
    outs = []
    for k, mb in enumerate(micro_batches):
        g = {"img": grads[0][k], "txt": grads[1][k], "logit_scale": scale_leaves[0].grad,
             "num_micro": num, "value": total.detach()}
        if has_vl:
            g.update(img_vl=grads[2][k], txt_vl=grads[3][k], logit_scale_vl=scale_leaves[1].grad)
        _set_rng_state(states[k])
        out = forward(dict(mb, _itc_grads=g))
        backward(out["loss"])
        if after_backward is not None:
            after_backward(k)
        out["metrics"].update(metrics)
        outs.append(out)
    return outs, metrics
