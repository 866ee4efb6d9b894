"""VLMo: embeddings -> MoME blocks -> final norm -> heads.

Three ways through the same blocks (see docs/ARCHITECTURE.md):
- `encode_image` / `encode_text`: dual encoder, every layer uses the modality's own expert;
  `return_vl=True` also re-runs the VL layers with the VL expert from the input of the first
  VL layer (the reference's second ITC branch, "itc_vl").
- `encode_pair`: fusion encoder over [text ; image]; below the VL layers each token goes to
  its modality's expert, in the VL layers every token goes to the VL expert.
- `encode_packed`: any mix of the above as one pack without padding (`return_vl` as well).
Every pass goes through `_run`, the one block loop (activation checkpointing lives there).

Ablation switches (VLMoConfig): `vl_expert=False` routes a pair's tokens by type in the VL
layers too (no itc_vl branch); `attention="per_modality"` gives every block a language
attention beside the vision one, and each token (including a pair's, in the VL layers) uses
its own modality's (`_run` passes the token types as `token_modality`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .block import MoMEBlock
from .config import VLMoConfig
from .embeddings import PatchEmbed, RelativePositionBias, TextEmbeddings
from .heads import ClassificationHead, ContrastiveHead, MLMHead, Pooler
from .mome import LANGUAGE, VISION, VISION_LANGUAGE
from .packing import PackedSequences


@dataclass
class EncoderOutput:
    hidden: Tensor                        # [B, L, dim] after the final LayerNorm
    features: Optional[Tensor] = None     # L2-normalised ITC features [B, embed] (dual encoder)
    vl_features: Optional[Tensor] = None  # ITC features of the VL-expert branch (return_vl=True)
    pooled: Optional[Tensor] = None       # pooler(hidden[:, 0]) (fusion encoder)
    text_len: int = 0                     # the first text_len positions are text


@dataclass
class PackedEncoderOutput:
    """`VLMo.encode_packed`: images, texts and pairs encoded in ONE pass, in that order."""
    hidden: Tensor                        # [T, dim] after the final LayerNorm, sequences back to back
    packing: PackedSequences              # lengths / cu_seqlens / document ids of the pack
    kinds: Tuple[str, ...]                # per sequence: "image", "text" or "pair"
    cls: Tensor                           # [N, dim] final hidden state of each sequence's first token
    image_features: Optional[Tensor] = None  # [num_images, embed] L2-normalised ITC features
    text_features: Optional[Tensor] = None   # [num_texts, embed]
    pair_pooled: Optional[Tensor] = None     # [num_pairs, dim] pooler(CLS) for ITM / classification
    pair_text_lengths: Tuple[int, ...] = ()  # real text tokens at the start of each pair sequence
    image_vl_features: Optional[Tensor] = None  # [num_images, embed] itc_vl features (return_vl=True)
    text_vl_features: Optional[Tensor] = None   # [num_texts, embed]

    def sequences(self) -> List[Tensor]:
        """Per-sequence hidden states [L_i, dim] (views)."""
        return self.packing.split(self.hidden)


class _PackedPart(NamedTuple):
    """The real tokens of a group of same-layout sequences, ready to be packed."""
    tokens: Tensor          # [n, dim] embedded tokens, padding dropped
    ids_below: Tensor       # [n] expert per token below the VL layers
    ids_vl: Tensor          # [n] expert per token in the VL layers
    is_text: Tensor         # [n] bool
    positions: Tensor       # [n] position inside the token's modality segment
    lengths: List[int]      # real tokens per sequence


class VLMo(nn.Module):
    """VLMo: a unified vision-language transformer of `MoMEBlock`s (arXiv 2111.02358).

    Build with `VLMo.from_preset("base")` (tiny | base | large | base_plus) or
    `VLMo(VLMoConfig(...))`; load weights with `VLMo.from_pretrained(dir)` or the reference /
    BEiT converters in `vlmo_fast.checkpoint`.

    Passes (each returns an `EncoderOutput`): `encode_image(images)` and
    `encode_text(text_ids, text_mask)` (dual encoder: L2-normalised ITC features),
    `encode_pair(text_ids, images, text_mask)` (fusion encoder: pooled [CLS] for ITM /
    classification, hidden states for MLM), `encode_packed(...)` (all three kinds in one
    pass without padding). Heads: `itm_logits`, `mlm_logits`, `classify`. Images are
    float [B, in_chans, img_size, img_size]; text_ids integer [B, L] (1 <= L <=
    max_text_len, [CLS] first); text_mask 1 = real token.

    Training under DDP / FSDP / DeepSpeed: every parameter is used by a step that runs the
    three passes (the dual ones with `return_vl=True`) and the heads it trains (leave out or
    freeze a head it does not train); run the whole step inside one `forward` (see
    `StepModule`) so the wrapper sees all of it.
    `set_grad_checkpointing()` recomputes each block in backward (timm's switch).

    Args:
        config: the sizes and switches (`VLMoConfig`).
        ffn_backend / attn_backend: backend names for every block (None: automatic).
    """

    def __init__(self, config: VLMoConfig, ffn_backend: Optional[str] = None,
                 attn_backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, VLMoConfig):
            raise TypeError(f"config must be a VLMoConfig, got {type(config).__name__}")
        config.validate()
        self.config = c = config
        self.text_embeddings = TextEmbeddings(c.vocab_size, c.dim, c.max_text_len, c.type_vocab_size,
                                              c.text_layer_norm_eps,
                                              absolute_positions=not c.relative_position)
        # modality type: 0 text, 1 image (reference convention), added to every token
        self.token_type_embeddings = nn.Embedding(2, c.dim)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        if c.relative_position:
            self.pos_embed = None
            self.rel_pos_bias = RelativePositionBias(c.grid_size, c.text_relpos_len, c.num_heads, c.depth)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_image_tokens, c.dim))
            self.rel_pos_bias = None
        rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList([
            MoMEBlock(c.dim, c.num_heads, num_experts=c.num_experts(i), mlp_ratio=c.mlp_ratio,
                      qkv_bias=c.qkv_bias, layer_scale_init=c.layer_scale_init, drop_path=rates[i],
                      eps=c.layer_norm_eps, ffn_backend=ffn_backend, attn_backend=attn_backend,
                      attention=c.attention)
            for i in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.pooler = Pooler(c.dim)
        self.itc = ContrastiveHead(c.dim)
        # without the VL expert there is no VL-expert branch for a second ITC head to read
        self.itc_vl = ContrastiveHead(c.dim) if (c.itc_vl_head and c.vl_layers > 0 and c.vl_expert) else None
        self.itm_head = nn.Linear(c.dim, 2)
        self.mlm_head = MLMHead(c.dim, c.vocab_size, c.text_layer_norm_eps)
        self.classifier = ClassificationHead(c.dim, c.num_classes) if c.num_classes > 0 else None
        self.grad_checkpointing = False
        self.reset_parameters()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, /, ffn_backend: Optional[str] = None,
                    attn_backend: Optional[str] = None, **overrides) -> "VLMo":
        """A freshly initialised model of preset `name` ("tiny", "base", "large",
        "base_plus"; see `vlmo_fast.PRESETS`); `overrides` replace config fields, e.g.
        `VLMo.from_preset("base", num_classes=3129, drop_path_rate=0.0)`."""
        return cls(VLMoConfig.preset(name, **overrides), ffn_backend=ffn_backend, attn_backend=attn_backend)

    def reset_parameters(self) -> None:
        """Initialise every parameter (also what deferred init needs: build under
        `torch.device("meta")`, `to_empty(device=...)`, then call this). Linear weights
        truncated normal (config.init_std), embeddings normal, LayerNorms 1/0, biases 0, the
        patch projection nn.Conv2d's default, layer scales config.layer_scale_init, the
        relative bias table truncated normal 0.02, logit scales log(1/0.07). Index tables
        are derived on first use (no buffer to recompute)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.patch_embed.reset_parameters()
        nn.init.trunc_normal_(self.cls_token, std=std)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=std)
        if self.rel_pos_bias is not None:
            self.rel_pos_bias.reset_parameters()
        for blk in self.blocks:
            blk.reset_parameters(std=std)
        for head in (self.itc, self.itc_vl):
            if head is not None:
                head.reset_parameters(std=std)
        nn.init.zeros_(self.mlm_head.bias)

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        from .checkpoint import save_pretrained
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], map_location="cpu", **kwargs) -> "VLMo":
        from .checkpoint import from_pretrained
        return from_pretrained(directory, map_location=map_location, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.config.depth

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing, as timm models switch it: while enabled and autograd is
        recording, every pass keeps only each block's input and recomputes the block in
        backward (`torch.utils.checkpoint`, non-reentrant; RNG state is replayed, so drop
        path draws the same). Gradients are unchanged; parameter names are unchanged."""
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        """Parameter names that AdamW should not decay (positions, CLS, scales, norms, biases,
        the experts' stacked norms and biases), as timm models report them."""
        names = {"cls_token", "pos_embed", "rel_pos_bias.relative_position_bias_table",
                 "itc.logit_scale", "itc_vl.logit_scale"}
        for i, blk in enumerate(self.blocks):
            names |= {f"blocks.{i}.{n}" for n in blk.no_weight_decay()}
        present = dict(self.named_parameters())
        return {n for n in names if n in present} | {n for n, p in present.items() if p.dim() <= 1}

    # -- embeddings ------------------------------------------------------------------------
    def embed_image(self, images: Tensor, patch_mask: Optional[Tensor] = None,
                    mask_token: Optional[Tensor] = None) -> Tensor:
        """[B, 1 + P, dim]: CLS + patch embeddings (+ positions) + the image type embedding.
        patch_mask [B, P] (True / 1 = masked) with mask_token [dim]: masked patches are
        replaced by mask_token before positions are added (BEiT-style masked image modelling)."""
        patches = self.patch_embed(images)
        if (patch_mask is None) != (mask_token is None):
            raise ValueError("patch_mask and mask_token go together (masked image modelling): "
                             "pass both or neither")
        if patch_mask is not None:
            if tuple(patch_mask.shape) != tuple(patches.shape[:2]):
                raise ValueError(f"patch_mask must have shape [batch, num_patches] = "
                                 f"{tuple(patches.shape[:2])}, got {tuple(patch_mask.shape)}")
            if mask_token.numel() != patches.shape[-1]:
                raise ValueError(f"mask_token must hold dim = {patches.shape[-1]} values, got shape "
                                 f"{tuple(mask_token.shape)}")
            w = patch_mask.to(patches.dtype)[..., None]
            patches = patches * (1 - w) + mask_token.reshape(1, 1, -1).to(patches.dtype) * w
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x + self.token_type_embeddings.weight[1]

    def embed_text(self, text_ids: Tensor) -> Tensor:
        return self.text_embeddings(text_ids) + self.token_type_embeddings.weight[0]

    def _text_padding(self, text_ids: Tensor, text_mask: Optional[Tensor]) -> Optional[Tensor]:
        """BERT attention mask (1 = real token) -> key padding mask (True = padded)."""
        if text_mask is None:
            return None
        if text_mask.shape != text_ids.shape:
            raise ValueError(f"text_mask must have the shape of text_ids {tuple(text_ids.shape)}, "
                             f"got {tuple(text_mask.shape)}")
        if text_mask.device != text_ids.device:
            raise ValueError(f"text_mask is on {text_mask.device}, text_ids on {text_ids.device}")
        return ~text_mask.bool()

    def _layer_biases(self, is_text: Tensor, positions: Tensor) -> list:
        """Per-layer relative biases, lazy (`RelativeBias`): the reference/sdpa attention
        materialises each layer's [heads, L, L]; FlexAttention reads the table in its kernel."""
        if self.rel_pos_bias is None:
            return [None] * self.config.depth
        return self.rel_pos_bias.layer_biases(is_text, positions)

    def _run(self, x: Tensor, ids_below: Tensor, ids_vl: Tensor, key_padding_mask, biases,
             start: int = 0, end: Optional[int] = None, keep_at: Optional[int] = None,
             packing: Optional[PackedSequences] = None, token_types: Optional[Tensor] = None):
        """Blocks [start, end); returns (x, hidden state at the input of block keep_at).
        token_types [B, L] (0 vision, 1 language; default ids_below): the attention each token
        uses in per-modality blocks (shared-attention blocks are called without it)."""
        end = self.config.depth if end is None else end
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        extra = {}
        if self.config.attention == "per_modality":
            extra["token_modality"] = ids_below if token_types is None else token_types
        kept = None
        for i in range(start, end):
            if i == keep_at:
                kept = x
            ids = ids_vl if i >= self.config.vl_start else ids_below
            if recompute:
                x = checkpoint(self.blocks[i], x, ids, key_padding_mask=key_padding_mask,
                               attn_bias=biases[i], packing=packing, use_reentrant=False, **extra)
            else:
                x = self.blocks[i](x, ids, key_padding_mask=key_padding_mask, attn_bias=biases[i],
                                   packing=packing, **extra)
        return x, kept

    # -- encoders --------------------------------------------------------------------------
    def _encode_single(self, x: Tensor, modality: int, key_padding_mask, is_text, positions,
                       features_of: Callable[[ContrastiveHead, Tensor], Tensor],
                       return_vl: bool) -> EncoderOutput:
        """features_of(head, cls_hidden): the head's projection for this modality, e.g.
        `ContrastiveHead.image_features`."""
        b, length, _ = x.shape
        ids = torch.full((b, length), modality, dtype=torch.long, device=x.device)
        biases = self._layer_biases(is_text, positions)
        vl_start = self.config.vl_start
        want_vl = return_vl and self.itc_vl is not None and vl_start < self.config.depth
        out, kept = self._run(x, ids, ids, key_padding_mask, biases, keep_at=vl_start if want_vl else None)
        hidden = self.norm(out)
        features = features_of(self.itc, hidden[:, 0])
        vl_features = None
        if want_vl:
            vl_ids = torch.full_like(ids, VISION_LANGUAGE)
            vl_out, _ = self._run(kept, vl_ids, vl_ids, key_padding_mask, biases, start=vl_start,
                                  token_types=ids)
            vl_features = features_of(self.itc_vl, self.norm(vl_out)[:, 0])
        return EncoderOutput(hidden=hidden, features=features, vl_features=vl_features,
                             text_len=length if modality == LANGUAGE else 0)

    def encode_image(self, images: Tensor, return_vl: bool = False, *,
                     patch_mask: Optional[Tensor] = None,
                     mask_token: Optional[Tensor] = None) -> EncoderOutput:
        """Image-only pass (vision expert in every layer). patch_mask / mask_token: masked
        image modelling input (see `embed_image`)."""
        x = self.embed_image(images, patch_mask, mask_token)
        is_text = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        positions = torch.arange(x.shape[1], device=x.device)
        return self._encode_single(x, VISION, None, is_text, positions,
                                   ContrastiveHead.image_features, return_vl)

    def encode_text(self, text_ids: Tensor, text_mask: Optional[Tensor] = None,
                    return_vl: bool = False) -> EncoderOutput:
        """Text-only pass (language expert in every layer). text_mask: 1 = real token."""
        padding = self._text_padding(text_ids, text_mask)
        x = self.embed_text(text_ids)
        is_text = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        positions = torch.arange(x.shape[1], device=x.device)
        return self._encode_single(x, LANGUAGE, padding, is_text, positions,
                                   ContrastiveHead.text_features, return_vl)

    def encode_pair(self, text_ids: Tensor, images: Tensor, text_mask: Optional[Tensor] = None) -> EncoderOutput:
        """Fusion pass over [text ; image]: modality experts below the VL layers, VL expert above
        (with config.vl_expert=False: modality experts in every layer)."""
        text_padding = self._text_padding(text_ids, text_mask)
        text = self.embed_text(text_ids)
        image = self.embed_image(images)
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"text_ids has batch {text.shape[0]} but images has batch {image.shape[0]}")
        b, lt, li = text.shape[0], text.shape[1], image.shape[1]
        x = torch.cat([text, image], dim=1)
        padding = None
        if text_padding is not None:
            padding = torch.cat([text_padding, torch.zeros(b, li, dtype=torch.bool, device=x.device)], 1)
        ids_below = torch.cat([torch.full((b, lt), LANGUAGE, dtype=torch.long, device=x.device),
                               torch.full((b, li), VISION, dtype=torch.long, device=x.device)], 1)
        ids_vl = torch.full_like(ids_below, VISION_LANGUAGE) if self.config.vl_expert else ids_below
        if self.rel_pos_bias is not None:
            biases = self._layer_biases(*self.rel_pos_bias.layout(lt, li, x.device))
        else:
            biases = [None] * self.config.depth
        out, _ = self._run(x, ids_below, ids_vl, padding, biases)
        hidden = self.norm(out)
        return EncoderOutput(hidden=hidden, pooled=self.pooler(hidden), text_len=lt)

    def encode_packed(self, images: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                      text_mask: Optional[Tensor] = None, pair_text_ids: Optional[Tensor] = None,
                      pair_images: Optional[Tensor] = None,
                      pair_text_mask: Optional[Tensor] = None,
                      return_vl: bool = False) -> PackedEncoderOutput:
        """Image-only, text-only and image-text sequences of one step in ONE pass.

        The sequences are packed back to back (images, then texts, then pairs) without their
        padding, and each attends only to itself, so every token's result equals
        `encode_image` / `encode_text` / `encode_pair` on that sequence alone (tested).
        Routing per sequence as in those passes: images and texts use their modality's expert
        in every layer (dual encoder), pairs the modality experts below the VL layers and the
        VL expert above. Text masks (1 = real token) say which tokens are packed; a token keeps
        its original position. `return_vl=True` also re-runs the VL layers with the VL
        expert for the images and texts, as `encode_image/encode_text(return_vl=True)` do:
        from the input of the first VL layer, on the same pack (its image and text part),
        giving `image_vl_features` / `text_vl_features` (None when the model has no itc_vl).
        """
        parts: List[_PackedPart] = []
        kinds, pair_lens = [], ()
        device = None

        def select(x: Tensor, keep: Tensor, is_text: Tensor, below: Tensor, vl: Tensor):
            # keep [N, L] real tokens of N sequences with the same layout; positions are the
            # original indices inside each modality segment
            n, length = keep.shape
            lengths = keep.sum(1).tolist()        # host ints: the pack's layout (one sync)
            pos = _segment_positions(is_text).expand(n, length)
            return _PackedPart(x[keep], below.expand(n, length)[keep], vl.expand(n, length)[keep],
                               is_text.expand(n, length)[keep], pos[keep], lengths)

        if images is not None:
            x = self.embed_image(images)
            n, li = x.shape[:2]
            device = x.device
            is_text = torch.zeros(li, dtype=torch.bool, device=device)
            ids = torch.full((li,), VISION, dtype=torch.long, device=device)
            parts.append(select(x, torch.ones(n, li, dtype=torch.bool, device=device), is_text, ids, ids))
            kinds += ["image"] * n
        if text_ids is not None:
            padding = self._text_padding(text_ids, text_mask)
            x = self.embed_text(text_ids)
            n, lt = x.shape[:2]
            device = x.device
            keep = torch.ones(n, lt, dtype=torch.bool, device=device) if padding is None else ~padding
            is_text = torch.ones(lt, dtype=torch.bool, device=device)
            ids = torch.full((lt,), LANGUAGE, dtype=torch.long, device=device)
            parts.append(select(x, keep, is_text, ids, ids))
            kinds += ["text"] * n
        if (pair_text_ids is None) != (pair_images is None):
            raise ValueError("pairs need both pair_text_ids and pair_images")
        if pair_text_ids is not None:
            padding = self._text_padding(pair_text_ids, pair_text_mask)
            text, image = self.embed_text(pair_text_ids), self.embed_image(pair_images)
            if text.shape[0] != image.shape[0]:
                raise ValueError(f"pair_text_ids has batch {text.shape[0]} but pair_images has "
                                 f"batch {image.shape[0]}")
            n, lt, li = text.shape[0], text.shape[1], image.shape[1]
            device = text.device
            keep_text = torch.ones(n, lt, dtype=torch.bool, device=device) if padding is None else ~padding
            keep = torch.cat([keep_text, torch.ones(n, li, dtype=torch.bool, device=device)], 1)
            is_text = torch.cat([torch.ones(lt, dtype=torch.bool, device=device),
                                 torch.zeros(li, dtype=torch.bool, device=device)])
            below = torch.where(is_text, LANGUAGE, VISION)
            vl = torch.full_like(below, VISION_LANGUAGE) if self.config.vl_expert else below
            part = select(torch.cat([text, image], 1), keep, is_text, below, vl)
            parts.append(part)
            pair_lens = tuple(n_tok - li for n_tok in part.lengths)
            kinds += ["pair"] * n
        if not parts:
            raise ValueError("encode_packed needs images, text_ids or pairs")

        cat = lambda field: torch.cat([getattr(p, field) for p in parts], 0)   # noqa: E731
        lengths = [n_tok for p in parts for n_tok in p.lengths]
        x, ids_below, ids_vl, is_text, positions = (
            cat(f) for f in ("tokens", "ids_below", "ids_vl", "is_text", "positions"))
        packing = PackedSequences.from_lengths(lengths, device, is_text, positions)
        biases = self._layer_biases(is_text, positions)
        counts = {k: kinds.count(k) for k in ("image", "text", "pair")}
        num_dual = counts["image"] + counts["text"]
        vl_start = self.config.vl_start
        want_vl = return_vl and self.itc_vl is not None and vl_start < self.config.depth and num_dual > 0
        out, kept = self._run(x[None], ids_below[None], ids_vl[None], None, biases,
                              keep_at=vl_start if want_vl else None, packing=packing)
        hidden = self.norm(out)[0]
        cls = hidden.index_select(0, packing.starts)
        cls_img, cls_txt, cls_pair = torch.split(cls, [counts["image"], counts["text"], counts["pair"]])
        image_vl = text_vl = None
        if want_vl:
            cls_vl = self._packed_vl_rerun(kept, lengths[:num_dual], packing, biases, is_text, positions)
            image_vl = self.itc_vl.image_features(cls_vl[:counts["image"]]) if counts["image"] else None
            text_vl = self.itc_vl.text_features(cls_vl[counts["image"]:]) if counts["text"] else None
        return PackedEncoderOutput(
            hidden=hidden, packing=packing, kinds=tuple(kinds), cls=cls,
            image_features=self.itc.image_features(cls_img) if counts["image"] else None,
            text_features=self.itc.text_features(cls_txt) if counts["text"] else None,
            pair_pooled=self.pooler(cls_pair[:, None]) if counts["pair"] else None,
            pair_text_lengths=pair_lens, image_vl_features=image_vl, text_vl_features=text_vl)

    def _packed_vl_rerun(self, kept: Tensor, dual_lengths: List[int], packing: PackedSequences,
                         biases: list, is_text: Tensor, positions: Tensor) -> Tensor:
        """CLS [num_dual, dim] of the VL layers re-run with the VL expert over the image and text
        sequences at the front of a pack, from `kept` (the pack at the input of the first VL
        layer). Pairs already went through the VL expert there: they are left out."""
        if len(dual_lengths) == packing.num_sequences:
            dual_packing, dual_biases, x = packing, biases, kept
        else:
            n_tok = sum(dual_lengths)
            dual_packing = PackedSequences.from_lengths(dual_lengths, kept.device, is_text[:n_tok],
                                                        positions[:n_tok])
            dual_biases = self._layer_biases(is_text[:n_tok], positions[:n_tok])
            x = kept[:, :n_tok]
        vl_ids = torch.full(x.shape[:2], VISION_LANGUAGE, dtype=torch.long, device=x.device)
        token_types = torch.where(is_text[:x.shape[1]], LANGUAGE, VISION)[None]
        out, _ = self._run(x, vl_ids, vl_ids, None, dual_biases, start=self.config.vl_start,
                           packing=dual_packing, token_types=token_types)
        return self.norm(out)[0].index_select(0, dual_packing.starts)

    # -- heads -----------------------------------------------------------------------------
    @staticmethod
    def _pooled(pair: EncoderOutput, what: str) -> Tensor:
        if not isinstance(pair, EncoderOutput) or pair.pooled is None:
            raise ValueError(f"{what} needs the output of encode_pair (the fusion encoder's pooled "
                             "[CLS]); got " + (type(pair).__name__ if not isinstance(pair, EncoderOutput)
                                               else "an encode_image/encode_text output (no .pooled)"))
        return pair.pooled

    def itm_logits(self, pair: EncoderOutput) -> Tensor:
        """Image-text matching logits [B, 2] (0 = no match, 1 = match) of an `encode_pair` output."""
        return self.itm_head(self._pooled(pair, "itm_logits"))

    def mlm_logits(self, pair_or_text: EncoderOutput) -> Tensor:
        """Masked-LM logits [B, text_len, vocab] over the text positions of an `encode_pair`
        or `encode_text` output."""
        if not isinstance(pair_or_text, EncoderOutput) or pair_or_text.text_len == 0:
            raise ValueError("mlm_logits needs the output of encode_pair or encode_text (an output "
                             "with text positions)")
        return self.mlm_head(pair_or_text.hidden[:, :pair_or_text.text_len])

    def classify(self, pair: EncoderOutput) -> Tensor:
        """Classifier logits [B, num_classes] (VQA / NLVR2 style) of an `encode_pair` output."""
        if self.classifier is None:
            raise RuntimeError("this model has no classification head: build it with config.num_classes > 0")
        return self.classifier(self._pooled(pair, "classify"))

    def forward(self, images: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None) -> EncoderOutput:
        """Images and text: `encode_pair`; only images: `encode_image`; only text:
        `encode_text` (see those for shapes). Returns an `EncoderOutput`."""
        if images is not None and text_ids is not None:
            return self.encode_pair(text_ids, images, text_mask)
        if images is not None:
            return self.encode_image(images)
        if text_ids is not None:
            return self.encode_text(text_ids, text_mask)
        raise ValueError("forward needs images, text_ids, or both")

    # -- resolution change (fine-tuning at 384 / 480) --------------------------------------
    @torch.no_grad()
    def resize_image(self, img_size: int) -> None:
        """Change the input resolution; interpolate the image positions (bicubic) to match."""
        c = self.config
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < c.patch_size:
            raise ValueError(f"img_size must be a positive multiple of the patch size {c.patch_size}, "
                             f"got {img_size!r}")
        if img_size % c.patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by the patch size {c.patch_size}")
        old_grid, new_grid = c.grid_size, img_size // c.patch_size
        if new_grid == old_grid:
            return
        if self.rel_pos_bias is not None:
            old = self.rel_pos_bias
            table = old.relative_position_bias_table
            n_old = (2 * old_grid - 1) ** 2
            grid_part = table[:n_old].T.reshape(1, -1, 2 * old_grid - 1, 2 * old_grid - 1)
            grid_part = F.interpolate(grid_part.float(), size=(2 * new_grid - 1,) * 2, mode="bicubic",
                                      align_corners=False)
            grid_part = grid_part.reshape(table.shape[1], -1).T.to(table.dtype)
            new = RelativePositionBias(new_grid, old.text_len, old.num_heads, old.depth).to(table.device, table.dtype)
            new.relative_position_bias_table.copy_(torch.cat([grid_part, table[n_old:]], 0))
            self.rel_pos_bias = new
        if self.pos_embed is not None:
            cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
            grid_pos = grid_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
            grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode="bicubic",
                                     align_corners=False).to(self.pos_embed.dtype)
            grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1)
            self.pos_embed = nn.Parameter(torch.cat([cls_pos, grid_pos], 1))
        self.config = c.replace(img_size=img_size)
        self.patch_embed.img_size = img_size


class StepModule(nn.Module):
    """A whole training step as one module call: `StepModule(model, step_fn)(batch)` runs
    `step_fn(model, batch)` (all passes, heads and losses of the step) inside `forward`.

    DDP, FSDP and DeepSpeed ZeRO-3 hook parameter use and gradient reduction into the
    wrapped module's `forward`: calling `model.encode_image`, `model.encode_text`,
    `model.itm_logits` ... directly on the wrapper's inner module bypasses those hooks (DDP:
    "Expected to have finished reduction"; ZeRO-3: parameters not gathered). Wrap this
    module instead: `DDP(StepModule(model, step))(batch)` returns what `step` returns (e.g.
    the loss and its parts). Checkpoint `step_module.model` (its state_dict has no prefix).

    The training jobs' step protocol (`vlmo_fast.training.loop`): a step_fn that returns
    {"loss": scalar with graph, "metrics": {name: 0-d tensor}} makes this module a step that
    `TrainLoop` (and `deepspeed.initialize`) can run, as `PretrainStep` and the fine-tuning
    steps are.
    """

    def __init__(self, model: nn.Module, step_fn: Callable):
        super().__init__()
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable as step_fn(model, *inputs), got "
                            f"{type(step_fn).__name__}")
        self.model = model
        self.step_fn = step_fn

    def forward(self, *inputs, **kwargs):
        return self.step_fn(self.model, *inputs, **kwargs)


def _segment_positions(is_text: Tensor) -> Tensor:
    """Position of each token inside its own modality segment (0 = that segment's CLS) for
    a layout [L] in which each modality is one contiguous run, e.g. [text ; image]."""
    text_rank = is_text.long().cumsum(0) - 1
    image_rank = (~is_text).long().cumsum(0) - 1
    return torch.where(is_text, text_rank, image_rank)
