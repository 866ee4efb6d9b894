"""VLMo (Mixture-of-Modality-Experts) for Hugging Face `transformers`, in plain PyTorch.

This file is copied verbatim into every folder `vlmo_fast.hf.export_hf` writes, so that

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)

works where vlmo_fast is not installed: it imports only torch and transformers (and its
sibling configuration_vlmo.py). Parameter names, shapes and numerics are those of
`vlmo_fast.VLMo` (the same model.safetensors loads into both), computed the way vlmo_fast's
reference backends compute them: attention logits and softmax in fp32, each token's expert
chosen by its modality. Outputs equal `vlmo_fast.VLMo`'s (tested to 1e-6 in fp32). With
vlmo_fast installed, `import vlmo_fast` registers its own class for the same folders,
which runs the package's kernels instead.

Passes (as `VLMo.forward`): images only -> image tower (`image_embeds`, L2-normalised ITC
features); text only -> text tower (`text_embeds`); both -> fusion encoder over
[text ; image] (`pooler_output`, `itm_logits`). `get_image_features` /
`get_text_features` give the ITC embeddings directly (CLIP's method names).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_vlmo import VLMoFastConfig

VISION, LANGUAGE, VISION_LANGUAGE = 0, 1, 2


@dataclass
class VLMoFastOutput(ModelOutput):
    """last_hidden_state [B, L, dim] after the final LayerNorm (text positions first in a
    fusion pass); image_embeds / text_embeds [B, embed] L2-normalised ITC features of a
    single-modality pass (image_vl_embeds / text_vl_embeds: the VL-expert branch, with
    return_vl=True); pooler_output [B, dim] and itm_logits [B, 2] (0 = no match) of a
    fusion pass."""
    last_hidden_state: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    image_vl_embeds: Optional[torch.FloatTensor] = None
    text_vl_embeds: Optional[torch.FloatTensor] = None
    pooler_output: Optional[torch.FloatTensor] = None
    itm_logits: Optional[torch.FloatTensor] = None


def check_token_types(token_type_ids: Optional[Tensor]) -> None:
    """VLMo embeds every text token with token type 0 (one segment); a BERT tokenizer's
    token_type_ids are accepted when they say the same."""
    if token_type_ids is not None and bool((token_type_ids != 0).any()):
        raise ValueError("token_type_ids must be all 0: VLMo takes one text segment per input "
                         "(encode a pair of sentences as one text)")


# -- embeddings ------------------------------------------------------------------------------
class TextEmbeddings(nn.Module):
    def __init__(self, config: VLMoFastConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.position_embeddings = (None if config.relative_position
                                    else nn.Embedding(config.max_text_len, config.dim))
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.text_layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings.weight[:input_ids.shape[1]]
        return self.LayerNorm(x)


class PatchEmbed(nn.Module):
    def __init__(self, config: VLMoFastConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.dim, kernel_size=config.patch_size,
                              stride=config.patch_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class RelativePositionBias(nn.Module):
    """One table shared by every layer: rows are distances ((2g-1)^2 patch offsets, CLS->patch,
    patch->CLS, CLS->CLS, text->image, image->text, then 2 T text entries), columns
    layer-major (layer * heads + head)."""

    def __init__(self, config: VLMoFastConfig):
        super().__init__()
        self.grid, self.text_len = config.grid_size, config.text_relpos_len
        self.depth, self.num_heads = config.depth, config.num_heads
        self.image_rows = (2 * self.grid - 1) ** 2 + 3
        rows = self.image_rows + 2 + 2 * self.text_len
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, self.num_heads * self.depth))

    def _image_index(self, device) -> Tensor:
        g, span = self.grid, 2 * self.grid - 1
        ys, xs = torch.meshgrid(torch.arange(g, device=device), torch.arange(g, device=device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        patches = (ys[:, None] - ys[None, :] + g - 1) * span + (xs[:, None] - xs[None, :] + g - 1)
        n = span * span
        index = torch.empty(g * g + 1, g * g + 1, dtype=torch.long, device=device)
        index[1:, 1:] = patches
        index[0, :] = n          # CLS query -> patch key
        index[:, 0] = n + 1      # patch query -> CLS key
        index[0, 0] = n + 2
        return index

    def _text_index(self, device) -> Tensor:
        t, offset = self.text_len, self.image_rows + 2
        pos = torch.arange(t - 1, device=device)
        last = offset + 2 * t
        index = torch.empty(t, t, dtype=torch.long, device=device)
        index[1:, 1:] = pos[None, :] - pos[:, None] + (t - 2) + offset   # key - query
        index[0, :] = last - 3   # CLS query -> token key
        index[:, 0] = last - 2   # token query -> CLS key
        index[0, 0] = last - 1
        return index

    def forward(self, text_len: int, image_len: int) -> Tensor:
        """Per-layer biases [depth, heads, L, L] for the layout [text (text_len) ; image
        (image_len)]; either length may be 0."""
        device = self.relative_position_bias_table.device
        blocks = []
        if text_len:
            blocks.append([self._text_index(device)[:text_len, :text_len],
                           torch.full((text_len, image_len), self.image_rows, dtype=torch.long,
                                      device=device)])
        if image_len:
            blocks.append([torch.full((image_len, text_len), self.image_rows + 1, dtype=torch.long,
                                      device=device),
                           self._image_index(device)[:image_len, :image_len]])
        index = torch.cat([torch.cat(row, 1) for row in blocks], 0)
        length = index.shape[0]
        bias = F.embedding(index, self.relative_position_bias_table)
        return bias.view(length, length, self.depth, self.num_heads).permute(2, 3, 0, 1)


# -- the block -------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, config: VLMoFastConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.dim // config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        if config.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(config.dim))
            self.v_bias = nn.Parameter(torch.zeros(config.dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(config.dim, config.dim)

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q (scaled), k, v [B, H, L, Dh]."""
        b, length, _ = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q * self.head_dim ** -0.5, k, v

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
               key_padding_mask: Optional[Tensor]) -> Tensor:
        """[B, L, H * Dh] before the output projection; logits and softmax in fp32."""
        acc = torch.promote_types(q.dtype, torch.float32)
        logits = q.to(acc) @ k.to(acc).transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.to(acc)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            # a query whose every key is padded attends to nothing (zeros, not NaN)
            blocked = logits.amax(dim=-1, keepdim=True) == float("-inf")
            probs = logits.masked_fill(blocked, 0.0).softmax(dim=-1).masked_fill(blocked, 0.0)
        else:
            probs = logits.softmax(dim=-1)
        out = probs.to(v.dtype) @ v
        b, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(b, length, -1)

    def forward(self, x: Tensor, bias: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Tensor:
        return self.proj(self.attend(*self.project_qkv(x), bias, key_padding_mask))


class ExpertFeedForward(nn.Module):
    """E stacked experts LN_e -> fc1 -> GELU -> fc2; weights stored (in, out)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, eps: float):
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.fc1_weight = nn.Parameter(torch.zeros(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.fc2_weight = nn.Parameter(torch.zeros(num_experts, hidden, dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        """The FFN branch (no residual) of every token, each through its expert."""
        d = x.shape[-1]
        flat, ids = x.reshape(-1, d), modality_ids.reshape(-1)
        branch = torch.zeros_like(flat)
        for e in range(self.norm_weight.shape[0]):
            rows = (ids == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            z = F.layer_norm(flat.index_select(0, rows), (d,), self.norm_weight[e], self.norm_bias[e], self.eps)
            hidden = F.gelu(torch.addmm(self.fc1_bias[e], z, self.fc1_weight[e]))
            branch = branch.index_copy(0, rows, torch.addmm(self.fc2_bias[e], hidden, self.fc2_weight[e]))
        return branch.reshape(x.shape)


class MoMEBlock(nn.Module):
    def __init__(self, config: VLMoFastConfig, num_experts: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        # the per-modality ablation: `attn` projects image tokens, `attn_text` text tokens
        self.attn_text = Attention(config) if config.attention == "per_modality" else None
        self.mlp = ExpertFeedForward(config.dim, int(config.dim * config.mlp_ratio), num_experts,
                                     config.layer_norm_eps)
        if config.layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((config.dim,), float(config.layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((config.dim,), float(config.layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: Tensor, modality_ids: Tensor, is_text: Tensor, bias: Optional[Tensor],
                key_padding_mask: Optional[Tensor]) -> Tensor:
        """is_text [B, L] bool: the token's type (which attention projects it, per_modality)."""
        h = self.norm1(x)
        if self.attn_text is None:
            branch = self.attn(h, bias, key_padding_mask)
        else:
            heads = is_text[:, None, :, None]
            q, k, v = (torch.where(heads, t, i) for i, t in zip(self.attn.project_qkv(h),
                                                                 self.attn_text.project_qkv(h)))
            out = Attention.attend(q, k, v, bias, key_padding_mask)
            branch = torch.where(is_text[..., None], self.attn_text.proj(out), self.attn.proj(out))
        x = x + (branch * self.gamma_1 if self.gamma_1 is not None else branch)
        branch = self.mlp(x, modality_ids)
        return x + (branch * self.gamma_2 if self.gamma_2 is not None else branch)


# -- heads -----------------------------------------------------------------------------------
class Pooler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ContrastiveHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.image_proj = nn.Linear(dim, dim, bias=False)
        self.text_proj = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))


class MLMHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden)))) + self.bias


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.fc2 = nn.Linear(2 * dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(pooled))))


# -- the model -------------------------------------------------------------------------------
class VLMoFastPreTrainedModel(PreTrainedModel):
    config_class = VLMoFastConfig
    base_model_prefix = ""   # no base-model attribute: this class is the whole model
    main_input_name = "pixel_values"
    _no_split_modules = ["MoMEBlock"]


class VLMoFastModel(VLMoFastPreTrainedModel):
    """VLMo with vlmo_fast's parameter names; see the module docstring for the passes."""

    def __init__(self, config: VLMoFastConfig):
        super().__init__(config)
        c = config
        self.text_embeddings = TextEmbeddings(c)
        self.token_type_embeddings = nn.Embedding(2, c.dim)   # 0 text, 1 image
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        if c.relative_position:
            self.pos_embed = None
            self.rel_pos_bias = RelativePositionBias(c)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.grid_size ** 2 + 1, c.dim))
            self.rel_pos_bias = None
        self.blocks = nn.ModuleList([MoMEBlock(c, c.num_experts(i)) for i in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.pooler = Pooler(c.dim)
        self.itc = ContrastiveHead(c.dim)
        self.itc_vl = (ContrastiveHead(c.dim) if (c.itc_vl_head and c.vl_layers > 0 and c.vl_expert)
                       else None)
        self.itm_head = nn.Linear(c.dim, 2)
        self.mlm_head = MLMHead(c.dim, c.vocab_size, c.text_layer_norm_eps)
        self.classifier = ClassificationHead(c.dim, c.num_classes) if c.num_classes > 0 else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """vlmo_fast.VLMo's initialisation: Linear weights truncated normal (init_std), biases
        0, embeddings normal, LayerNorms 1/0, the patch Conv2d PyTorch's default, layer scales
        layer_scale_init, experts truncated normal, the bias table truncated normal 0.02,
        logit scales log(1/0.07). (Loading runs this only for tensors a checkpoint lacks.)"""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            module.reset_parameters()
        elif isinstance(module, Attention) and module.q_bias is not None:
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)
        elif isinstance(module, ExpertFeedForward):
            nn.init.ones_(module.norm_weight)
            for p in (module.norm_bias, module.fc1_bias, module.fc2_bias):
                nn.init.zeros_(p)
            nn.init.trunc_normal_(module.fc1_weight, std=std)
            nn.init.trunc_normal_(module.fc2_weight, std=std)
        elif isinstance(module, MoMEBlock) and module.gamma_1 is not None:
            nn.init.constant_(module.gamma_1, float(self.config.layer_scale_init))
            nn.init.constant_(module.gamma_2, float(self.config.layer_scale_init))
        elif isinstance(module, RelativePositionBias):
            nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
        elif isinstance(module, ContrastiveHead):
            nn.init.constant_(module.logit_scale, math.log(1 / 0.07))
        elif isinstance(module, MLMHead):
            nn.init.zeros_(module.bias)
        elif isinstance(module, VLMoFastModel):
            nn.init.trunc_normal_(module.cls_token, std=std)
            if module.pos_embed is not None:
                nn.init.trunc_normal_(module.pos_embed, std=std)

    def get_input_embeddings(self) -> nn.Module:
        return self.text_embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_embeddings.word_embeddings = value

    # -- passes ------------------------------------------------------------------------------
    def _embed_image(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x + self.token_type_embeddings.weight[1]

    def _embed_text(self, input_ids: Tensor) -> Tensor:
        if input_ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; the model takes at most "
                             f"max_text_len={self.config.max_text_len} (truncate with the tokenizer)")
        return self.text_embeddings(input_ids) + self.token_type_embeddings.weight[0]

    def _biases(self, text_len: int, image_len: int) -> List[Optional[Tensor]]:
        if self.rel_pos_bias is None:
            return [None] * self.config.depth
        return list(self.rel_pos_bias(text_len, image_len).unbind(0))

    def _run(self, x: Tensor, ids_below: Tensor, ids_vl: Tensor, is_text: Tensor, biases, padding,
             start: int = 0, keep_at: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        kept = None
        for i in range(start, self.config.depth):
            if i == keep_at:
                kept = x
            ids = ids_vl if i >= self.config.vl_start else ids_below
            x = self.blocks[i](x, ids, is_text, biases[i], padding)
        return x, kept

    def _single(self, x: Tensor, modality: int, padding: Optional[Tensor], biases,
                return_vl: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(hidden, ITC features, VL-branch features or None) of an image- or text-only pass."""
        ids = torch.full(x.shape[:2], modality, dtype=torch.long, device=x.device)
        is_text = torch.full(x.shape[:2], modality == LANGUAGE, dtype=torch.bool, device=x.device)
        vl_start = self.config.vl_start
        want_vl = return_vl and self.itc_vl is not None and vl_start < self.config.depth
        out, kept = self._run(x, ids, ids, is_text, biases, padding, keep_at=vl_start if want_vl else None)
        hidden = self.norm(out)
        proj = "image_proj" if modality == VISION else "text_proj"
        features = F.normalize(getattr(self.itc, proj)(hidden[:, 0]), dim=-1)
        vl_features = None
        if want_vl:
            vl_ids = torch.full_like(ids, VISION_LANGUAGE)
            vl_out, _ = self._run(kept, vl_ids, vl_ids, is_text, biases, padding, start=vl_start)
            vl_features = F.normalize(getattr(self.itc_vl, proj)(self.norm(vl_out)[:, 0]), dim=-1)
        return hidden, features, vl_features

    @staticmethod
    def _padding(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
        if attention_mask is None:
            return None
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        return ~attention_mask.bool()

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised ITC image embeddings [B, embed] (images normalised to [-1, 1])."""
        x = self._embed_image(pixel_values)
        return self._single(x, VISION, None, self._biases(0, x.shape[1]), False)[1]

    def get_text_features(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """L2-normalised ITC text embeddings [B, embed] (attention_mask 1 = real token)."""
        x = self._embed_text(input_ids)
        return self._single(x, LANGUAGE, self._padding(input_ids, attention_mask),
                            self._biases(x.shape[1], 0), False)[1]

    def forward(self, pixel_values: Optional[Tensor] = None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                return_vl: bool = False, return_dict: Optional[bool] = None) -> VLMoFastOutput:
        """Images only: image tower; input_ids only: text tower; both: fusion encoder (see
        the module docstring). return_vl: also the VL-expert branch of a tower.
        token_type_ids (what a BERT tokenizer returns) must be all 0: one text segment."""
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        check_token_types(token_type_ids)
        if pixel_values is not None and input_ids is not None:
            padding = self._padding(input_ids, attention_mask)
            text, image = self._embed_text(input_ids), self._embed_image(pixel_values)
            if text.shape[0] != image.shape[0]:
                raise ValueError(f"input_ids has batch {text.shape[0]} but pixel_values has batch "
                                 f"{image.shape[0]}")
            b, lt, li = text.shape[0], text.shape[1], image.shape[1]
            x = torch.cat([text, image], dim=1)
            if padding is not None:
                padding = torch.cat([padding, torch.zeros(b, li, dtype=torch.bool, device=x.device)], 1)
            ids_below = torch.cat([torch.full((b, lt), LANGUAGE, dtype=torch.long, device=x.device),
                                   torch.full((b, li), VISION, dtype=torch.long, device=x.device)], 1)
            # without the VL expert (ablation) the top layers route by token type too
            ids_vl = torch.full_like(ids_below, VISION_LANGUAGE) if self.config.vl_expert else ids_below
            out, _ = self._run(x, ids_below, ids_vl, ids_below == LANGUAGE, self._biases(lt, li), padding)
            hidden = self.norm(out)
            pooled = self.pooler(hidden)
            output = VLMoFastOutput(last_hidden_state=hidden, pooler_output=pooled,
                                    itm_logits=self.itm_head(pooled))
        elif pixel_values is not None:
            x = self._embed_image(pixel_values)
            hidden, features, vl = self._single(x, VISION, None, self._biases(0, x.shape[1]), return_vl)
            output = VLMoFastOutput(last_hidden_state=hidden, image_embeds=features, image_vl_embeds=vl)
        elif input_ids is not None:
            x = self._embed_text(input_ids)
            hidden, features, vl = self._single(x, LANGUAGE, self._padding(input_ids, attention_mask),
                                                self._biases(x.shape[1], 0), return_vl)
            output = VLMoFastOutput(last_hidden_state=hidden, text_embeds=features, text_vl_embeds=vl)
        else:
            raise ValueError("VLMoFastModel needs pixel_values, input_ids, or both")
        return output if return_dict else output.to_tuple()
