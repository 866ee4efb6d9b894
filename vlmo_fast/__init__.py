"""vlmo_fast: kernel-accelerated VLMo (Mixture-of-Modality-Experts vision-language model)."""
__version__ = "0.1.0"

from . import backends
from .backends import backend_report, set_backend
from .mome import MoMEFeedForward, mome_ffn, mome_ffn_reference, VISION, LANGUAGE, VISION_LANGUAGE
