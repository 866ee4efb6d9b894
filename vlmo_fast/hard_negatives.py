"""Hard negatives for image-text matching (ITM), drawn from the ITC similarity logits.

For each row r of `logits` [B, N] draw one column j != positive_index[r], not excluded by
`exclude_mask[r]`, with probability

    P(j) = exp(logits[r, j]) / sum over allowed k of exp(logits[r, k])

i.e. softmax(row) with the positive (and the excluded columns) removed and renormalised. This
is the distribution of VLMo's `torch.multinomial(softmax(row) with the positive zeroed)`.
VLMo draws one row at a time with `.item()` (2B host syncs per step); here all rows are drawn by
one kernel call with no host sync and no B x N weight matrix.

Backends (op "hard_negatives" in vlmo_fast.backends; `backends.last_used()` tells which ran):
- "ext": the compiled op torch.ops.vlmo_fast.hard_negatives (csrc/). CPU: inverse CDF, one
  random number per row, rows in parallel, one vectorised pass over each row's memory (online
  max/sum rescaling, ATen Vectorized exp; `vlmo_fast._C.cpu_vector_path()` says whether the
  AVX2 build runs). CUDA: Gumbel-max, one read of each logit. Random
  numbers come from a counter-based hash of (seed, direction, global row, column), so results
  are reproducible from a seed or generator and independent of the thread count; CPU and CUDA
  draw from the same distribution but not the same samples.
- "torch": plain torch (masked softmax + torch.multinomial): the reference, always available.
Plug-ins: `backends.register("hard_negatives", name, fn, available=, preference=)` with the
backends' signature fn(requests, generator, seed, row_offset) -> [int64 [B] per request]:
`requests` are `SampleRequest`s (logits [B, N], positive [B] int64, exclude_mask or None,
stream), one per direction, drawn with ONE source of randomness (at most one of generator /
seed is not None); rows are keyed by row_offset + r. A row that cannot be sampled gets its
code from HARD_NEGATIVE_CODES (`hard_negative_row_codes` computes them); the caller checks.

Rows that cannot be sampled (every candidate excluded or at -inf; NaN or +inf logits; positive
index outside [0, N)) raise ValueError on the CPU. On CUDA the check is an asynchronous device
assertion (no host sync); `check="sync"` raises the detailed ValueError instead (one sync) and
`check=False` returns the raw codes (negative values, see HARD_NEGATIVE_CODES).
"""
from __future__ import annotations

import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _ext, backends
from .distributed import world_and_rank
from .env import INTEGER_DTYPES

OP = "hard_negatives"

# Negative outputs of the kernels (csrc/hard_negatives.h) and what they mean.
HARD_NEGATIVE_CODES = {
    -1: "no allowed candidate (every column is the positive, excluded by exclude_mask or -inf)",
    -2: "NaN or +inf in the logits",
    -3: "positive_index out of range",
}

# Direction tags for the counter-based generator: the two directions drawn with one seed must
# not reuse each other's random numbers.
STREAM_IMAGE_TO_TEXT = 0
STREAM_TEXT_TO_IMAGE = 1

_SEED_HIGH = 2**63 - 1

CheckMode = Union[bool, str]


def _ext_unavailable(device: torch.device) -> Optional[str]:
    return _ext.unavailable_reason(device, OP)


# --------------------------------------------------------------------------- argument checks

def _check_inputs(logits: Tensor, positive_index: Tensor, exclude_mask: Optional[Tensor],
                  name: str = "logits") -> Tensor:
    """Shape/dtype/device checks (no data access); returns positive_index as int64."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, candidates], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    rows, cols = logits.shape
    if not isinstance(positive_index, Tensor):
        raise TypeError(f"positive_index must be a torch.Tensor, got {type(positive_index).__name__}")
    if positive_index.dtype not in INTEGER_DTYPES:
        raise TypeError(f"positive_index must be an integer tensor, got dtype {positive_index.dtype}")
    if tuple(positive_index.shape) != (rows,):
        raise ValueError(f"positive_index must have shape ({rows},) (one index per row of {name} "
                         f"{tuple(logits.shape)}), got {tuple(positive_index.shape)}")
    if positive_index.device != logits.device:
        raise ValueError(f"positive_index is on {positive_index.device} but {name} is on "
                         f"{logits.device}")
    if exclude_mask is not None:
        if not isinstance(exclude_mask, Tensor) or exclude_mask.dtype != torch.bool:
            raise TypeError("exclude_mask must be a bool tensor, got "
                            + (str(exclude_mask.dtype) if isinstance(exclude_mask, Tensor)
                               else type(exclude_mask).__name__))
        if exclude_mask.shape != logits.shape:
            raise ValueError(f"exclude_mask must have the shape of {name} {tuple(logits.shape)}, "
                             f"got {tuple(exclude_mask.shape)}")
        if exclude_mask.device != logits.device:
            raise ValueError(f"exclude_mask is on {exclude_mask.device} but {name} is on "
                             f"{logits.device}")
    return positive_index.long()


def _as_index(value, name: str, *, optional: bool = False) -> Optional[int]:
    """A Python int from any integral scalar (int, numpy integer, 0-d integer tensor); bools,
    floats (1.7 is not silently truncated) and other types raise a TypeError naming `name`."""
    if value is None and optional:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype in INTEGER_DTYPES:
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{name} must be an integer (int or numpy/torch integer scalar), got "
                    f"{value!r} of type {type(value).__name__}")


def _check_mode(check: CheckMode) -> CheckMode:
    if check not in (True, False, "sync"):
        raise ValueError(f"check must be True, False or 'sync', got {check!r}")
    return check


def hard_negative_row_codes(logits: Tensor, positive_index: Tensor,
                            exclude_mask: Optional[Tensor] = None) -> Tensor:
    """Per row: 0 when the row can be sampled, else its code in HARD_NEGATIVE_CODES (plain torch,
    the same precedence as the kernels). Used by the "torch" backend and to explain failures."""
    positive = _check_inputs(logits, positive_index, exclude_mask)
    rows, cols = logits.shape
    positive_bad = (positive < 0) | (positive >= cols)
    nonfinite = (~(logits < float("inf"))).any(dim=1)  # NaN compares false: caught too
    allowed = logits > float("-inf")
    if exclude_mask is not None:
        allowed &= ~exclude_mask
    if cols > 0:
        allowed.scatter_(1, positive.clamp(0, cols - 1).unsqueeze(1), False)
    no_candidate = ~allowed.any(dim=1)
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    codes = torch.where(no_candidate, torch.full_like(zero, -1), zero)
    codes = torch.where(nonfinite, torch.full_like(zero, -2), codes)
    return torch.where(positive_bad, torch.full_like(zero, -3), codes)


def _raise_for_codes(samples: Tensor, logits: Tensor, positive: Tensor, name: str) -> None:
    """Host-side: raise a ValueError naming the first bad row and what is wrong with it."""
    bad = (samples < 0).nonzero().flatten()
    if bad.numel() == 0:
        return
    first = int(bad[0])
    code = int(samples[first])
    rows, cols = logits.shape
    detail = HARD_NEGATIVE_CODES.get(code, f"unknown code {code}")
    if code == -3:
        detail = (f"positive_index[{first}] = {int(positive[first])} is outside [0, {cols}) "
                  f"(the columns of {name})")
    elif code == -2:
        row = logits[first]
        kinds = [k for k, m in (("NaN", torch.isnan(row)), ("+inf", row == float("inf")))
                 if bool(m.any())]
        found = " and ".join(kinds) or "a value that is not finite in the kernel's precision"
        detail = f"{name}[{first}] contains {found}; logits must be finite or -inf"
    elif code == -1:
        detail = (f"{name}[{first}] has no allowed candidate: every column other than the "
                  f"positive ({int(positive[first])}) is excluded by exclude_mask or -inf")
    raise ValueError(f"sample_hard_negatives: {bad.numel()} of {rows} rows cannot be sampled; "
                     f"first: {detail}")


def _apply_check(samples: Tensor, logits: Tensor, positive: Tensor, check: CheckMode,
                 name: str) -> None:
    if check is False or samples.numel() == 0:
        return
    if samples.device.type == "cpu" or check == "sync":
        _raise_for_codes(samples, logits, positive, name)
    else:
        # No host sync: a failing row stops the stream with this message (a device assertion).
        torch._assert_async(samples.min() >= 0,
                            "sample_hard_negatives: some rows cannot be sampled (positive out of "
                            "range, NaN/+inf logits, or no allowed candidate); rerun with "
                            "check='sync' for details")


# --------------------------------------------------------------------------- randomness

def _seed_tensor(device: torch.device, generator: Optional[torch.Generator],
                 seed: Optional[int]) -> Tensor:
    """The one-element int64 seed for the ext kernels, drawn without a host sync: an explicit
    seed or a CPU generator gives a CPU tensor; a device generator (or the default generator of
    `device`) gives a device tensor that the CUDA kernel reads itself."""
    if seed is not None:
        # Any Python int: fold it into int64 so the kernel sees its 64 low bits.
        folded = int(seed) & (2**64 - 1)
        return torch.tensor([folded - 2**64 if folded >= 2**63 else folded], dtype=torch.int64)
    if generator is not None:
        gen_device = torch.device(generator.device)
        if gen_device.type != "cpu" and gen_device.type != device.type:
            raise ValueError(f"generator is on {gen_device} but logits is on {device}; pass a CPU "
                             f"generator or one on {device.type}")
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=gen_device,
                             generator=generator)
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)


def _torch_generator(device: torch.device, generator: Optional[torch.Generator],
                     seed: Optional[int]) -> Optional[torch.Generator]:
    """The generator for the "torch" backend (torch.multinomial needs one on `device`)."""
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) & (2**64 - 1))
        return gen
    if generator is not None and torch.device(generator.device).type != device.type:
        # multinomial insists on a generator of its own device: derive one from a single draw.
        gen = torch.Generator(device=device)
        gen.manual_seed(int(torch.randint(0, _SEED_HIGH, (1,), generator=generator,
                                          device=generator.device)))
        return gen
    return generator


# --------------------------------------------------------------------------- implementations

def _sample_ext(logits: Tensor, positive: Tensor, exclude_mask: Optional[Tensor], seed: Tensor,
                row_offset: int, stream: int) -> Tensor:
    _ext.load()
    # Sampling is not differentiable; detaching keeps autograd out of the op call.
    return torch.ops.vlmo_fast.hard_negatives(logits.detach(), positive, exclude_mask, seed,
                                              int(row_offset), int(stream))


def _sample_torch(logits: Tensor, positive: Tensor, exclude_mask: Optional[Tensor],
                  generator: Optional[torch.Generator]) -> Tensor:
    """Masked softmax + torch.multinomial: the reference the kernels are tested against.
    Returns the same codes as the kernels for rows that cannot be sampled."""
    rows, cols = logits.shape
    codes = hard_negative_row_codes(logits, positive, exclude_mask)
    if rows == 0:
        return codes
    bad = codes < 0
    # fp64 stays fp64 (a large common offset keeps its differences, values beyond the float
    # range stay finite, as in the ext kernel); everything else is computed in fp32.
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    masked = logits.to(work_dtype).masked_fill(bad.unsqueeze(1), 0.0)  # keep bad rows drawable
    allowed = torch.ones_like(masked, dtype=torch.bool)
    if exclude_mask is not None:
        allowed &= ~exclude_mask
    if cols > 0:
        allowed.scatter_(1, positive.clamp(0, cols - 1).unsqueeze(1), False)
    allowed |= bad.unsqueeze(1)
    masked = masked.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(masked, dim=1)
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(bad, codes, drawn)


class SampleRequest(NamedTuple):
    """One direction of a draw: one hard negative column per row of `logits`."""
    logits: Tensor                   # [B, N], any float dtype and strides
    positive: Tensor                 # [B] int64, never drawn
    exclude_mask: Optional[Tensor]   # bool [B, N] or None
    stream: int                      # counter stream (STREAM_IMAGE_TO_TEXT / _TEXT_TO_IMAGE)


def _ext_backend(requests: Sequence[SampleRequest], generator: Optional[torch.Generator],
                 seed: Optional[int], row_offset: int) -> List[Tensor]:
    # one seed for every request: the streams keep the directions independent
    seed_t = _seed_tensor(requests[0].logits.device, generator, seed)
    return [_sample_ext(r.logits, r.positive, r.exclude_mask, seed_t, row_offset, r.stream)
            for r in requests]


def _torch_backend(requests: Sequence[SampleRequest], generator: Optional[torch.Generator],
                   seed: Optional[int], row_offset: int) -> List[Tensor]:
    gen = _torch_generator(requests[0].logits.device, generator, seed)
    return [_sample_torch(r.logits, r.positive, r.exclude_mask, gen) for r in requests]


backends.register(OP, "ext", _ext_backend, available=_ext_unavailable,
                  preference={"cpu": ["ext", "torch"], "cuda": ["ext", "torch"],
                              "default": ["ext", "torch"]})
backends.register(OP, "torch", _torch_backend)


def _draw(requests: Sequence[SampleRequest], backend: Optional[str],
          generator: Optional[torch.Generator], seed: Optional[int], row_offset: int) -> List[Tensor]:
    """Resolve the backend and run it on every request with one source of randomness."""
    name = backends.resolve(OP, backend, requests[0].logits.device)
    out = backends.implementation(OP, name)(requests, generator, seed, row_offset)
    if not isinstance(out, (list, tuple)) or len(out) != len(requests) or any(
            not isinstance(t, Tensor) or t.dtype != torch.int64
            or tuple(t.shape) != (r.logits.shape[0],) for t, r in zip(out, requests)):
        raise TypeError(f"hard_negatives backend {name!r} must return one int64 tensor [rows] "
                        f"per request ({len(requests)}), got {type(out).__name__}")
    return list(out)


# --------------------------------------------------------------------------- public API

def sample_hard_negatives(logits: Tensor, positive_index: Tensor, *,
                          exclude_mask: Optional[Tensor] = None,
                          generator: Optional[torch.Generator] = None,
                          seed: Optional[int] = None, row_offset: int = 0,
                          stream: int = STREAM_IMAGE_TO_TEXT, backend: Optional[str] = None,
                          check: CheckMode = True) -> Tensor:
    """One hard negative column per row of `logits` [B, N] (int64 [B], on logits' device).

    positive_index: [B] integer, the positive column of each row (never drawn).
    exclude_mask: optional bool [B, N]; True removes a candidate (e.g. other captions of the
        same image). -inf logits are never drawn either.
    generator / seed: the randomness (at most one of them); neither uses the default generator
        of logits' device. A CPU generator or a seed costs no host sync on CUDA.
    row_offset, stream: ext backend only: rows are keyed by row_offset + r and `stream`, so
        ranks sharing a seed (offset = rank * B) and the two directions (stream 0 / 1) draw
        independent numbers. The "torch" backend ignores them.
    backend: "ext", "torch" or None/"auto" (see vlmo_fast.backends; env
        VLMO_FAST_HARD_NEGATIVES_BACKEND).
    check: True (raise on CPU, asynchronous device assertion on CUDA), "sync" (raise with
        details everywhere; one host sync on CUDA) or False (return negative codes).

    logits may be any float dtype and any strides (a transposed view is read in place). fp16,
    bf16 and fp32 are computed in fp32; fp64 rows are computed in fp64 up to the exponentials
    (differences to the row max are taken in fp64 before rounding), so a large common offset
    (1e10 + [0, 5, 0]) keeps its differences and values beyond the float range are ordinary
    finite values, on both CPU backends.
    """
    check = _check_mode(check)
    positive = _check_inputs(logits, positive_index, exclude_mask)
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    seed = _as_index(seed, "seed", optional=True)
    row_offset = _as_index(row_offset, "row_offset")
    stream = _as_index(stream, "stream")
    if row_offset < 0:
        raise ValueError(f"row_offset must be a non-negative int, got {row_offset!r}")
    samples, = _draw([SampleRequest(logits, positive, exclude_mask, stream)], backend,
                     generator, seed, row_offset)
    _apply_check(samples, logits, positive, check, "logits")
    return samples


def sample_global_hard_negatives(sim_i2t: Tensor, sim_t2i: Optional[Tensor] = None, *,
                                 rank: Optional[int] = None,
                                 exclude_i2t: Optional[Tensor] = None,
                                 exclude_t2i: Optional[Tensor] = None,
                                 generator: Optional[torch.Generator] = None,
                                 seed: Optional[int] = None, backend: Optional[str] = None,
                                 check: CheckMode = True) -> Tuple[Tensor, Tensor]:
    """VLMo's ITM negatives for the local batch against the all-gathered global batch.

    sim_i2t: [B, N] logits of the B local images against the N = world_size * B gathered
        texts; sim_t2i: [B, N] local texts against gathered images. The positive of local row i
        is global column rank * B + i. With sim_t2i=None the batch must be the whole batch
        (B == N, one process) and the text->image direction reads the columns of sim_i2t in
        place (a transposed view, no copy); exclude_t2i then defaults to exclude_i2t.T.
    rank: this process's rank (default: torch.distributed's, else 0).

    Returns (negative text per local image, negative image per local text), both as global
    indices into the gathered batch (int64 [B]). One seed is drawn for both directions; they use
    separate counter streams and rows are keyed by their global index, so ranks sharing a seed
    still draw independently.
    """
    if not isinstance(sim_i2t, Tensor) or sim_i2t.dim() != 2:
        raise ValueError("sim_i2t must be a 2-D tensor [local batch, global batch], got "
                         + (str(tuple(sim_i2t.shape)) if isinstance(sim_i2t, Tensor)
                            else type(sim_i2t).__name__))
    local, total = sim_i2t.shape
    if rank is None:
        _, rank = world_and_rank()
    rank = _as_index(rank, "rank")
    seed = _as_index(seed, "seed", optional=True)
    if sim_t2i is None:
        if local != total:
            raise ValueError(f"sim_t2i is required unless sim_i2t is square (the whole batch on "
                             f"one process); sim_i2t has shape {tuple(sim_i2t.shape)}")
        sim_t2i = sim_i2t.t()
        if exclude_t2i is None and exclude_i2t is not None:
            exclude_t2i = exclude_i2t.t()
    elif not isinstance(sim_t2i, Tensor) or sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_t2i must have the shape of sim_i2t {tuple(sim_i2t.shape)}, got "
                         + (str(tuple(sim_t2i.shape)) if isinstance(sim_t2i, Tensor)
                            else type(sim_t2i).__name__))
    if sim_t2i.device != sim_i2t.device:
        raise ValueError(f"sim_t2i is on {sim_t2i.device} but sim_i2t is on {sim_i2t.device}")
    if rank < 0 or (rank + 1) * local > total:
        raise ValueError(f"rank must satisfy 0 <= rank and (rank + 1) * B <= N for local batch "
                         f"B = {local} and global batch N = {total}, got rank={rank!r}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    check = _check_mode(check)
    device = sim_i2t.device
    positive = torch.arange(local, device=device, dtype=torch.int64) + rank * local
    _check_inputs(sim_i2t, positive, exclude_i2t, "sim_i2t")
    _check_inputs(sim_t2i, positive, exclude_t2i, "sim_t2i")
    text_for_image, image_for_text = _draw(
        [SampleRequest(sim_i2t, positive, exclude_i2t, STREAM_IMAGE_TO_TEXT),
         SampleRequest(sim_t2i, positive, exclude_t2i, STREAM_TEXT_TO_IMAGE)],
        backend, generator, seed, rank * local)
    _apply_check(text_for_image, sim_i2t, positive, check, "sim_i2t")
    _apply_check(image_for_text, sim_t2i, positive, check, "sim_t2i")
    return text_for_image, image_for_text
