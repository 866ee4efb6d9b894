"""Capacity planner: what VLMo's vision-language pretraining stage needs on N GPUs.

    vlmo-fast plan --preset base --gpus 64 --gpu h100 --batch-size 1024 --zero 2 \\
        --pairs 4e6 --steps 200000 [--activation-checkpointing] [--json]
    python -m vlmo_fast.plan ...            (the same flags)

`--batch-size` is the GLOBAL batch (image-text pairs per optimizer step over all GPUs), as in
the VLMo paper (1024); each GPU takes batch / gpus, split into micro-batches.

Where each figure comes from:
- parameters: counted on the real `VLMo` built on the meta device (no memory, no init).
- model states per GPU (bf16 weights and gradients, fp32 master weights and AdamW moments):
  DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
  `estimate_zero3_model_states_mem_needs`) when deepspeed imports; otherwise the same
  formulas written out here, and the plan says so. ZeRO-0/1 have no DeepSpeed estimator:
  the same per-parameter bytes (2 bf16 weights + 2 bf16 grads + 4 fp32 grads + 4 fp32 master
  + 8 AdamW) without (0) or with (1) the fp32 part partitioned.
- activations: the tensors autograd keeps for backward, itemised per block from the code of
  the kernels that run (`block_saved_bytes`: MoMEFFNFunction or the grouped_mm FFN, fused
  or reference attention) and summed over the VL step's passes (`vl_step_passes`: dual
  encoder over images and texts, the itc_vl re-run of the VL layers, one fusion pass over
  4 x micro-batch pairs: MLM, ITM positives, negative texts, negative images), plus
  embeddings, final norms, heads and losses. With activation checkpointing each block keeps
  only its input and one block is recomputed during backward. tests/test_plan.py checks
  the itemisation against autograd's saved tensors and the total against the CPU
  allocator's measured peak.
- time: benchmarks/roofline.py's kernel models (MoME FFN, contrastive loss, hard-negative
  sampler) plus the stated assumptions below for attention, projections and
  communication. A MODEL, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .config import PRESETS, VLMoConfig

GIB = 1024 ** 3
MIB = 1024 ** 2


# ----------------------------------------------------------------------------- hardware

@dataclass(frozen=True)
class GPUSpec:
    """Facts of one GPU model (SXM parts, DGX-style nodes)."""
    key: str
    name: str
    memory_bytes: int           # total device memory as nvidia-smi reports it
    bf16_tflops: float          # dense tensor-core peak
    hbm_tbps: float             # DRAM bandwidth, TB/s
    nvlink_gbs: float           # NVLink bandwidth per GPU, one direction, GB/s
    internode_gbs: float        # network bandwidth per GPU, one direction, GB/s (one NIC per GPU)
    gpus_per_node: int
    roofline_part: str          # roofline.PARTS key whose SMs, clocks and efficiencies apply


# Peaks and HBM bandwidths as benchmarks/roofline.py's A100/H100 parts (A100-40GB: 1.555 TB/s
# HBM2, H200: 4.8 TB/s HBM3e, both from NVIDIA's datasheets). NVLink: 12 x 25 GB/s per
# direction on A100 (NVLink 3), 18 x 25 GB/s on H100/H200 (NVLink 4). Network: the DGX
# layout of one NIC per GPU, 200 Gb/s HDR (A100) or 400 Gb/s NDR (H100/H200): an assumption
# about the cluster, override with --internode-gbs.
GPUS: Dict[str, GPUSpec] = {
    "a100-40": GPUSpec("a100-40", "A100-SXM4-40GB", 40960 * MIB, 312.0, 1.555, 300.0, 25.0, 8, "a100"),
    "a100-80": GPUSpec("a100-80", "A100-SXM4-80GB", 81920 * MIB, 312.0, 2.039, 300.0, 25.0, 8, "a100"),
    "h100": GPUSpec("h100", "H100-SXM5-80GB", 81559 * MIB, 989.4, 3.35, 450.0, 50.0, 8, "h100"),
    "h200": GPUSpec("h200", "H200-SXM-141GB", 143771 * MIB, 989.4, 4.8, 450.0, 50.0, 8, "h100"),
}
GPU_ALIASES = {"a100": "a100-80", "h100-80": "h100", "h200-141": "h200"}

# Memory the plan leaves free on every GPU: CUDA context, NCCL buffers, allocator
# fragmentation (assumed: 2 GiB + 5 % of the device).
RESERVED_FIXED_BYTES = 2 * GIB
RESERVED_FRACTION = 0.05

# Assumptions of the time model that benchmarks/roofline.py does not cover (stated, not
# measured): attention cores (FlexAttention with the relative-bias score_mod) at this
# fraction of the bf16 peak, their backward at 2.5x the forward FLOPs (S recomputed, 5
# GEMMs against 2); collectives at this fraction of the link bandwidth; ZeRO's gradient
# reduction overlapped with backward (overlap_comm in train/configs/zero2.json, zero3.json).
ATTENTION_EFFICIENCY = 0.40
ATTENTION_BACKWARD_FACTOR = 2.5
COLLECTIVE_EFFICIENCY = 0.80

# train/configs/zero{2,3}.json bucket sizes (elements) and their buffers: with overlap_comm
# ZeRO-2 double-buffers the reduce bucket.
ZERO_BUCKET_ELEMENTS = 50_000_000


def gpu_spec(gpu: Union[str, GPUSpec]) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    if not isinstance(gpu, str):
        raise ValueError(f"gpu must be one of {sorted(GPUS)} (or a GPUSpec), got {gpu!r}")
    key = GPU_ALIASES.get(gpu.lower(), gpu.lower())
    if key not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {sorted(GPUS) + sorted(GPU_ALIASES)}")
    return GPUS[key]


def load_roofline():
    """benchmarks/roofline.py as a module, or (None, why). benchmarks/ is not part of the
    installed package: the planner finds it beside the package in a source checkout or an
    editable install."""
    name = "vlmo_fast_benchmarks_roofline"
    if name in sys.modules:
        return sys.modules[name], None
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "roofline.py"
    if not path.is_file():
        return None, (f"benchmarks/roofline.py not found beside the package ({path}): the time "
                      "model needs a source checkout of vlmo_fast")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:   # a broken checkout: say why, keep the memory plan
        del sys.modules[name]
        return None, f"benchmarks/roofline.py failed to import: {exc}"
    return module, None


# ----------------------------------------------------------------------------- parameters

@dataclass
class ParameterCount:
    total: int
    largest_layer: int          # DeepSpeed's "largest layer": most parameters owned by one module
    largest_layer_name: str
    groups: Dict[str, int]      # top-level submodule -> parameters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def count_parameters(config: VLMoConfig) -> ParameterCount:
    """Parameters of the real model, built on the meta device. The largest layer follows
    deepspeed's `model_to_params` (parameters a module owns directly); DeepSpeed's own helper
    cannot be used on meta tensors (it de-duplicates by data_ptr, which is 0 on meta)."""
    import torch
    from .model import VLMo
    with torch.device("meta"):
        model = VLMo(config)
    total = sum(p.numel() for p in model.parameters())   # parameters() yields shared ones once
    largest, largest_name = 0, ""
    for name, module in model.named_modules():
        owned = sum(p.numel() for p in module.parameters(recurse=False))
        if owned > largest:
            largest, largest_name = owned, name
    groups = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return ParameterCount(total, largest, largest_name, {k: v for k, v in groups.items() if v})


# ----------------------------------------------------------------------------- model states

def _deepspeed_estimators():
    """(zero2 estimator, zero3 estimator, deepspeed version) or None when deepspeed is absent."""
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs, deepspeed.__version__


def model_state_bytes(total_params: int, largest_layer_params: int, zero: int, gpus_per_node: int,
                      nodes: int, use_deepspeed: bool = True) -> Tuple[int, str]:
    """(bytes per GPU, where the figure comes from) for bf16 training with AdamW, no offload."""
    n = gpus_per_node * nodes
    p = total_params
    estimators = _deepspeed_estimators() if use_deepspeed and zero in (2, 3) else None
    if estimators is not None:
        zero2, zero3, version = estimators
        if zero == 2:
            _, gpu_mem = zero2(p, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=False)
            return int(gpu_mem), f"deepspeed {version} estimate_zero2_model_states_mem_needs"
        _, gpu_mem, _ = zero3(p, largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                              cpu_offload=False, cpu_offload_params=False, zero_init=True)
        return int(gpu_mem), f"deepspeed {version} estimate_zero3_model_states_mem_needs"
    # DeepSpeed's per-parameter bytes: 2 bf16 weights; 18 = 2 bf16 grads + 4 fp32 grads +
    # 4 fp32 master + 8 AdamW moments. ZeRO-3 also gathers the largest layer (4 bytes each).
    why = "deepspeed not installed: fallback formula" if zero in (2, 3) else \
        "formula (DeepSpeed has no ZeRO-0/1 estimator)"
    if zero == 0:
        return 20 * p, why + ": 20 B/param"
    if zero == 1:
        return 4 * p + int(16 * p / n), why + ": 4 B/param + 16 B/param / GPUs"
    if zero == 2:
        return 2 * p + int(18 * p / n), why + ": 2 B/param + 18 B/param / GPUs"
    return 4 * largest_layer_params + int(18 * p / n), why + ": 4 B x largest layer + 18 B/param / GPUs"


# ----------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class Execution:
    """Which kernels run: it decides what autograd keeps for backward."""
    precision: str = "bf16"     # "bf16" | "fp32"
    attention: str = "fused"    # "fused": flex / flash / SDPA-efficient (q, k, v, output, LSE)
    #                             "reference": materialised fp32 probabilities [B, H, L, L]
    ffn: str = "triton"         # "triton" | "triton-recompute" (VLMO_FAST_MOME_RECOMPUTE=1) | "grouped_mm"
    layout: str = "packed"      # "packed" (one pack per pass, CUDA) | "padded" (one pass per kind, CPU)
    mlm_rows: str = "budget"    # "budget": nonzero_static's mean + 8 sd + 16 (accelerators) | "expected"

    def __post_init__(self):
        for name, allowed in (("precision", ("bf16", "fp32")), ("attention", ("fused", "reference")),
                              ("ffn", ("triton", "triton-recompute", "grouped_mm")),
                              ("layout", ("packed", "padded")), ("mlm_rows", ("budget", "expected"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Execution.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def element_size(self) -> int:
        return 2 if self.precision == "bf16" else 4


CUDA_EXECUTION = Execution()
# What PretrainStep runs on a CPU (fp32, reference attention, grouped_mm FFN, padded passes):
# the path tests/test_plan.py measures.
CPU_EXECUTION = Execution("fp32", "reference", "grouped_mm", "padded", "expected")

LN_STATS_BYTES = 8              # LayerNorm mean + rstd per row, fp32


@dataclass(frozen=True)
class Pass:
    """Sequences run through blocks [start, end) in one forward of the step."""
    name: str
    groups: Tuple[Tuple[int, int], ...]      # (sequences, tokens each)
    start: int
    end: int
    experts_below: Tuple[int, int, int]      # tokens per expert (vision, language, VL) below vl_start
    experts_vl: Tuple[int, int, int]         # ... in the VL layers
    masked: bool                             # attention has a bias or key padding
    text_tokens: int = 0                     # tokens that come from the text embeddings
    images: int = 0                          # images through the patch embedding

    @property
    def tokens(self) -> int:
        return sum(n * length for n, length in self.groups)

    @property
    def sequences(self) -> int:
        return sum(n for n, _ in self.groups)

    @property
    def score_pairs(self) -> int:
        """(query, key) pairs of the attention: each sequence attends only to itself."""
        return sum(n * length * length for n, length in self.groups)


def _drop_path_active(config: VLMoConfig, layer: int) -> bool:
    return config.drop_path_rate * layer / max(config.depth - 1, 1) > 0.0


def block_saved_bytes(config: VLMoConfig, execution: Execution, *, tokens: int, sequences: int,
                      score_pairs: int, masked: bool, drop_path: bool) -> Dict[str, int]:
    """Bytes autograd keeps for one MoMEBlock's backward, per saved tensor (parameters
    excluded), for `tokens` tokens in `sequences` sequences with `score_pairs` (query, key)
    pairs. Each item names the tensor and who keeps it (see MoMEBlock.forward,
    MultiHeadSelfAttention.forward, the attention cores and the FFN backends)."""
    items = attention_saved_bytes(config, execution, tokens=tokens, sequences=sequences,
                                  score_pairs=score_pairs, masked=masked, drop_path=drop_path)
    items.update(ffn_saved_bytes(config, execution, tokens=tokens, drop_path=drop_path))
    return items


def attention_saved_bytes(config: VLMoConfig, execution: Execution, *, tokens: int, sequences: int,
                          score_pairs: int, masked: bool, drop_path: bool) -> Dict[str, int]:
    """The attention half of `block_saved_bytes` (norm1, attention, proj, layer scale)."""
    d, heads = config.dim, config.num_heads
    el = execution.element_size
    gamma = config.layer_scale_init is not None
    packed = execution.layout == "packed"
    items = {
        "norm1 input + mean/rstd": tokens * (d * el + LN_STATS_BYTES),
        "qkv input (norm1 output)": tokens * d * el,
    }
    if execution.attention == "fused":
        # the core keeps q (scaled: its own tensor), k and v (views of the qkv output, which
        # therefore stays whole), its output (token-major like q: it is the proj input below,
        # no copy) and the fp32 log-sum-exp and row maximum per head
        items["q scaled + qkv output (k, v views)"] = tokens * 4 * d * el
        items["log-sum-exp + row max (fp32 per head)"] = tokens * 8 * heads
    else:
        # attention_reference: the batched matmuls keep copies of q, k^T and v ([B*H, L, Dh]);
        # softmax keeps its fp32 output and, when masked, the PV matmul a masked copy of it
        acc = max(el, 4)
        items["q, k^T, v (matmul copies)"] = tokens * 3 * d * el
        items["softmax probabilities" + (" + masked copy" if masked else "")] = \
            score_pairs * heads * acc * (2 if masked else 1)
        if masked:
            items["fully-blocked-row mask"] = tokens * heads
    items["proj input (attention output in token order)"] = tokens * d * el
    if gamma:
        items["proj output (for d gamma_1)"] = tokens * d * el
    if drop_path:   # one keep/drop per sample; a pack expands it per token
        items["drop-path scale (attention)"] = (tokens if packed else sequences) * el
    return items


def ffn_saved_bytes(config: VLMoConfig, execution: Execution, *, tokens: int, drop_path: bool) -> Dict[str, int]:
    """The expert-FFN half of `block_saved_bytes` (LN_e, fc1, GELU, fc2, layer scale)."""
    d, h = config.dim, config.mlp_hidden_dim
    el = execution.element_size
    gamma = config.layer_scale_init is not None
    items = {}
    if execution.ffn in ("triton", "triton-recompute"):
        # MoMEFFNFunction: x, z = LN_e(x), mean/rstd, pre-activation (unless recomputed),
        # GELU output, the branch (for d gamma_2), int32 permutation, fp32 drop-path scale
        items["FFN input"] = tokens * d * el
        items["z = LN_e(x) + mean/rstd"] = tokens * (d * el + LN_STATS_BYTES)
        if execution.ffn == "triton":
            items["fc1 pre-activation"] = tokens * h * el
        items["GELU output"] = tokens * h * el
        if gamma:
            items["fc2 branch (for d gamma_2)"] = tokens * d * el
        items["routing permutation (int32)"] = tokens * 4
        if drop_path:
            items["drop-path scale (FFN, fp32)"] = tokens * 4
    else:
        # mome_ffn_grouped_mm under autograd: sorted input (+ LN statistics), normalised z,
        # the gathered LN weight, the LN output (grouped_mm input), pre-activation, GELU
        # output, the fc2 output (for d gamma_2), the index_add source, int64 perm + ids
        items["sorted FFN input + mean/rstd"] = tokens * (d * el + LN_STATS_BYTES)
        items["z, gathered LN weight, LN output"] = tokens * 3 * d * el
        items["fc1 pre-activation"] = tokens * h * el
        items["GELU output"] = tokens * h * el
        if gamma:
            items["fc2 output (for d gamma_2)"] = tokens * d * el
        items["scattered branch (index_add source)"] = tokens * d * el
        items["permutation + sorted ids (int64)"] = tokens * 16
        if drop_path:
            items["drop-path scale (FFN)"] = tokens * el
    return items


def vl_step_passes(config: VLMoConfig, micro_batch: int, text_len: int, layout: str) -> List[Pass]:
    """The passes of PretrainStep's VL step for `micro_batch` pairs with `text_len` tokens per
    text (padded, or real when packed): the dual encoder, the itc_vl re-run of the VL layers
    (itc_vl_head), and one fusion pass over 4 x micro_batch pairs."""
    b, lt, li = micro_batch, text_len, config.num_image_tokens
    depth, vl_start = config.depth, config.vl_start
    rerun = config.itc_vl_head and config.vl_layers > 0
    relative = config.relative_position
    pair_len = lt + li
    fusion = Pass("fusion: MLM + ITM positive / negative-text / negative-image pairs",
                  ((4 * b, pair_len),), 0, depth, (4 * b * li, 4 * b * lt, 0), (0, 0, 4 * b * pair_len),
                  masked=True, text_tokens=4 * b * lt, images=4 * b)
    if layout == "packed":
        dual = Pass("dual encoder: images + texts (one pack)", ((b, li), (b, lt)), 0, depth,
                    (b * li, b * lt, 0), (b * li, b * lt, 0), masked=True, text_tokens=b * lt, images=b)
        passes = [dual]
        if rerun:
            passes.append(Pass("itc_vl re-run of the VL layers (one pack)", dual.groups, vl_start, depth,
                               (0, 0, 0), (0, 0, dual.tokens), masked=True))
        return passes + [fusion]
    image = Pass("image encoder", ((b, li),), 0, depth, (b * li, 0, 0), (b * li, 0, 0),
                 masked=relative, images=b)
    text = Pass("text encoder", ((b, lt),), 0, depth, (0, b * lt, 0), (0, b * lt, 0), masked=True,
                text_tokens=b * lt)
    passes = [image, text]
    if rerun:
        passes += [Pass("image itc_vl re-run of the VL layers", image.groups, vl_start, depth, (0, 0, 0),
                        (0, 0, b * li), masked=relative),
                   Pass("text itc_vl re-run of the VL layers", text.groups, vl_start, depth, (0, 0, 0),
                        (0, 0, b * lt), masked=True)]
    return passes + [fusion]


def _pass_blocks(config, execution, p: Pass) -> Tuple[int, int]:
    """(bytes all the pass's blocks keep, bytes its largest block keeps)."""
    sizes = [sum(block_saved_bytes(config, execution, tokens=p.tokens, sequences=p.sequences,
                                   score_pairs=p.score_pairs, masked=p.masked,
                                   drop_path=_drop_path_active(config, layer)).values())
             for layer in range(p.start, p.end)]
    return sum(sizes), max(sizes)


def _largest_block_tensor(config, execution, p: Pass) -> int:
    """The largest single tensor inside one block of pass p: the FFN hidden [T, h], the qkv
    output [T, 3d], or the reference core's fp32 probabilities [B, H, L, L]."""
    el = execution.element_size
    sizes = [p.tokens * config.mlp_hidden_dim * el, p.tokens * 3 * config.dim * el]
    if execution.attention == "reference":
        sizes.append(p.score_pairs * config.num_heads * max(el, 4))
    return max(sizes)


def _pass_edges(config, execution, p: Pass) -> int:
    """Bytes kept outside the blocks: text embeddings (LayerNorm input + stats, int64 word and
    type ids), the patch embedding's input images, the final LayerNorm (input + stats; padded
    passes also keep its output, through the [CLS] view the heads read), pack indices."""
    el = execution.element_size
    d = config.dim
    kept = p.text_tokens * (d * el + LN_STATS_BYTES + 16)
    kept += p.images * config.in_chans * config.img_size ** 2 * el
    kept += p.tokens * (d * el + LN_STATS_BYTES)      # every pass ends in the final LayerNorm
    if execution.layout == "padded":
        kept += p.tokens * d * el
    if execution.layout == "packed" and p.start == 0:
        kept += p.tokens * 16
    return kept


def mlm_rows(config: VLMoConfig, execution: Execution, micro_batch: int, text_len: int,
             probability: float = 0.15) -> int:
    """Rows the MLM head runs on: the masked count (CPU) or nonzero_static's budget."""
    n = micro_batch * text_len
    mean = n * probability
    if execution.mlm_rows == "expected":
        return max(1, round(mean))
    return min(n, int(mean + 8 * math.sqrt(mean * (1 - probability)) + 16))


@dataclass
class ActivationEstimate:
    micro_batch: int
    blocks: int                      # saved by the blocks (checkpointed: their inputs)
    edges: int                       # embeddings, final norms, pack indices
    heads: int                       # ITC / ITM / MLM heads and the contrastive losses
    total: int
    workspace: int                   # transient on top of `total`: one op's gradients (+ a block's recompute)
    per_pass: Dict[str, int]
    per_token_per_layer: Dict[str, float]   # bytes per token per block, fusion pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation_bytes(config: VLMoConfig, execution: Execution, micro_batch: int, text_len: int,
                     world: int = 1, checkpointing: bool = False) -> ActivationEstimate:
    """What a VL step of `micro_batch` pairs keeps for backward (see the module docstring)."""
    el = execution.element_size
    d, b = config.dim, micro_batch
    passes = vl_step_passes(config, b, text_len, execution.layout)
    per_pass, blocks, edges, workspace = {}, 0, 0, 0
    for p in passes:
        full, largest = _pass_blocks(config, execution, p)
        # backward of one op holds the gradients of its output and input: twice the largest
        # tensor of a block; with checkpointing the block's recomputed activations come on top
        op_workspace = 2 * _largest_block_tensor(config, execution, p)
        if checkpointing:
            # each block keeps its input (non-reentrant torch.utils.checkpoint); the pass's
            # routing ids and masks (int64 / bool per token) are kept once
            kept = (p.end - p.start) * p.tokens * d * el + p.tokens * 16
            workspace = max(workspace, largest + op_workspace)
        else:
            kept = full
            workspace = max(workspace, op_workspace)
        edge = _pass_edges(config, execution, p)
        per_pass[p.name] = kept + edge
        blocks += kept
        edges += edge
    # heads: ITC projections + L2 normalisation (4 feature sets), contrastive losses (itc and
    # itc_vl; --itc-accum cached replaces them by a surrogate that keeps less), pooler + ITM,
    # MLM head at the masked rows (its fp32 log-softmax dominates)
    feature_sets = 4 if (config.itc_vl_head and config.vl_layers > 0) else 2
    losses = feature_sets // 2
    n_global = b * world
    heads = feature_sets * b * (d * el + 8)
    if execution.attention == "fused":   # Triton contrastive: img, gathered txt, two LSEs
        heads += losses * ((b + n_global) * d * el + 8 * n_global)
    else:                                # reference: fp32 logits' log-softmax in both directions
        heads += losses * ((b + n_global) * d * 4 + 4 * b * n_global * 4)
    heads += 4 * b * d * el * 2 + 3 * b * 2 * 4          # pooler (dense output, tanh), ITM
    k = mlm_rows(config, execution, b, text_len)
    heads += k * (4 * d * el + LN_STATS_BYTES + 8) + k * config.vocab_size * 4
    # transient at the end of forward: the MLM logits (model dtype + fp32 copy)
    workspace = max(workspace, k * config.vocab_size * (el + 4))
    fusion = passes[-1]
    per_token = block_saved_bytes(config, execution, tokens=1, sequences=0,
                                  score_pairs=fusion.groups[0][1], masked=True, drop_path=True)
    return ActivationEstimate(
        micro_batch=b, blocks=blocks, edges=edges, heads=heads, total=blocks + edges + heads,
        workspace=workspace, per_pass=per_pass,
        per_token_per_layer={"full": float(sum(per_token.values())),
                             "checkpointed": float(d * el)})


def step_buffers(config: VLMoConfig, execution: Execution, micro_batch: int, text_len: int,
                 world: int) -> Dict[str, int]:
    """Tensors a VL step holds besides activations: the all-gathered raw inputs (every rank's
    images, fp32 as the loader gives them, for the negatives), the 4b fusion inputs, and
    the hard-negative sampler's similarity matrices (transient)."""
    b, n = micro_batch, micro_batch * world
    image_bytes = config.in_chans * config.img_size ** 2 * 4
    text_bytes = text_len * 8 * 2 + 8           # int64 ids + mask, image id
    out = {"all-gathered inputs (images fp32, ids, masks)": n * (image_bytes + text_bytes) if world > 1 else 0,
           "fusion inputs (4b images, ids, masks)": 4 * b * (image_bytes + text_bytes)}
    if execution.precision == "fp32":   # the patch embedding keeps these very images (counted there)
        out["fusion inputs (4b images, ids, masks)"] = 4 * b * text_bytes
    el = execution.element_size
    out["hard-negative sampler (similarities, masks, fp32 features)"] = \
        2 * b * n * 4 + 3 * b * n + 2 * n * config.dim * (el + 4)
    return out


# ----------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """A capacity plan (see the module docstring): `summary()` for people, `to_dict()` for tools."""
    preset: str
    gpu: GPUSpec
    gpus: int
    nodes: int
    gpus_per_node: int
    zero: int
    batch_size: int
    per_gpu_batch: int
    micro_batch: Optional[int]
    grad_accum: Optional[int]
    text_len: int
    image_tokens: int
    pairs: int
    steps: int
    activation_checkpointing: bool
    itc_accum: str
    execution: Execution
    parameters: ParameterCount
    model_states: int
    model_states_source: str
    zero_buffers: int
    reserved: int
    usable: int
    activations: ActivationEstimate                    # at the chosen (or, not fitting, the tried) micro-batch
    activations_other: ActivationEstimate              # the same with the other checkpointing choice
    buffers: Dict[str, int]
    memory_total: int
    max_micro_batch: int
    max_micro_batch_other: int
    contrastive_batch: Optional[int]
    collectives: Dict[str, Dict[str, float]]
    sampler: Dict[str, float]
    time: Dict[str, object]
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.micro_batch is not None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        out["epochs"] = self.steps * self.batch_size / self.pairs
        return out

    def summary(self) -> str:
        g, a, p = self.gpu, self.activations, self.parameters
        mode, other_mode = ("with", "without") if self.activation_checkpointing else ("without", "with")
        lines = [f"VLMo capacity plan: VL pretraining stage, preset {self.preset}, {self.gpus} x {g.name} "
                 f"({self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node}), ZeRO-{self.zero}, "
                 f"{self.execution.precision}, {mode} activation checkpointing"]
        groups = ", ".join(f"{k} {_m(v)}" for k, v in sorted(p.groups.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"parameters: {_m(p.total)} ({groups}, ...); largest layer {_m(p.largest_layer)} "
                     f"({p.largest_layer_name}); counted on the model built on the meta device")
        lines.append(f"batch: {self.batch_size} pairs per step = {self.per_gpu_batch} per GPU"
                     + (f" = micro-batch {self.micro_batch} x {self.grad_accum} accumulation step(s)"
                        if self.fits else "; NO micro-batch fits (see memory)")
                     + f"; text {self.text_len} + image {self.image_tokens} tokens per pair")
        lines.append(f"memory per GPU at micro-batch {a.micro_batch}" + (":" if self.fits else " (does not fit):"))
        lines.append(f"  model states       {_g(self.model_states)}  ({self.model_states_source})")
        if self.zero_buffers:
            lines.append(f"  ZeRO buckets       {_g(self.zero_buffers)}  (bucket sizes of "
                         f"train/configs/zero{self.zero}.json)")
        lines.append(f"  activations        {_g(a.total)}  ({mode} checkpointing; {other_mode}: "
                     f"{_g(self.activations_other.total)})")
        lines.append(f"    per token per layer: {a.per_token_per_layer['full'] / 1024:.1f} KiB kept "
                     f"({self.execution.attention} attention, {self.execution.ffn} FFN, "
                     f"{self.execution.precision}); checkpointed: {a.per_token_per_layer['checkpointed'] / 1024:.1f} "
                     "KiB (the block input)")
        for name, value in a.per_pass.items():
            lines.append(f"    {name}: {_g(value)}")
        lines.append(f"    heads and losses (ITC, ITM, MLM log-softmax): {_g(a.heads)}")
        lines.append(f"  backward workspace {_g(a.workspace)}  (one op's gradients"
                     + (" + one block's recompute)" if self.activation_checkpointing else ")"))
        for name, value in self.buffers.items():
            if value:
                lines.append(f"  {name}: {_g(value)}")
        lines.append(f"  total              {_g(self.memory_total)} of {_g(self.usable)} usable "
                     f"({_g(g.memory_bytes)} minus {_g(self.reserved)} reserved)")
        lines.append(f"largest micro-batch that fits: {self.max_micro_batch} ({mode} checkpointing), "
                     f"{self.max_micro_batch_other} ({other_mode})")
        if self.contrastive_batch:
            how = "micro-batch x GPUs" if self.itc_accum == "standard" else "whole global batch, --itc-accum cached"
            lines.append(f"global contrastive batch: {self.contrastive_batch} ({how})")
        if self.gpus == 1:
            lines.append("collectives: none (one GPU)")
        else:
            lines.append("collectives per step per GPU (ring volumes, bytes received):")
            for name, c in self.collectives.items():
                lines.append(f"  {name}: {_g(c['bytes'])} ({c['kind']}, {c['calls']:g} per step)")
            gathered = sum(c["bytes"] for c in self.collectives.values() if c["kind"] == "all-gather")
            lines.append(f"  all-gather total: {_g(gathered)} per step")
        s, t = self.sampler, self.time
        line = (f"hard-negative sampler: 2 x [{s['rows']:.0f}, {s['columns']:.0f}] fp32 similarities per "
                f"micro-batch, {_g(s['memory_bytes'])} transient")
        if t.get("available"):
            line += f", modelled {1e3 * s['ms']:.1f} us per micro-batch ({s['share_of_step']:.2%} of the step)"
        lines.append(line)
        if t.get("available"):
            lines.append(f"time (a MODEL from benchmarks/roofline.py + stated assumptions, not a measurement): "
                         f"step {t['step_ms']:.1f} ms = compute {t['compute_ms']:.1f} + exposed communication "
                         f"{t['exposed_comm_ms']:.1f} + optimizer {t['optimizer_ms']:.2f}")
            lines.append(f"  total {t['total_hours']:.1f} h for {self.steps} steps "
                         f"({t['pairs_per_s']:.0f} pairs/s, {self.steps * self.batch_size / self.pairs:.1f} epochs "
                         f"of {self.pairs:,} pairs, {t['gpu_hours']:.0f} GPU-hours)")
            lines.append(f"  assumptions: {t['assumptions']}")
        else:
            lines.append(f"time: not modelled ({t.get('why')})")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _g(n: Optional[float]) -> str:
    if n is None:
        return "-"
    if abs(n) >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    if abs(n) >= MIB / 10:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def _positive_int(value, name: str) -> int:
    """A whole number >= 1 (an integral float such as 4e6 is accepted), or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _memory_at(config, execution, micro: int, text_len: int, world: int, checkpointing: bool,
               fixed: int) -> Tuple[int, ActivationEstimate, Dict[str, int]]:
    """(bytes per GPU, activations, step buffers) at micro-batch `micro`; `fixed`: model
    states and ZeRO buckets."""
    act = activation_bytes(config, execution, micro, text_len, world, checkpointing)
    buffers = step_buffers(config, execution, micro, text_len, world)
    sampler = buffers["hard-negative sampler (similarities, masks, fp32 features)"]
    steady = sum(v for k, v in buffers.items() if not k.startswith("hard-negative"))
    # the sampler's buffers live while the dual passes' activations do, before the fusion pass
    transient = max(act.workspace, sampler)
    return fixed + act.total + steady + transient, act, buffers


def _largest_fitting(fits, limit: int = 1 << 20) -> int:
    """Largest m >= 1 with fits(m) (memory grows with m), 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    lo = 1
    while lo < limit and fits(min(2 * lo, limit)):
        lo = min(2 * lo, limit)
    hi = min(2 * lo, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(preset: Union[str, VLMoConfig] = "base", gpus: int = 8, gpu: Union[str, GPUSpec] = "h100",
         batch_size: int = 1024, zero: int = 2, pairs: float = 4e6, steps: int = 200_000,
         activation_checkpointing: bool = False, *, text_len: Optional[int] = None,
         micro_batch: Optional[int] = None, itc_accum: str = "standard",
         gpus_per_node: Optional[int] = None, internode_gbs: Optional[float] = None,
         execution: Execution = CUDA_EXECUTION, use_deepspeed: bool = True) -> Plan:
    """Plan the VL pretraining stage of `preset` (a preset name or a VLMoConfig) on `gpus`
    GPUs of kind `gpu` with a GLOBAL batch of `batch_size` pairs, ZeRO stage `zero`, over a
    dataset of `pairs` pairs for `steps` optimizer steps.

    text_len: text tokens per pair (default the config's max_text_len: padded worst case).
    micro_batch: force a micro-batch (must divide batch_size / gpus); default the largest
    divisor that fits. itc_accum: "standard" (ITC over micro-batch x GPUs) or "cached"
    (GradCache: over the whole global batch). execution: which kernels' saved tensors are
    counted (default the CUDA path; `CPU_EXECUTION` is what the tests measure)."""
    config = preset if isinstance(preset, VLMoConfig) else None
    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} (or a VLMoConfig), got {preset!r}")
        config = VLMoConfig.preset(preset)
    spec = gpu_spec(gpu)
    gpus = _positive_int(gpus, "gpus")
    batch_size = _positive_int(batch_size, "batch_size")
    steps = _positive_int(steps, "steps")
    pairs = _positive_int(pairs, "pairs")
    if zero not in (0, 1, 2, 3) or isinstance(zero, bool):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero!r}")
    if itc_accum not in ("standard", "cached"):
        raise ValueError(f"itc_accum must be 'standard' or 'cached', got {itc_accum!r}")
    if not isinstance(execution, Execution):
        raise ValueError(f"execution must be an Execution, got {type(execution).__name__}")
    per_node = _positive_int(gpus_per_node, "gpus_per_node") if gpus_per_node is not None else spec.gpus_per_node
    if internode_gbs is not None:
        if isinstance(internode_gbs, bool) or not isinstance(internode_gbs, (int, float)) \
                or not math.isfinite(internode_gbs) or internode_gbs <= 0:
            raise ValueError(f"internode_gbs must be a positive number (GB/s per GPU), got {internode_gbs!r}")
        spec = dataclasses.replace(spec, internode_gbs=float(internode_gbs))
    if gpus > per_node and gpus % per_node:
        raise ValueError(f"gpus ({gpus}) must be a multiple of gpus_per_node ({per_node}) when it spans "
                         "several nodes")
    per_node = min(per_node, gpus)
    nodes = gpus // per_node
    if batch_size % gpus:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by gpus ({gpus}): it is the global "
                         "batch, split evenly over the GPUs")
    per_gpu = batch_size // gpus
    text_len = config.max_text_len if text_len is None else _positive_int(text_len, "text_len")
    if text_len > config.max_text_len:
        raise ValueError(f"text_len ({text_len}) exceeds the model's max_text_len ({config.max_text_len})")
    if micro_batch is not None:
        micro_batch = _positive_int(micro_batch, "micro_batch")
        if per_gpu % micro_batch:
            raise ValueError(f"micro_batch ({micro_batch}) must divide the per-GPU batch "
                             f"({batch_size} / {gpus} = {per_gpu})")

    params = count_parameters(config)
    states, source = model_state_bytes(params.total, params.largest_layer, zero, per_node, nodes,
                                       use_deepspeed=use_deepspeed)
    el = execution.element_size
    zero_buffers = {0: 0, 1: ZERO_BUCKET_ELEMENTS * el, 2: 3 * ZERO_BUCKET_ELEMENTS * el,
                    3: 2 * ZERO_BUCKET_ELEMENTS * el}[zero] if gpus > 1 else 0
    reserved = RESERVED_FIXED_BYTES + int(RESERVED_FRACTION * spec.memory_bytes)
    usable = spec.memory_bytes - reserved
    fixed = states + zero_buffers

    def fits_with(checkpointing: bool):
        return lambda m: _memory_at(config, execution, m, text_len, gpus, checkpointing, fixed)[0] <= usable

    max_micro = _largest_fitting(fits_with(activation_checkpointing))
    max_other = _largest_fitting(fits_with(not activation_checkpointing))
    if micro_batch is None:
        candidates = [m for m in range(min(per_gpu, max_micro), 0, -1) if per_gpu % m == 0]
        micro = candidates[0] if candidates else None
    else:
        micro = micro_batch if micro_batch <= max_micro else None
    shown = micro if micro is not None else (micro_batch or 1)
    total, act, buffers = _memory_at(config, execution, shown, text_len, gpus, activation_checkpointing, fixed)
    other = activation_bytes(config, execution, shown, text_len, gpus, not activation_checkpointing)
    notes = []
    if micro is None:
        notes.append(f"micro-batch {shown} needs {_g(total)} per GPU, more than the {_g(usable)} usable: "
                     + ("use --activation-checkpointing, " if not activation_checkpointing else "")
                     + ("a higher ZeRO stage, " if zero < 3 else "") + "more GPUs or a larger GPU")
    elif micro_batch is None and micro < min(per_gpu, max_micro):
        notes.append(f"micro-batch {micro} is the largest divisor of the per-GPU batch {per_gpu} that fits")
    accum = per_gpu // micro if micro else None
    contrastive = (micro * gpus if itc_accum == "standard" else batch_size) if micro else None
    plan_ = Plan(preset=config.name, gpu=spec, gpus=gpus, nodes=nodes, gpus_per_node=per_node, zero=zero,
                 batch_size=batch_size, per_gpu_batch=per_gpu, micro_batch=micro, grad_accum=accum,
                 text_len=text_len, image_tokens=config.num_image_tokens, pairs=pairs, steps=steps,
                 activation_checkpointing=activation_checkpointing, itc_accum=itc_accum,
                 execution=execution, parameters=params, model_states=states, model_states_source=source,
                 zero_buffers=zero_buffers, reserved=reserved, usable=usable, activations=act,
                 activations_other=other, buffers=buffers, memory_total=total, max_micro_batch=max_micro,
                 max_micro_batch_other=max_other, contrastive_batch=contrastive, collectives={},
                 sampler={}, time={}, notes=notes)
    _plan_communication_and_time(plan_, config, shown, accum or 1)
    return plan_


# ----------------------------------------------------------------------------- communication and time

def _ring(kind: str, total_bytes: float, world: int) -> float:
    """Bytes one GPU receives in a ring collective over `world` ranks of `total_bytes` (the
    gathered / reduced tensor's full size)."""
    if world == 1:
        return 0.0
    share = (world - 1) / world * total_bytes
    return 2 * share if kind == "all-reduce" else share


def step_collectives(config: VLMoConfig, execution: Execution, params: int, micro: int, accum: int,
                     text_len: int, world: int, zero: int, checkpointing: bool,
                     itc_accum: str = "standard") -> Dict[str, Dict[str, float]]:
    """Collectives of one optimizer step, per GPU: {name: {kind, calls, bytes, role}} (bytes
    summed over the step's calls; role "step": on the step's critical path, "gradients" /
    "weights": ZeRO's, which may overlap the compute)."""
    el = execution.element_size
    n = micro * world
    image_bytes = config.in_chans * config.img_size ** 2 * 4
    losses = 2 if (config.itc_vl_head and config.vl_layers > 0) else 1
    d = config.dim
    out: Dict[str, Dict[str, float]] = {}

    def add(name, kind, calls, total, role="step"):
        out[name] = {"kind": kind, "calls": float(calls), "bytes": calls * _ring(kind, total, world),
                     "role": role}

    add("raw inputs for ITM negatives (images fp32, ids, masks)", "all-gather", accum,
        n * (image_bytes + text_len * 16 + 8))
    contrastive_n = n if itc_accum == "standard" else micro * accum * world
    calls = accum if itc_accum == "standard" else 1
    add("ITC text features (Triton contrastive loss)", "all-gather", calls * losses, contrastive_n * d * el)
    add("ITC column log-sum-exp", "all-reduce", calls * losses, contrastive_n * 4)
    add("ITC text-feature gradients (fp32)", "reduce-scatter", calls * losses, contrastive_n * d * 4)
    add("features for hard negatives (image + text)", "all-gather", accum, 2 * n * d * el)
    p2 = 2 * params   # bf16 weights / gradients
    if zero == 0:
        add("gradients (bf16)", "all-reduce", 1, p2, "gradients")
    elif zero == 1:
        add("gradients (bf16)", "reduce-scatter", 1, p2, "gradients")
        add("updated weights (bf16)", "all-gather", 1, p2, "weights")
    elif zero == 2:
        add("gradients (bf16, every micro-batch)", "reduce-scatter", accum, p2, "gradients")
        add("updated weights (bf16)", "all-gather", 1, p2, "weights")
    else:
        add("weights (bf16, forward + backward" + (" + recompute" if checkpointing else "") + ")",
            "all-gather", accum * (3 if checkpointing else 2), p2, "weights")
        add("gradients (bf16, every micro-batch)", "reduce-scatter", accum, p2, "gradients")
    return out


def _plan_communication_and_time(pl: Plan, config: VLMoConfig, micro: int, accum: int) -> None:
    world = pl.gpus
    pl.collectives = step_collectives(config, pl.execution, pl.parameters.total, micro, accum, pl.text_len,
                                      world, pl.zero, pl.activation_checkpointing, pl.itc_accum)
    roofline, why = load_roofline()
    n = micro * world
    sampler_memory = pl.buffers["hard-negative sampler (similarities, masks, fp32 features)"]
    if roofline is None:
        pl.time = {"available": False, "why": why}
        pl.sampler = {"rows": float(micro), "columns": float(n), "memory_bytes": float(sampler_memory),
                      "ms": float("nan"), "share_of_step": float("nan")}
        return
    base = roofline.PARTS[pl.gpu.roofline_part]
    # the part's SMs, clocks and efficiencies, this GPU's peak and HBM bandwidth (the model's
    # efficiency tables are keyed by the part's name, which is kept)
    part = dataclasses.replace(base, dram_tbps=pl.gpu.hbm_tbps,
                               tc_tflops=dict(base.tc_tflops, bf16=pl.gpu.bf16_tflops))
    model = _StepTimeModel(roofline, part, config, pl, micro)
    per_micro = model.micro_batch_ms()
    sampler_ms = model.sampler_ms()
    compute = accum * (per_micro["total"] + sampler_ms)
    if pl.itc_accum == "cached":
        compute += accum * model.features_only_ms() + model.contrastive_ms(micro * accum)
    # communication
    link = pl.gpu.nvlink_gbs if pl.nodes == 1 else pl.gpu.internode_gbs
    bw = link * 1e9 * COLLECTIVE_EFFICIENCY

    def ms(role):
        return sum(1e3 * c["bytes"] / bw for c in pl.collectives.values() if c["role"] == role)

    blocking, grads, weights = ms("step"), ms("gradients"), ms("weights")
    backward = accum * per_micro["backward"]
    if pl.zero == 3:   # prefetched weight gathers and reductions overlap the compute
        exposed = blocking + max(0.0, grads + weights - compute)
    elif pl.zero == 2:  # reduce-scatter overlapped with backward; the weight all-gather is not
        exposed = blocking + max(0.0, grads - backward) + weights
    else:               # reduction at the accumulation boundary, after the last backward
        exposed = blocking + grads + weights
    # AdamW over this GPU's fp32 partition: read grad (4), master/m/v read+write (24), write bf16 (2)
    shard = pl.parameters.total / (world if pl.zero >= 1 else 1)
    optimizer = 1e3 * shard * 30 / (part.dram_tbps * 1e12 * roofline.BW_EFFICIENCY)
    step = compute + exposed + optimizer
    total_s = step * pl.steps / 1e3
    pl.sampler = {"rows": float(micro), "columns": float(n), "memory_bytes": float(sampler_memory),
                  "ms": sampler_ms, "share_of_step": accum * sampler_ms / step}
    pl.time = {
        "available": True, "model": "benchmarks/roofline.py + plan.py assumptions (not measured)",
        "roofline_part": part.name, "step_ms": step, "compute_ms": compute, "exposed_comm_ms": exposed,
        "comm_ms_total": blocking + grads + weights, "optimizer_ms": optimizer,
        "per_micro_batch_ms": per_micro, "sampler_ms": sampler_ms,
        "link_gbs": link, "total_hours": total_s / 3600, "gpu_hours": total_s / 3600 * world,
        "pairs_per_s": pl.batch_size / (step / 1e3),
        "assumptions": (f"GEMMs at {roofline.TC_EFFICIENCY[part.name[:4]]:.0%} of the bf16 peak "
                        f"(roofline TC_EFFICIENCY), attention cores at {ATTENTION_EFFICIENCY:.0%} "
                        f"(backward {ATTENTION_BACKWARD_FACTOR}x forward), elementwise traffic at "
                        f"{roofline.BW_EFFICIENCY:.0%} of HBM, collectives at {COLLECTIVE_EFFICIENCY:.0%} of "
                        f"{link:g} GB/s per GPU ({'NVLink' if pl.nodes == 1 else 'network'}), "
                        "ZeRO reductions overlapped with backward, data loading hidden"),
    }


class _StepTimeModel:
    """Modelled milliseconds of one VL micro-batch on one GPU (CUDA kernels, packed layout)."""

    def __init__(self, roofline, part, config: VLMoConfig, pl: Plan, micro: int):
        self.r, self.part, self.c, self.pl, self.b = roofline, part, config, pl, micro
        self.peak = part.tc_tflops["bf16"] * 1e12
        self.tc_eff = roofline.TC_EFFICIENCY[part.name[:4]]
        self.bw = part.dram_tbps * 1e12 * roofline.BW_EFFICIENCY
        self.recompute = pl.activation_checkpointing
        self._ffn_cache: Dict[Tuple[int, int, int], Tuple[float, float]] = {}

    def _ffn_ms(self, counts: Tuple[int, int, int]) -> Tuple[float, float]:
        """(forward ms, backward ms) of the Triton MoME FFN for tokens per expert, with the dW
        row split the autotuner would pick (roofline.mome_autotuned's rule)."""
        if counts not in self._ffn_cache:
            r, t = self.r, sum(counts)
            splits = (1,) + tuple(r.WGRAD_SPLITS) if t > 2 * r.WGRAD_MIN_CHUNK else (1,)
            best = None
            for split in splits:
                fwd, bwd = r.mome_kernels(list(counts), self.c.dim, self.c.mlp_hidden_dim, "bf16",
                                          recompute=self.pl.execution.ffn == "triton-recompute",
                                          with_gamma=self.c.layer_scale_init is not None,
                                          wgrad_split=split, wgrad_min_rows=r.WGRAD_MIN_CHUNK)
                f = sum(k.modelled_ms(self.part) for k in fwd)
                b = sum(k.modelled_ms(self.part) for k in bwd)
                if best is None or f + b < sum(best):
                    best = (f, b)
            self._ffn_cache[counts] = best
        return self._ffn_cache[counts]

    def _gemm_ms(self, flops: float) -> float:
        return 1e3 * flops / (self.peak * self.tc_eff)

    def _block_ms(self, p: Pass, layer: int) -> Tuple[float, float]:
        """(forward, backward) ms of one block of pass p."""
        c, t = self.c, p.tokens
        counts = p.experts_vl if layer >= c.vl_start else p.experts_below
        ffn_f, ffn_b = self._ffn_ms(tuple(counts))
        linear = 8.0 * t * c.dim * c.dim                   # qkv (6 T d^2) + proj (2 T d^2)
        attention = 4.0 * c.dim * p.score_pairs             # QK^T + PV
        attn_f = 1e3 * attention / (self.peak * ATTENTION_EFFICIENCY)
        # elementwise traffic of the attention half (norm1, bias, residual, layer scale):
        # what it keeps is written in forward and read (and its gradient written) in backward
        attn_bytes = sum(attention_saved_bytes(c, self.pl.execution, tokens=t, sequences=p.sequences,
                                               score_pairs=p.score_pairs, masked=p.masked,
                                               drop_path=True).values())
        mem_f = 1e3 * attn_bytes / self.bw
        fwd = self._gemm_ms(linear) + attn_f + mem_f + ffn_f
        bwd = self._gemm_ms(2 * linear) + ATTENTION_BACKWARD_FACTOR * attn_f + 2 * mem_f + ffn_b
        if self.recompute:
            bwd += fwd
        return fwd, bwd

    def passes(self) -> List[Pass]:
        return vl_step_passes(self.c, self.b, self.pl.text_len, "packed")

    def micro_batch_ms(self) -> Dict[str, float]:
        c, b = self.c, self.b
        fwd = bwd = 0.0
        for p in self.passes():
            for layer in range(p.start, p.end):
                f, bb = self._block_ms(p, layer)
                fwd, bwd = fwd + f, bwd + bb
        # embeddings and heads (GEMMs): patch embedding of 5b images, pooler over 4b, ITC
        # projections, MLM head at its rows; each 1x forward + 2x backward
        k = mlm_rows(c, self.pl.execution, b, self.pl.text_len)
        heads = (2.0 * 5 * b * c.num_patches * c.in_chans * c.patch_size ** 2 * c.dim
                 + 2.0 * 4 * b * c.dim * c.dim + 2.0 * 4 * b * c.dim * c.dim
                 + 2.0 * k * (c.dim * c.dim + c.dim * c.vocab_size))
        fwd += self._gemm_ms(heads)
        bwd += self._gemm_ms(2 * heads)
        contrastive = self.contrastive_ms(b) if self.pl.itc_accum == "standard" else 0.0
        return {"forward": fwd, "backward": bwd, "contrastive": contrastive, "total": fwd + bwd + contrastive}

    def contrastive_ms(self, rows: int) -> float:
        losses = 2 if (self.c.itc_vl_head and self.c.vl_layers > 0) else 1
        case = self.r.contrastive_case(rows, self.c.dim, "bf16", world=self.pl.gpus)
        return losses * case.modelled_ms(self.part, "fwd+bwd")

    def features_only_ms(self) -> float:
        """--itc-accum cached: the no-grad feature pass (dual encoder + itc_vl re-run)."""
        total = 0.0
        for p in self.passes()[:-1]:
            for layer in range(p.start, p.end):
                total += self._block_ms(p, layer)[0]
        return total

    def sampler_ms(self) -> float:
        """Both directions of the CUDA sampler over [b, N] fp32 logits, plus the fp32
        similarity GEMMs (2 x 2 b N D FLOPs on the non-tensor fp32 units)."""
        n = self.b * self.pl.gpus
        case = self.r.sampler_case(self.b, n)
        gemm = 1e3 * 2 * 2.0 * self.b * n * self.c.dim / (self.part.fp32_tflops * 1e12)
        return 2 * case.modelled_ms(self.part, "sample") + gemm


# ----------------------------------------------------------------------------- command line

def _positive_count(text: str) -> int:
    """argparse type for counts written as 4e6 or 4000000."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number (e.g. 4e6), got {text!r}") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number (e.g. 4e6), got {text!r}")
    return int(value)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--preset", default="base", choices=sorted(PRESETS), help="model preset (default base)")
    a("--gpus", type=_positive_count, required=True, help="number of GPUs")
    a("--gpu", default="h100", choices=sorted(GPUS) + sorted(GPU_ALIASES), help="GPU model (default h100)")
    a("--batch-size", type=_positive_count, required=True,
      help="GLOBAL batch: image-text pairs per optimizer step over all GPUs")
    a("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (default 2)")
    a("--pairs", type=_positive_count, required=True, help="image-text pairs in the dataset (e.g. 4e6)")
    a("--steps", type=_positive_count, required=True, help="optimizer steps of the VL stage")
    a("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    a("--text-len", type=_positive_count, default=None, help="text tokens per pair (default max_text_len)")
    a("--micro-batch", type=_positive_count, default=None,
      help="force a micro-batch per GPU (default: the largest divisor of the per-GPU batch that fits)")
    a("--itc-accum", default="standard", choices=("standard", "cached"),
      help="contrastive batch: micro-batch x GPUs (standard) or the whole global batch (cached)")
    a("--gpus-per-node", type=_positive_count, default=None, help="default 8")
    a("--internode-gbs", type=float, default=None,
      help="network bandwidth per GPU in GB/s, one direction (default 25 on A100, 50 on H100/H200)")
    a("--json", action="store_true", help="print the plan as JSON")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on a `vlmo-fast` subparsers object; the parsed args run with `main`."""
    p = subparsers.add_parser("plan", help="capacity plan of VL pretraining on N GPUs (memory, batch, time)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=main)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmo_fast.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def main(args: Union[argparse.Namespace, Sequence[str], None] = None) -> int:
    """Run the planner on parsed arguments (from `add_parser`) or an argv list; prints the
    summary (or JSON with --json) and returns 0. Bad input raises ValueError naming the flag;
    entry points turn it into one `error:` line and exit status 2 (`vlmo_fast.errors`)."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(args)
    # library chatter (deepspeed's accelerator warning) must not mix with the plan / JSON
    with contextlib.redirect_stdout(sys.stderr):
        result = plan(args.preset, args.gpus, args.gpu, args.batch_size, args.zero, args.pairs, args.steps,
                      args.activation_checkpointing, text_len=args.text_len, micro_batch=args.micro_batch,
                      itc_accum=args.itc_accum, gpus_per_node=args.gpus_per_node,
                      internode_gbs=args.internode_gbs)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result.summary())
    return 0


if __name__ == "__main__":
    from .errors import run_or_exit
    sys.exit(run_or_exit(main))
