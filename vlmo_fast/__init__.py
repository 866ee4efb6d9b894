"""vlmo_fast: kernel-accelerated VLMo (Mixture-of-Modality-Experts vision-language model).

Start with `VLMo.from_preset("base")` or the drop-in `MoMEBlock`; see docs/ARCHITECTURE.md.
Backend cores (e.g. `attention_flash`, `mome_ffn_triton`) stay importable from their
modules (`vlmo_fast.attention`, `vlmo_fast.mome`); the top level exports entry points,
extension points and error types.
"""
__version__ = "0.1.0"

from . import backends
from ._ext import ExtensionUnavailable
from .attention import MultiHeadSelfAttention, register_attention_impl
from .backends import backend_report, set_backend
from .block import MoMEBlock
from .checkpoint import (CheckpointMismatchError, LoadResult, export_reference_state_dict,
                         from_pretrained, load_beit_state_dict, load_reference_state_dict,
                         save_pretrained)
from .config import PRESETS, VLMoConfig
from .embeddings import RelativeBias, RelativePositionBias
from .io import CorruptFileError
from .hard_negatives import sample_global_hard_negatives, sample_hard_negatives
from . import losses  # registers the "contrastive" backends
from .losses import ContrastiveLoss, ContrastiveStats, contrastive_loss
from .model import EncoderOutput, PackedEncoderOutput, StepModule, VLMo
from .mome import LANGUAGE, VISION, VISION_LANGUAGE, MoMEFeedForward, mome_ffn, register_ffn_impl
from .optim import param_groups_weight_decay
from .packing import PackedSequences, pack
# data, evaluation and inference layers (their heavy dependencies: PIL, tokenizers, onnx,
# deepspeed, are imported only when used)
from . import data
from .data import (EmbeddedWorld, WordPieceTokenizer, build_pretrain_loader,
                   build_retrieval_eval_set, build_tokenizer)
from .eval import RetrievalResult, evaluate_retrieval
from .export import export_onnx, export_pretrained
from .index import RetrievalIndex
from .inference import Encoder

__all__ = [
    # model and blocks
    "VLMo", "VLMoConfig", "PRESETS", "EncoderOutput", "PackedEncoderOutput", "StepModule",
    "MoMEBlock", "MoMEFeedForward", "MultiHeadSelfAttention", "RelativePositionBias",
    "RelativeBias", "PackedSequences", "pack", "mome_ffn", "VISION", "LANGUAGE",
    "VISION_LANGUAGE",
    # losses and sampling
    "losses", "ContrastiveLoss", "ContrastiveStats", "contrastive_loss",
    "sample_hard_negatives", "sample_global_hard_negatives",
    # checkpoints
    "save_pretrained", "from_pretrained", "load_reference_state_dict",
    "export_reference_state_dict", "load_beit_state_dict",
    # training helpers
    "param_groups_weight_decay",
    # data, evaluation, inference, export
    "data", "EmbeddedWorld", "WordPieceTokenizer", "build_tokenizer", "build_pretrain_loader",
    "build_retrieval_eval_set", "evaluate_retrieval", "RetrievalResult", "Encoder",
    "RetrievalIndex", "export_onnx", "export_pretrained",
    # dispatch and extension points
    "backends", "backend_report", "set_backend", "register_ffn_impl", "register_attention_impl",
    # errors
    "ExtensionUnavailable", "CheckpointMismatchError", "CorruptFileError", "LoadResult",
]
