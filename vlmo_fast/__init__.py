"""vlmo_fast: kernel-accelerated VLMo (Mixture-of-Modality-Experts vision-language model).

Start with `VLMo.from_preset("base")` or the drop-in `MoMEBlock`; see docs/ARCHITECTURE.md.
"""
__version__ = "0.1.0"

from . import backends
from .backends import backend_report, set_backend
from .block import MoMEBlock
from .attention import (MultiHeadSelfAttention, attention_flash, attention_flex, attention_reference,
                        attention_sdpa, choose_attention_backend)
from .checkpoint import (export_reference_state_dict, from_pretrained, load_beit_state_dict,
                         load_reference_state_dict, save_pretrained)
from .config import PRESETS, VLMoConfig
from .embeddings import RelativeBias, RelativePositionBias
from .hard_negatives import sample_global_hard_negatives, sample_hard_negatives
from . import losses  # registers the "contrastive" backends
from .losses import ContrastiveLoss, ContrastiveStats, contrastive_loss, contrastive_loss_reference
from .model import EncoderOutput, PackedEncoderOutput, VLMo
from .packing import PackedSequences, pack
from .mome import (LANGUAGE, VISION, VISION_LANGUAGE, MoMEFeedForward, mome_ffn,
                   mome_ffn_grouped_mm, mome_ffn_reference, mome_ffn_triton)

__all__ = [
    "VLMo", "VLMoConfig", "PRESETS", "EncoderOutput", "MoMEBlock", "MoMEFeedForward",
    "MultiHeadSelfAttention", "RelativePositionBias", "mome_ffn", "mome_ffn_reference",
    "mome_ffn_triton", "mome_ffn_grouped_mm",
    "attention_reference", "attention_sdpa", "attention_flex", "attention_flash",
    "choose_attention_backend", "RelativeBias", "PackedEncoderOutput", "PackedSequences", "pack",
    "VISION", "LANGUAGE", "VISION_LANGUAGE", "backends", "backend_report",
    "set_backend", "load_reference_state_dict", "export_reference_state_dict",
    "load_beit_state_dict", "save_pretrained", "from_pretrained", "sample_hard_negatives",
    "sample_global_hard_negatives", "ContrastiveLoss", "ContrastiveStats", "contrastive_loss",
    "contrastive_loss_reference", "losses",
]
