"""vlmo_fast: kernel-accelerated VLMo (Mixture-of-Modality-Experts vision-language model).

Start with `VLMo.from_preset("base")` or the drop-in `MoMEBlock`; see docs/ARCHITECTURE.md.
Backend cores (e.g. `attention_flash`, `mome_ffn_triton`) stay importable from their
modules (`vlmo_fast.attention`, `vlmo_fast.mome`); the top level exports entry points,
extension points and error types.
"""
__version__ = "0.1.0"

import sys

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


# -- where users already are: transformers' Auto classes, timm's model names ------------------
# Registered when (and only if) the user imports that library: importing transformers costs
# seconds, so `import vlmo_fast` never does it. A library imported before vlmo_fast is
# registered with at once; one imported later, right after its own __init__ has run.
def _register(library: str, module_name: str) -> None:
    import importlib
    import warnings
    try:
        importlib.import_module(module_name)   # registers at import (vlmo_fast.hf, .timm_models)
    except Exception as e:  # an incompatible version must not break the user's own import
        warnings.warn(f"vlmo_fast could not register with {library} ({type(e).__name__}: {e}); "
                      f"import {module_name} to see the full error", stacklevel=3)


class _HookedLoader:
    """The library's own loader, plus our registration once its module has executed."""

    def __init__(self, loader, library: str, module_name: str):
        self._loader, self._library, self._module_name = loader, library, module_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(self._library, self._module_name)

    def __getattr__(self, name):   # resources, source, is_package: the real loader's
        return getattr(self._loader, name)


class _RegisterOnImport:
    """A sys.meta_path finder that only watches a few top-level names (transformers, timm):
    it finds their spec with the other finders and wraps the loader, then steps aside."""

    def __init__(self):
        self.hooks = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.hooks:
            return None
        import importlib.util
        sys.meta_path.remove(self)   # find the real spec without us
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, fullname, self.hooks[fullname])
        return spec


def _register_on_import(library: str, module_name: str) -> None:
    if library in sys.modules:
        _register(library, module_name)
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _RegisterOnImport)), None)
    if finder is None:
        finder = _RegisterOnImport()
        sys.meta_path.insert(0, finder)
    finder.hooks[library] = module_name


_register_on_import("transformers", "vlmo_fast.hf")
_register_on_import("timm", "vlmo_fast.timm_models")

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
