"""Input embeddings and VLMo's shared relative-position-bias table.

- `PatchEmbed`: Conv2d patchifier with clear shape errors.
- `TextEmbeddings`: BERT-style word + token-type (+ absolute position when the model has no
  relative bias) embeddings, LayerNorm eps 1e-12. The position table exists only for
  absolute-position models (a parameter no forward uses breaks DDP); the reference
  checkpoints' unused table is handled by the checkpoint loader/exporter.
- `RelativePositionBias`: ONE table (num_distances, num_heads * depth) shared by all layers
  and modalities; `index(...)` builds the per-pair distance index for any token layout and
  `forward(index)` returns the per-layer biases [depth, heads, L, L]; `layer_biases(...)`
  returns them lazily (`RelativeBias`, one per layer) so that attention backends which can
  look the table up inside the kernel (FlexAttention) never materialise [heads, L, L].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .env import INTEGER_DTYPES, autocast_dtype


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()   # nn.Conv2d's default, as BEiT/VLMo leave it

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError("images must be a 4-D tensor [batch, channels, height, width], got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        _, c, h, w = images.shape
        if c != self.in_chans:
            raise ValueError(f"images have {c} channels, the model expects {self.in_chans}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        if h != self.img_size or w != self.img_size:
            raise ValueError(f"image size {h}x{w} differs from the configured {self.img_size}x"
                             f"{self.img_size}; resize the images or call "
                             f"model.resize_image({h}) to interpolate the position tables")
        weight = self.proj.weight
        mixed_ok = autocast_dtype(images) is not None   # autocast casts the conv's inputs itself
        if images.device != weight.device or (images.dtype != weight.dtype and not mixed_ok):
            raise TypeError(f"images are {images.dtype} on {images.device} but the model is "
                            f"{weight.dtype} on {weight.device}")
        return self.proj(images).flatten(2).transpose(1, 2)  # [B, grid*grid, dim]


class TextEmbeddings(nn.Module):
    """Parameter names follow BERT's embeddings so reference checkpoints load as they are."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, type_vocab_size: int = 2,
                 eps: float = 1e-12, absolute_positions: bool = False):
        super().__init__()
        self.vocab_size, self.max_len, self.absolute_positions = vocab_size, max_len, absolute_positions
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        # only absolute-position models use a position table (see the module docstring)
        self.position_embeddings = nn.Embedding(max_len, dim) if absolute_positions else None
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def reset_parameters(self, std: float = 0.02) -> None:
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            if emb is not None:
                nn.init.normal_(emb.weight, std=std)
        self.LayerNorm.reset_parameters()

    def forward(self, text_ids: Tensor) -> Tensor:
        if not isinstance(text_ids, Tensor) or text_ids.dim() != 2:
            raise ValueError("text_ids must be a 2-D tensor [batch, length], got "
                             f"{tuple(text_ids.shape) if isinstance(text_ids, Tensor) else type(text_ids).__name__}")
        if text_ids.dtype not in INTEGER_DTYPES:
            raise TypeError(f"text_ids must be an integer tensor, got {text_ids.dtype}")
        length = text_ids.shape[1]
        if length == 0:
            raise ValueError("text_ids must hold at least one token per text (the [CLS] whose "
                             f"state gives the text features), got shape {tuple(text_ids.shape)}")
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the supported maximum {self.max_len} "
                             "(config.max_text_len)")
        if text_ids.device != self.word_embeddings.weight.device:
            raise ValueError(f"text_ids are on {text_ids.device} but the model is on "
                             f"{self.word_embeddings.weight.device}")
        if text_ids.device.type == "cpu" and text_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(text_ids.min()), int(text_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"text_ids must be in [0, {self.vocab_size - 1}], got [{lo}, {hi}]")
        x = self.word_embeddings(text_ids) + self.token_type_embeddings.weight[0]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings.weight[:length]
        return self.LayerNorm(x)


def image_relative_index(grid: int) -> Tensor:
    """BEiT's 2-D relative index for [CLS] + grid*grid patches: (grid^2+1, grid^2+1).

    Patch pairs get (dy + grid-1) * (2*grid-1) + (dx + grid-1) with d = query - key; the
    three last entries are CLS->patch, patch->CLS and CLS->CLS.
    """
    n = (2 * grid - 1) ** 2
    cpu = torch.device("cpu")   # explicit: may run inside a `with torch.device("meta")` block
    ys, xs = torch.meshgrid(torch.arange(grid, device=cpu), torch.arange(grid, device=cpu), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])                 # 2, P
    rel = coords[:, :, None] - coords[:, None, :]                      # 2, P, P
    patch_index = (rel[0] + grid - 1) * (2 * grid - 1) + (rel[1] + grid - 1)
    index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long, device=cpu)
    index[1:, 1:] = patch_index
    index[0, :] = n          # CLS query -> patch keys
    index[:, 0] = n + 1      # patch query -> CLS key
    index[0, 0] = n + 2      # CLS -> CLS
    return index


def text_relative_index(text_len: int, offset: int) -> Tensor:
    """1-D relative index for [CLS] + (text_len - 1) tokens, entries start at `offset`.

    The table holds 2*text_len entries: 2*text_len - 3 distances (key - query) between
    non-CLS tokens, then CLS->token, token->CLS, CLS->CLS.
    """
    cpu = torch.device("cpu")
    pos = torch.arange(text_len - 1, device=cpu)
    rel = pos[None, :] - pos[:, None] + (text_len - 2)                  # 0 .. 2*text_len-4
    last = offset + 2 * text_len
    index = torch.empty(text_len, text_len, dtype=torch.long, device=cpu)
    index[1:, 1:] = rel + offset
    index[0, :] = last - 3
    index[:, 0] = last - 2
    index[0, 0] = last - 1
    return index


def token_layout(text_len: int, num_image_tokens: int, device=None) -> Tuple[Tensor, Tensor]:
    """(is_text [L] bool, positions [L] long) for the sequence [text (text_len) ; image
    (num_image_tokens)]: each token's modality and position inside its own segment
    (0 = that segment's CLS). text_len or num_image_tokens may be 0 (image- or text-only)."""
    is_text = torch.cat([torch.ones(text_len, dtype=torch.bool, device=device),
                         torch.zeros(num_image_tokens, dtype=torch.bool, device=device)])
    positions = torch.cat([torch.arange(text_len, device=device),
                           torch.arange(num_image_tokens, device=device)])
    return is_text, positions


class RelativePositionBias(nn.Module):
    """VLMo's shared relative position bias.

    Table rows: [(2g-1)^2 image distances, CLS->patch, patch->CLS, CLS->CLS, text->image,
    image->text, 2*T text entries]; columns: layer-major (layer * num_heads + head).
    """

    def __init__(self, grid_size: int, text_len: int, num_heads: int, depth: int):
        super().__init__()
        self.grid_size, self.text_len, self.num_heads, self.depth = grid_size, text_len, num_heads, depth
        self.num_image_distances = (2 * grid_size - 1) ** 2 + 3
        self.text_to_image = self.num_image_distances
        self.image_to_text = self.num_image_distances + 1
        self.num_distances = self.num_image_distances + 2 + 2 * text_len
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_distances, num_heads * depth))
        # The [L, L] index tables are derived from the sizes, never stored: built on first
        # use per device (so meta-device init, to_empty and load_state_dict(assign=True)
        # need nothing recomputed) and not part of the state_dict.
        self._index_cache: Dict[str, Tuple[Tensor, Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=std)
        self._index_cache.clear()

    def _index_tables(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._index_cache:
            self._index_cache[key] = (
                image_relative_index(self.grid_size).to(device),
                text_relative_index(self.text_len, self.num_image_distances + 2).to(device))
        return self._index_cache[key]

    @property
    def image_index(self) -> Tensor:
        """[grid^2 + 1, grid^2 + 1] table rows of image pairs (see `image_relative_index`)."""
        return self._index_tables(self.relative_position_bias_table.device)[0]

    @property
    def text_index(self) -> Tensor:
        """[text_len, text_len] table rows of text pairs (see `text_relative_index`)."""
        return self._index_tables(self.relative_position_bias_table.device)[1]

    def _check_positions(self, is_text: Tensor, positions: Tensor) -> Tuple[int, int]:
        """Range check on CPU (a host sync on an accelerator is not worth it, and none runs
        under torch.compile); returns the number of image and text positions the index
        tables hold."""
        n_img, n_txt = self.grid_size * self.grid_size + 1, self.text_len
        if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
            if bool((positions[~is_text] >= n_img).any()) or bool((positions[is_text] >= n_txt).any()) \
                    or bool((positions < 0).any()):
                raise ValueError(f"positions out of range: image tokens need [0, {n_img - 1}], "
                                 f"text tokens [0, {n_txt - 1}]")
        return n_img, n_txt

    def index(self, is_text: Tensor, positions: Tensor) -> Tensor:
        """Distance index [L, L] for one token layout.

        is_text [L] bool (language token vs image token), positions [L] long: a token's
        position inside its own modality segment (image: 0 = CLS, 1.. patches; text: 0 = CLS).
        Works for any interleaving; [text ; image] reproduces the reference's pair index.
        """
        if is_text.shape != positions.shape or is_text.dim() != 1:
            raise ValueError(f"is_text and positions must be 1-D of equal length, got "
                             f"{tuple(is_text.shape)} and {tuple(positions.shape)}")
        n_img, n_txt = self._check_positions(is_text, positions)
        pq, pk = positions[:, None], positions[None, :]
        tq, tk = is_text[:, None], is_text[None, :]
        img = self.image_index[pq.clamp(max=n_img - 1), pk.clamp(max=n_img - 1)]
        txt = self.text_index[pq.clamp(max=n_txt - 1), pk.clamp(max=n_txt - 1)]
        cross = torch.where(tq, torch.full_like(img, self.text_to_image), torch.full_like(img, self.image_to_text))
        return torch.where(tq & tk, txt, torch.where(~tq & ~tk, img, cross))

    def layout(self, text_len: int, num_image_tokens: int, device=None) -> Tuple[Tensor, Tensor]:
        """(is_text, positions) for the sequence [text (text_len) ; image (num_image_tokens)]
        on the table's device (see `token_layout`)."""
        return token_layout(text_len, num_image_tokens, device or self.relative_position_bias_table.device)

    def forward(self, index: Tensor) -> Tensor:
        """Biases for every layer: [depth, num_heads, L, L] (fp32 if the table is)."""
        length = index.shape[0]
        bias = F.embedding(index, self.relative_position_bias_table)           # L, L, depth*H
        return bias.view(length, length, self.depth, self.num_heads).permute(2, 3, 0, 1)

    # -- lazy form for attention backends -------------------------------------------------
    def token_codes(self, is_text: Tensor, positions: Tensor) -> Tensor:
        """One int32 code per token holding what the pair index needs (see `pair_index_rule`):
        bits 0-9 row (image patch) or position (text), bits 10-19 column (image patch),
        bit 20 CLS (position 0), bit 21 text. Shape of `positions` ([L] or [B, L])."""
        if is_text.shape != positions.shape:
            raise ValueError(f"is_text and positions must have equal shapes, got "
                             f"{tuple(is_text.shape)} and {tuple(positions.shape)}")
        self._check_positions(is_text, positions)
        pos = positions.to(torch.int32)
        patch = (pos - 1).clamp(min=0)
        row = torch.where(is_text, pos, patch // self.grid_size)
        col = torch.where(is_text, torch.zeros_like(pos), patch % self.grid_size)
        return row | (col << 10) | ((pos == 0).to(torch.int32) << 20) | (is_text.to(torch.int32) << 21)

    @property
    def pair_index(self) -> Callable[[Tensor, Tensor], Tensor]:
        """index(code_query, code_key) -> table row, the same rule as `index` (tested equal)."""
        return pair_index_rule(self.grid_size, self.text_len)

    def layer_biases(self, is_text: Tensor, positions: Tensor) -> List["RelativeBias"]:
        """Every layer's bias for one token layout, lazily; the layers share index caches."""
        shared: Dict[str, Tensor] = {}
        return [RelativeBias(self, layer, is_text, positions, shared) for layer in range(self.depth)]


_PAIR_RULES: Dict[Tuple[int, int], Callable] = {}


def pair_index_rule(grid: int, text_len: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The table row of a (query, key) pair from two `token_codes`, as plain tensor arithmetic
    so it runs elementwise inside a FlexAttention score_mod. Cached per size so compiled
    kernels see the same function object (no recompiles across layers)."""
    key = (grid, text_len)
    if key in _PAIR_RULES:
        return _PAIR_RULES[key]
    span = 2 * grid - 1
    n = span * span                         # rows of the 2-D patch distances
    text_to_image, image_to_text = n + 3, n + 4
    text_base = n + 5                       # first text row
    text_last = text_base + 2 * text_len    # one past the text rows

    def rule(cq: Tensor, ck: Tensor) -> Tensor:
        aq, ak = cq & 1023, ck & 1023
        q_cls, k_cls = (cq >> 20) & 1, (ck >> 20) & 1
        q_txt, k_txt = (cq >> 21) & 1, (ck >> 21) & 1
        patch = (aq - ak + grid - 1) * span + (((cq >> 10) & 1023) - ((ck >> 10) & 1023) + grid - 1)
        # image pairs: patch->CLS n+1; CLS->patch n; CLS->CLS n+2
        img = torch.where(k_cls == 1, patch * 0 + (n + 1), patch)
        img = torch.where(q_cls == 1, patch * 0 + n + 2 * k_cls, img)
        # text pairs: token distances, then CLS->token, token->CLS, CLS->CLS (the last three rows)
        tok = text_base + (ak - aq) + (text_len - 2)
        txt = torch.where(k_cls == 1, tok * 0 + (text_last - 2), tok)
        txt = torch.where(q_cls == 1, tok * 0 + (text_last - 3) + 2 * k_cls, txt)
        cross = torch.where(q_txt == 1, patch * 0 + text_to_image, patch * 0 + image_to_text)
        same = q_txt == k_txt
        return torch.where(same, torch.where(q_txt == 1, txt, img), cross)

    _PAIR_RULES[key] = rule
    return rule


@dataclass(eq=False)
class RelativeBias:
    """One layer's relative position bias, not materialised.

    Carries the shared table's owner, the layer and the token layout (`is_text`, `positions`:
    [L] shared by the batch, or [B, L]). `materialize()` gives the dense [heads, L, L]
    (or [B, heads, L, L]) that the reference adds to its logits; FlexAttention instead reads
    `columns()` and `codes()` inside its score_mod. Gradients reach the table either way.
    """
    source: RelativePositionBias
    layer: int
    is_text: Tensor
    positions: Tensor
    shared: Dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        table = self.source.relative_position_bias_table
        heads, depth = self.source.num_heads, self.source.depth
        if table.dim() != 2 or table.shape != (self.source.num_distances, heads * depth):
            raise ValueError(f"relative_position_bias_table must have shape (num_distances, heads * "
                             f"depth) = {(self.source.num_distances, heads * depth)}, got "
                             f"{tuple(table.shape)}")
        if not 0 <= self.layer < depth:
            raise ValueError(f"layer {self.layer} out of range for a bias table of depth {depth}")
        if self.is_text.shape != self.positions.shape or self.is_text.dim() not in (1, 2):
            raise ValueError(f"is_text and positions must both be [L] or [B, L], got "
                             f"{tuple(self.is_text.shape)} and {tuple(self.positions.shape)}")

    @property
    def num_heads(self) -> int:
        return self.source.num_heads

    @property
    def length(self) -> int:
        return self.is_text.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.source.relative_position_bias_table.device

    def columns(self) -> Tensor:
        """This layer's slice of the shared table as [heads, num_distances] (a view: gradients
        flow to the table)."""
        table = self.source.relative_position_bias_table
        return table.view(table.shape[0], self.source.depth, self.num_heads)[:, self.layer].t()

    def codes(self) -> Tensor:
        if "codes" not in self.shared:
            self.shared["codes"] = self.source.token_codes(self.is_text, self.positions)
        return self.shared["codes"]

    def index(self) -> Tensor:
        """[L, L] (or [B, L, L]) table rows, built once per layout and shared by the layers."""
        if "index" not in self.shared:
            if self.is_text.dim() == 1:
                self.shared["index"] = self.source.index(self.is_text, self.positions)
            else:
                self.shared["index"] = torch.stack([self.source.index(t, p) for t, p in
                                                    zip(self.is_text, self.positions)])
        return self.shared["index"]

    def materialize(self) -> Tensor:
        """Dense bias [heads, L, L] (or [B, heads, L, L]) in the table's dtype."""
        return F.embedding(self.index(), self.columns().t()).movedim(-1, -3)
