"""Export: each ITC tower to ONNX, and a checkpoint folder with the tokenizer and image-processor files.

ONNX (`export_onnx`): the image tower (images [B, 3, S, S] float32 in [-1, 1] -> features
[B, D]) and the text tower (text_ids, text_mask [B, max_text_len] int64 -> features [B, D])
as two files, the workaround open_clip / LAVIS users ask for (a fused VL model has no single
fixed-shape graph). Both take any batch size; the text length is fixed at the model's
`max_text_len` (pad with the tokenizer, mask 1 = real token), the image size at `img_size`
(the relative-position index is built for that layout). The features are the L2-normalised
ITC embeddings `VLMo.encode_image(...).features` / `encode_text(...).features`.

How: `exporter="torchscript"` (default; `torch.onnx.export(dynamo=False)`) or `"dynamo"`
(`torch.export`-based, needs `onnxscript`; the path torch keeps once the TorchScript exporter is
removed) traces the model with the reference attention and a trace-only FFN backend
(`export_single_expert`, registered here): each tower tells the backend which expert all its
tokens use, so the graph holds one dense expert per block instead of the data-dependent routing
(`nonzero`/`index_select`) and no traced value is read on the host. Two fix-ups follow: negative `perm`s in Transpose nodes (the exporter writes them for
`movedim`, onnxruntime rejects them) become positive, and stale traced shape annotations are
dropped. `check_onnx` runs the files with onnxruntime against PyTorch.

Pretrained folder (`export_pretrained`, core dependencies only): config.json +
model.safetensors (`save_pretrained`), the tokenizer's files, and preprocessor_config.json
(`image_processor_config`: transformers' CLIP image-processor terms for vlmo_fast's evaluation
transform). `Encoder.from_pretrained` / `VLMo.from_pretrained` read it, and transformers'
AutoTokenizer / AutoImageProcessor read its tokenizer and image processor, but not AutoModel:
the folder for transformers is `vlmo_fast.hf.export_hf` (`vlmo-fast export --hf`), which
writes the same files with transformers' config.json and the model code.

Both write into a hidden temporary sibling folder and rename it into place at the end, so
an export killed half-way leaves no half-written folder.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import warnings
from pathlib import Path
from typing import Dict, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import atomic_directory, atomic_write_json

PathLike = Union[str, os.PathLike]
ONNX_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
EXPORT_FFN_BACKEND = "export_single_expert"
# The expert a tower's tokens all use, set by the tower while it runs: the FFN backend then
# needs no value from the traced modality ids (torch.export cannot read one).
_TOWER_EXPERT: contextvars.ContextVar = contextvars.ContextVar("vlmo_fast_tower_expert", default=None)


@contextlib.contextmanager
def _tower_expert(expert: int) -> Iterator[None]:
    token = _TOWER_EXPERT.set(expert)
    try:
        yield
    finally:
        _TOWER_EXPERT.reset(token)


# -- towers ----------------------------------------------------------------------------------
class ImageTower(nn.Module):
    """images [B, 3, S, S] in [-1, 1] -> L2-normalised ITC features [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        from .mome import VISION
        with _tower_expert(VISION):
            return self.model.encode_image(images).features


class TextTower(nn.Module):
    """text_ids, text_mask [B, L] (mask 1 = real token) -> L2-normalised ITC features [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        from .mome import LANGUAGE
        with _tower_expert(LANGUAGE):
            return self.model.encode_text(text_ids, text_mask).features


def _ffn_single_expert(x, modality_ids, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
                       fc2_bias, gamma=None, drop_path_scale=None, eps=1e-6):
    """The MoME FFN when every token goes to the same expert, for tracing only: the tracer
    records the expert index as a constant and the graph holds one dense expert."""
    expert = _TOWER_EXPERT.get()
    if expert is None:    # called outside a tower: read (and check) the ids
        ids = modality_ids.reshape(-1)
        expert = int(ids[0])
        if not bool((ids == expert).all()):
            raise ValueError(f"the {EXPORT_FFN_BACKEND!r} FFN backend only handles single-modality "
                             "input (one expert for every token): export the image and text towers")
    d = int(norm_weight.shape[-1])   # a Python int: a traced size would make the graph dynamic
    z = F.layer_norm(x, (d,), norm_weight[expert], norm_bias[expert], eps)
    branch = F.gelu(z @ fc1_weight[expert] + fc1_bias[expert]) @ fc2_weight[expert] + fc2_bias[expert]
    if gamma is not None:
        branch = branch * gamma
    if drop_path_scale is not None:
        branch = branch * drop_path_scale[..., None].to(branch.dtype)
    return x + branch


def _register_export_backend() -> None:
    from . import backends
    from .mome import register_ffn_impl
    if EXPORT_FFN_BACKEND not in backends.available_backends("ffn"):
        register_ffn_impl(EXPORT_FFN_BACKEND, _ffn_single_expert)


@contextlib.contextmanager
def export_mode(model) -> Iterator[None]:
    """Eval mode, reference attention and the trace-only FFN on every module; restored after."""
    from .attention import MultiHeadSelfAttention
    from .mome import MoMEFeedForward
    _register_export_backend()
    saved = []
    for module in model.modules():
        if isinstance(module, MoMEFeedForward):
            saved.append((module, module.backend))
            module.backend = EXPORT_FFN_BACKEND
        elif isinstance(module, MultiHeadSelfAttention):
            saved.append((module, module.backend))
            module.backend = "reference"
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for module, backend in saved:
            module.backend = backend
        model.train(was_training)


# -- folders written all at once -------------------------------------------------------------
@contextlib.contextmanager
def staged_directory(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` as a whole (which
    must not exist or be empty, unless overwrite=True), on failure it is deleted: the
    crash-safe swap of `vlmo_fast.io.atomic_directory`, plus the no-overwrite guard."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; pass overwrite=True (--overwrite) to replace it")
    with atomic_directory(target) as stage:
        yield stage


# -- ONNX ------------------------------------------------------------------------------------
def _fix_onnx_graph(path: Path) -> None:
    import onnx
    # graph only: weights of a model over 2 GB stay in the external-data files the exporter wrote
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type != "Transpose":
            continue
        for attr in node.attribute:
            if attr.name == "perm" and any(p < 0 for p in attr.ints):
                rank = len(attr.ints)
                fixed = [p % rank for p in attr.ints]
                del attr.ints[:]
                attr.ints.extend(fixed)
    # the tracer's intermediate shape annotations can disagree with the fixed graph
    proto.graph.ClearField("value_info")
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))   # by path: works for models with external data too


def _example_inputs(model, batch: int = 2):
    c = model.config
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    images = (torch.rand(batch, c.in_chans, c.img_size, c.img_size, generator=g) * 2 - 1).to(device)
    text_ids = torch.randint(1, c.vocab_size, (batch, c.max_text_len), generator=g).to(device)
    text_mask = torch.ones_like(text_ids)
    text_mask[0, c.max_text_len // 2:] = 0     # padding in the traced example
    return images, text_ids, text_mask


def export_onnx(model, directory: PathLike, *, towers: Sequence[str] = ("image", "text"),
                opset: int = DEFAULT_OPSET, overwrite: bool = False,
                exporter: str = "torchscript") -> Dict[str, Path]:
    """Export the towers to `directory`/{image,text}_encoder.onnx (+ onnx_config.json).
    `exporter`: "torchscript" or "dynamo" (torch.export; needs onnxscript, opset >= 18).
    Returns {"image": path, "text": path}."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    try:
        import onnx  # noqa: F401
        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export ({exporter}) needs the `onnx` package"
                          + (" and `onnxscript`" if exporter == "dynamo" else "")
                          + ": pip install 'vlmo_fast[export]'") from exc
    unknown = set(towers) - set(ONNX_FILES)
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {sorted(ONNX_FILES)}, got {list(towers)}")
    if exporter == "dynamo":
        opset = max(opset, 18)   # the lowest opset torch's dynamo exporter emits
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()   # the exported graph is fp32; leave the caller's model
    images, text_ids, text_mask = _example_inputs(model)
    c = model.config
    written = {}
    with staged_directory(directory, overwrite=overwrite) as stage, export_mode(model), \
            torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every Python-level check on tensor values (constants here)
        warnings.simplefilter("ignore")
        for tower in towers:
            path = stage / ONNX_FILES[tower]
            if tower == "image":
                module, args, names = ImageTower(model), (images,), ["images"]
            else:
                module, args, names = TextTower(model), (text_ids, text_mask), ["text_ids", "text_mask"]
            module.eval()
            if exporter == "dynamo":
                batch = torch.export.Dim("batch")
                torch.onnx.export(module, args, str(path), dynamo=True, input_names=names,
                                  output_names=["features"], opset_version=opset,
                                  dynamic_shapes=tuple({0: batch} for _ in names),
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(module, args, str(path), dynamo=False, input_names=names,
                                  output_names=["features"], opset_version=opset,
                                  dynamic_axes={n: {0: "batch"} for n in names + ["features"]},
                                  training=torch.onnx.TrainingMode.EVAL)
            _fix_onnx_graph(path)
            written[tower] = Path(directory) / ONNX_FILES[tower]
        from .inference import model_fingerprint
        atomic_write_json(stage / "onnx_config.json", {
            "towers": {t: {"file": ONNX_FILES[t],
                           "inputs": ({"images": ["batch", c.in_chans, c.img_size, c.img_size]}
                                      if t == "image" else
                                      {"text_ids": ["batch", c.max_text_len],
                                       "text_mask": ["batch", c.max_text_len]}),
                           "output": {"features": ["batch", int(model.itc.image_proj.out_features)]}}
                       for t in towers},
            "image_normalization": {"mean": [0.5] * 3, "std": [0.5] * 3, "range": [-1, 1]},
            "opset": opset, "exporter": exporter, "model_hash": model_fingerprint(model), "model_config": c.to_dict()})
    return written


def check_onnx(model, directory: PathLike, *, batch: int = 3, seed: int = 1) -> Dict[str, float]:
    """Max |onnxruntime - PyTorch| of each exported tower's features on fresh random inputs
    (a batch size other than the traced one, padded texts)."""
    import onnxruntime as ort
    directory = Path(directory)
    c = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, c.in_chans, c.img_size, c.img_size, generator=g) * 2 - 1
    text_ids = torch.randint(1, c.vocab_size, (batch, c.max_text_len), generator=g)
    text_mask = torch.ones_like(text_ids)
    for i in range(batch):
        text_mask[i, torch.randint(2, c.max_text_len + 1, (1,), generator=g).item():] = 0
    text_ids = text_ids * text_mask
    out = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for tower, file in ONNX_FILES.items():
                path = directory / file
                if not path.is_file():
                    continue
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                if tower == "image":
                    got = session.run(None, {"images": images.numpy()})[0]
                    ref = model.encode_image(images.to(device)).features
                else:
                    got = session.run(None, {"text_ids": text_ids.numpy(), "text_mask": text_mask.numpy()})[0]
                    ref = model.encode_text(text_ids.to(device), text_mask.to(device)).features
                out[tower] = float((torch.from_numpy(got) - ref.float().cpu()).abs().max())
    finally:
        model.train(was_training)
    if not out:
        raise FileNotFoundError(f"no exported towers ({', '.join(ONNX_FILES.values())}) in {directory}")
    return out


# -- pretrained folder -----------------------------------------------------------------------
def image_processor_config(config) -> dict:
    """preprocessor_config.json: vlmo_fast's evaluation transform in transformers' CLIP
    image-processor terms (RGB, shorter side to img_size bicubic, centre crop, x/255,
    (x - 0.5) / 0.5), so that `AutoImageProcessor` reproduces it."""
    size = config.img_size
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def export_pretrained(model, directory: PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """config.json + model.safetensors (+ manifest.json) + tokenizer files +
    preprocessor_config.json, without transformers (see the module docstring; for a folder
    transformers' AutoModel loads, use vlmo_fast.hf.export_hf)."""
    with staged_directory(directory, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save(stage)
        atomic_write_json(stage / "preprocessor_config.json", image_processor_config(model.config))
    return Path(directory)
