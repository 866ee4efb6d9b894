"""The capacity planner (vlmo_fast/plan.py): its formulas against hand-computed values and
DeepSpeed's estimators, its itemised activations against the tensors autograd really keeps,
and its memory figure against the CPU allocator's measured peak of real VL steps.

Tolerances of the measured comparisons (stated here, explained where they are used):
- itemised saved bytes vs autograd's saved tensors: 3 % for a block and for a whole step
  (measured: 0.1-2.5 %; the rest are per-pack block-mask tensors and tiny index tensors the
  plan does not itemise);
- the plan's activations vs the allocator's live bytes at the end of forward, and the plan's
  activations + backward workspace vs the allocator's peak over forward + backward: 15 %
  (measured: within 5 %). The planner itemises every saved tensor, but the peak adds a
  workspace bound (one op's gradients, one block's recompute) rather than a trace, and a
  torch release may save a view where this one saves a copy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from vlmo_fast import plan as planner
from vlmo_fast.block import MoMEBlock
from vlmo_fast.config import VLMoConfig
from vlmo_fast.embeddings import RelativePositionBias
from vlmo_fast.model import VLMo
from vlmo_fast.plan import (CPU_EXECUTION, CUDA_EXECUTION, GPUS, Execution, activation_bytes,
                            block_saved_bytes, count_parameters, model_state_bytes, step_collectives)
from vlmo_fast.training.step import PretrainStep

ROOT = Path(__file__).resolve().parent.parent
ISSUE_EXAMPLE = ["--preset", "base", "--gpus", "64", "--gpu", "h100", "--batch-size", "1024", "--zero", "2",
                 "--pairs", "4e6", "--steps", "200000"]


# ----------------------------------------------------------------------------- helpers

def hand_parameter_count(c: VLMoConfig) -> int:
    """VLMo's parameters written out from the architecture (docs/ARCHITECTURE.md)."""
    d, h, v = c.dim, c.mlp_hidden_dim, c.vocab_size
    text = v * d + c.type_vocab_size * d + 2 * d + (0 if c.relative_position else c.max_text_len * d)
    image = c.in_chans * c.patch_size ** 2 * d + d + d          # patch conv + bias, CLS token
    image += 0 if c.relative_position else c.num_image_tokens * d
    token_type = 2 * d
    rel = ((2 * c.grid_size - 1) ** 2 + 5 + 2 * c.text_relpos_len) * c.num_heads * c.depth \
        if c.relative_position else 0
    blocks = 0
    for layer in range(c.depth):
        experts = 3 if layer >= c.depth - c.vl_layers else 2
        attention = 2 * d + 3 * d * d + 2 * d + d * d + d       # norm1, qkv, q/v bias, proj
        scales = 2 * d if c.layer_scale_init is not None else 0
        blocks += attention + scales + experts * (2 * d + d * h + h + h * d + d)
    heads = 2 * d                                                # final norm
    heads += d * d + d                                           # pooler
    heads += (2 * d * d + 1) * (2 if (c.itc_vl_head and c.vl_layers) else 1)   # ITC (+ itc_vl)
    heads += 2 * d + 2                                           # ITM
    heads += d * d + d + 2 * d + d * v + v                       # MLM head
    return text + image + token_type + rel + blocks + heads


def saved_tensor_bytes(root, parameters) -> int:
    """Bytes of the distinct storages autograd keeps for backward below `root` (a grad_fn),
    the storages of `parameters` excluded: what the planner's activation figure itemises."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    seen, stack, visited = {}, [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not (attr.startswith("_saved_") or attr == "saved_tensors"):
                continue
            value = getattr(node, attr)
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(nbytes for ptr, nbytes in seen.items() if ptr not in excluded)


def vl_batch(config: VLMoConfig, b: int, masked: int, seed: int = 0):
    """A VL batch of full-length texts (the planner's padded worst case) with exactly `masked`
    MLM positions (the planner's expected count on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    lt = config.max_text_len
    ids = torch.randint(5, config.vocab_size, (b, lt), generator=g)
    labels = torch.full((b, lt), -100)
    chosen = torch.randperm(b * (lt - 1), generator=g)[:masked]
    rows, cols = chosen // (lt - 1), chosen % (lt - 1) + 1
    labels[rows, cols] = ids[rows, cols]
    mlm_ids = ids.clone()
    mlm_ids[rows, cols] = 4
    return {"images": torch.rand(b, config.in_chans, config.img_size, config.img_size, generator=g),
            "text_ids": ids, "text_mask": torch.ones(b, lt, dtype=torch.long), "mlm_ids": mlm_ids,
            "mlm_labels": labels, "image_ids": torch.arange(b)}


def cpu_step(config: VLMoConfig, seed: int = 0) -> PretrainStep:
    torch.manual_seed(seed)
    model = VLMo(config).train()
    return PretrainStep(model, "vl", layout="padded", generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("preset", ["tiny", "base", "base_plus"])
def test_parameter_count_matches_the_hand_count(preset):
    config = VLMoConfig.preset(preset)
    assert count_parameters(config).total == hand_parameter_count(config)


def test_parameter_count_of_base_by_hand_and_tiny_against_the_real_model():
    # VLMo-Base with this repo's heads (untied MLM decoder, itc + itc_vl): 202,414,750
    assert count_parameters(VLMoConfig.preset("base")).total == 202_414_750
    tiny = VLMoConfig.preset("tiny")
    real = VLMo(tiny)
    counted = count_parameters(tiny)
    assert counted.total == sum(p.numel() for p in real.parameters())
    assert counted.groups == {name: sum(p.numel() for p in child.parameters())
                              for name, child in real.named_children() if any(True for _ in child.parameters())}


def test_largest_layer_is_deepspeeds_on_the_real_model():
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    tiny = VLMoConfig.preset("tiny")
    total, largest = stage3.model_to_params(VLMo(tiny))
    counted = count_parameters(tiny)
    assert (counted.total, counted.largest_layer) == (total, largest)
    assert counted.largest_layer_name == "text_embeddings.word_embeddings"


# ----------------------------------------------------------------------------- model states

@pytest.mark.parametrize("per_node,nodes", [(1, 1), (8, 1), (8, 8), (4, 3)])
def test_model_states_equal_deepspeeds_estimators(per_node, nodes):
    stage12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    total, largest = 202_414_750, 23_440_896
    ds2 = stage12.estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)[1]
    ds3 = stage3.estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=False,
                                                      cpu_offload_params=False, zero_init=True)[1]
    for zero, expected in ((2, ds2), (3, ds3)):
        value, source = model_state_bytes(total, largest, zero, per_node, nodes)
        assert value == expected and "estimate_zero" in source
        # the fallback formula (deepspeed absent) gives the same bytes and says what it is
        value, source = model_state_bytes(total, largest, zero, per_node, nodes, use_deepspeed=False)
        assert value == expected and "fallback formula" in source


def test_model_states_by_hand():
    p, n = 100_000_000, 64
    assert model_state_bytes(p, 10, 2, 8, 8, use_deepspeed=False)[0] == 2 * p + 18 * p // n
    assert model_state_bytes(p, 10, 3, 8, 8, use_deepspeed=False)[0] == 4 * 10 + 18 * p // n
    assert model_state_bytes(p, 10, 1, 8, 8)[0] == 4 * p + 16 * p // n
    assert model_state_bytes(p, 10, 0, 8, 8)[0] == 20 * p
    # one GPU: every stage holds the same 20 bytes per parameter
    assert {model_state_bytes(p, 0, z, 1, 1, use_deepspeed=False)[0] for z in (0, 1, 2)} == {20 * p}


def test_plan_says_when_deepspeed_is_missing(monkeypatch):
    monkeypatch.setattr(planner, "_deepspeed_estimators", lambda: None)
    result = planner.plan("tiny", 8, "h100", 64, 2, 1000, 10)
    assert "deepspeed not installed: fallback formula" in result.model_states_source
    assert "fallback formula" in result.summary()


# ----------------------------------------------------------------------------- activations by hand

def test_block_saved_bytes_by_hand():
    # d 64, h 256, 4 heads, 3 sequences of 10 tokens, masked attention, drop path, layer scale
    config = VLMoConfig.preset("tiny")
    t, s, pairs, d, h, heads = 30, 3, 300, 64, 256, 4
    cpu = sum(block_saved_bytes(config, CPU_EXECUTION, tokens=t, sequences=s, score_pairs=pairs,
                                masked=True, drop_path=True).values())
    attention = (t * (4 * d + 8) + t * 4 * d + t * 3 * 4 * d + pairs * heads * 4 * 2 + t * heads
                 + t * 4 * d + t * 4 * d + s * 4)
    ffn = t * (4 * d + 8) + t * 3 * 4 * d + 2 * t * 4 * h + t * 4 * d + t * 4 * d + t * 16 + t * 4
    assert cpu == attention + ffn == 172_092
    cuda = sum(block_saved_bytes(config, CUDA_EXECUTION, tokens=t, sequences=s, score_pairs=pairs,
                                 masked=True, drop_path=True).values())
    attention = t * (2 * d + 8) + t * 2 * d + t * 4 * 2 * d + t * 8 * heads + t * 2 * d + t * 2 * d + t * 2
    ffn = t * 2 * d + t * (2 * d + 8) + 2 * t * 2 * h + t * 2 * d + t * 4 + t * 4
    assert cuda == attention + ffn
    # recomputing the pre-activation drops [T, h]; checkpointing keeps the block input only
    recompute = sum(block_saved_bytes(config, Execution(ffn="triton-recompute"), tokens=t, sequences=s,
                                      score_pairs=pairs, masked=True, drop_path=True).values())
    assert cuda - recompute == t * h * 2


@pytest.mark.parametrize("attn,ffn,execution", [
    ("reference", "grouped_mm", CPU_EXECUTION),
    # the CUDA path's cores on a CPU: FlexAttention (eager) and the Triton FFN (interpreted)
    ("flex", "triton", Execution("fp32", "fused", "triton", "padded", "expected")),
])
def test_block_itemisation_matches_autograds_saved_tensors(attn, ffn, execution):
    config = VLMoConfig.preset("tiny")
    torch.manual_seed(0)
    block = MoMEBlock(config.dim, config.num_heads, 3, drop_path=0.1, ffn_backend=ffn,
                      attn_backend=attn).train()
    rel = RelativePositionBias(config.grid_size, config.text_relpos_len, config.num_heads, config.depth)
    b, length = 3, 10
    is_text = torch.arange(length) < 5
    positions = torch.cat([torch.arange(5), torch.arange(5)])
    x = torch.randn(b, length, config.dim, requires_grad=True)
    out = block(x, torch.randint(0, 3, (b, length)), attn_bias=rel.layer_biases(is_text, positions)[0])
    assert block.attn.last_backend == attn
    kept = saved_tensor_bytes(out.grad_fn, list(block.parameters()) + list(rel.parameters()))
    itemised = sum(block_saved_bytes(config, execution, tokens=b * length, sequences=b,
                                     score_pairs=b * length * length, masked=True, drop_path=True).values())
    assert itemised == pytest.approx(kept, rel=0.03)


@pytest.mark.parametrize("overrides", [
    dict(vocab_size=500),
    # absolute positions (unmasked image attention), no layer scale, no itc_vl re-run
    dict(vocab_size=500, relative_position=False, layer_scale_init=None, itc_vl_head=False),
])
def test_vl_step_activations_match_autograds_saved_tensors(overrides):
    config = VLMoConfig.preset("tiny", **overrides)
    b = 3
    step = cpu_step(config)
    out = step(vl_batch(config, b, planner.mlm_rows(config, CPU_EXECUTION, b, config.max_text_len)))
    kept = saved_tensor_bytes(out["loss"].grad_fn, step.parameters())
    assert activation_bytes(config, CPU_EXECUTION, b, config.max_text_len).total == pytest.approx(kept, rel=0.03)


def test_passes_of_the_vl_step():
    config = VLMoConfig.preset("base")
    packed = planner.vl_step_passes(config, 16, 40, "packed")
    assert [p.tokens for p in packed] == [16 * 237, 16 * 237, 64 * 237]
    assert [(p.start, p.end) for p in packed] == [(0, 12), (10, 12), (0, 12)]
    assert packed[0].score_pairs == 16 * (197 ** 2 + 40 ** 2)       # block-diagonal pack
    assert packed[2].experts_below == (64 * 197, 64 * 40, 0) and packed[2].experts_vl == (0, 0, 64 * 237)
    padded = planner.vl_step_passes(config, 16, 40, "padded")
    assert [p.tokens for p in padded] == [16 * 197, 16 * 40, 16 * 197, 16 * 40, 64 * 237]
    # checkpointing keeps d * 2 bytes per token per block (bf16 block inputs)
    act = activation_bytes(config, CUDA_EXECUTION, 16, 40, checkpointing=True)
    kept_by_blocks = sum((p.end - p.start) * p.tokens * 768 * 2 + p.tokens * 16 for p in packed)
    assert act.blocks == kept_by_blocks


# ----------------------------------------------------------------------------- measured memory

def _allocator_trace(step: PretrainStep, batch) -> tuple:
    """(live bytes at the end of forward, peak over forward + backward), both relative to the
    start, from torch's CPU allocator as the profiler records it (every allocation and free
    with the running total). Gradients are allocated beforehand, as DeepSpeed's buffers are
    (they are model states in the plan)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    for p in step.parameters():
        p.grad = torch.zeros_like(p)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step(batch)["loss"]
        with record_function("plan_test_backward_starts"):
            pass
        loss.backward()
    events, marks = [], []

    def visit(e):
        if e.name == "plan_test_backward_starts":
            marks.append(e.start_time_ns)
        fields = e.extra_fields
        if hasattr(fields, "total_allocated") and fields.device.type == "cpu":
            events.append((e.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in e.children:
            visit(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        visit(root)
    assert events and marks, "the profiler recorded no CPU allocations (profile_memory)"
    events.sort()
    start = events[0][2] - events[0][1]
    end_of_forward = [total for t, _, total in events if t < marks[0]][-1] - start
    return end_of_forward, max(total for _, _, total in events) - start


@pytest.fixture
def one_thread():
    """oneDNN's convolution backward keeps a weight-gradient buffer per thread (0.8 MB per
    thread for tiny's patch embedding), a CPU artifact the plan does not model: measure on
    one thread so the figure does not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("overrides,b", [
    (dict(vocab_size=500), 8),
    (dict(vocab_size=500, img_size=48, dim=96, num_heads=3), 6),
])
def test_memory_figure_matches_measured_cpu_peak(overrides, b, one_thread):
    """Two sizes, with and without activation checkpointing: the plan's activations against
    the allocator's live bytes when forward ends, and activations + backward workspace
    against the peak of forward + backward. 15 %: see the module docstring."""
    config = VLMoConfig.preset("tiny", **overrides)
    step = cpu_step(config)
    batch = vl_batch(config, b, planner.mlm_rows(config, CPU_EXECUTION, b, config.max_text_len))
    step(batch)    # warm-up: caches built on first use (index tables, the extension) are not activations
    for checkpointing in (False, True):
        step.model.set_grad_checkpointing(checkpointing)
        end_of_forward, peak = _allocator_trace(step, batch)
        est = activation_bytes(config, CPU_EXECUTION, b, config.max_text_len, checkpointing=checkpointing)
        print(f"b={b} checkpointing={checkpointing}: end of forward {end_of_forward} measured, "
              f"{est.total} planned; peak {peak} measured, {est.total + est.workspace} planned")
        assert est.total == pytest.approx(end_of_forward, rel=0.15), (checkpointing, est.total, end_of_forward)
        assert est.total + est.workspace == pytest.approx(peak, rel=0.15), (checkpointing, est, peak)


# ----------------------------------------------------------------------------- batch, collectives

def test_all_gather_volume_by_hand():
    config = VLMoConfig.preset("base")
    params = 202_414_750
    c = step_collectives(config, CUDA_EXECUTION, params, micro=16, accum=1, text_len=40, world=64, zero=2,
                         checkpointing=False)
    # every rank's 16 images (3 x 224 x 224 fp32), int64 ids + mask of 40 tokens, image id
    assert c["raw inputs for ITM negatives (images fp32, ids, masks)"]["bytes"] == \
        63 * 16 * (3 * 224 * 224 * 4 + 40 * 16 + 8)
    # the Triton loss gathers the bf16 text features of both heads (1024 x 768)
    assert c["ITC text features (Triton contrastive loss)"]["bytes"] == 2 * 63 * 16 * 768 * 2
    assert c["features for hard negatives (image + text)"]["bytes"] == 63 * 16 * 2 * 768 * 2
    assert c["updated weights (bf16)"]["bytes"] == pytest.approx(63 / 64 * 2 * params)
    assert c["gradients (bf16, every micro-batch)"]["bytes"] == pytest.approx(63 / 64 * 2 * params)
    # ZeRO-3 gathers the weights in forward and backward (and the recompute) of every micro-batch
    z3 = step_collectives(config, CUDA_EXECUTION, params, 16, 2, 40, 64, 3, checkpointing=True)
    assert z3["weights (bf16, forward + backward + recompute)"]["bytes"] == pytest.approx(6 * 63 / 64 * 2 * params)
    one_gpu = step_collectives(config, CUDA_EXECUTION, params, 16, 1, 40, 1, 2, False)
    assert one_gpu and all(v["bytes"] == 0 for v in one_gpu.values())


def test_largest_micro_batch_is_the_memory_boundary():
    result = planner.plan("base", 64, "h100", 1024, 2, 4e6, 200_000)
    config = VLMoConfig.preset("base")
    fixed = result.model_states + result.zero_buffers

    def memory(m):
        return planner._memory_at(config, CUDA_EXECUTION, m, 40, 64, False, fixed)[0]

    m = result.max_micro_batch
    assert memory(m) <= result.usable < memory(m + 1)
    assert result.micro_batch == 16 and result.grad_accum == 1 and result.contrastive_batch == 1024
    assert result.memory_total == memory(16)
    # checkpointing fits more; a 40 GB A100 fits fewer
    assert result.max_micro_batch_other > m
    assert planner.plan("base", 64, "a100-40", 1024, 2, 4e6, 200_000).max_micro_batch < m


def test_micro_batch_is_a_divisor_that_fits_and_a_plan_that_does_not_fit_says_so():
    big = planner.plan("large", 8, "a100-40", 8 * 96, 2, 1e6, 100)
    assert big.micro_batch <= big.max_micro_batch and 96 % big.micro_batch == 0
    assert big.grad_accum * big.micro_batch == 96
    cached = planner.plan("large", 8, "a100-40", 8 * 96, 2, 1e6, 100, itc_accum="cached")
    assert cached.contrastive_batch == 8 * 96 and big.contrastive_batch == 8 * big.micro_batch
    forced = planner.plan("large", 8, "a100-40", 8 * 96, 2, 1e6, 100, micro_batch=96)
    assert not forced.fits and "does not fit" in forced.summary() and forced.notes


# ----------------------------------------------------------------------------- time model

def test_time_model_comes_from_the_roofline():
    roofline, why = planner.load_roofline()
    assert why is None and Path(roofline.__file__).resolve() == ROOT / "benchmarks" / "roofline.py"
    # the GPU table agrees with the roofline parts it shares facts with
    assert GPUS["h100"].bf16_tflops == roofline.H100.tc_tflops["bf16"]
    assert GPUS["h100"].hbm_tbps == roofline.H100.dram_tbps
    assert GPUS["a100-80"].bf16_tflops == roofline.A100.tc_tflops["bf16"]
    assert GPUS["a100-80"].hbm_tbps == roofline.A100.dram_tbps
    result = planner.plan("base", 64, "h100", 1024, 2, 4e6, 200_000)
    t = result.time
    assert t["available"] and "not measured" in t["model"]
    assert t["step_ms"] == pytest.approx(t["compute_ms"] + t["exposed_comm_ms"] + t["optimizer_ms"])
    assert t["total_hours"] == pytest.approx(t["step_ms"] * 200_000 / 3.6e6)
    # the sampler: both directions of roofline's row kernel over [16, 1024] + fp32 GEMMs
    sampler = 2 * roofline.sampler_case(16, 1024).modelled_ms(roofline.H100, "sample") \
        + 1e3 * 2 * 2.0 * 16 * 1024 * 768 / (roofline.H100.fp32_tflops * 1e12)
    assert t["sampler_ms"] == pytest.approx(sampler)
    assert "not a measurement" in result.summary()
    slower = planner.plan("base", 64, "h100", 1024, 2, 4e6, 200_000, activation_checkpointing=True)
    assert slower.time["compute_ms"] > t["compute_ms"]    # the recompute


def test_plan_without_the_roofline_still_plans_memory(monkeypatch):
    monkeypatch.setattr(planner, "load_roofline", lambda: (None, "benchmarks/roofline.py not found"))
    result = planner.plan("tiny", 8, "h200", 64, 3, 1000, 10)
    assert not result.time["available"] and result.memory_total > 0 and result.fits
    assert "time: not modelled (benchmarks/roofline.py not found)" in result.summary()


# ----------------------------------------------------------------------------- input errors, CLI

@pytest.mark.parametrize("kwargs,message", [
    (dict(preset="huge"), "preset must be one of"),
    (dict(gpus=0), "gpus must be a positive integer"),
    (dict(gpu="tpu"), "unknown gpu 'tpu'"),
    (dict(batch_size=1000, gpus=64), "batch_size (1000) must be divisible by gpus (64)"),
    (dict(zero=4), "zero must be 0, 1, 2 or 3"),
    (dict(pairs=0.5), "pairs must be a positive integer"),
    (dict(pairs=float("inf")), "pairs must be a positive integer"),
    (dict(steps="10"), "steps must be a positive integer"),
    (dict(steps=-1), "steps must be a positive integer"),
    (dict(gpus=12, batch_size=1200), "must be a multiple of gpus_per_node (8)"),
    (dict(micro_batch=5), "micro_batch (5) must divide the per-GPU batch"),
    (dict(text_len=41), "exceeds the model's max_text_len (40)"),
    (dict(itc_accum="big"), "itc_accum must be"),
    (dict(internode_gbs=-1), "internode_gbs must be a positive number"),
])
def test_bad_input_is_named(kwargs, message):
    args = dict(preset="base", gpus=64, gpu="h100", batch_size=1024, zero=2, pairs=4e6, steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        planner.plan(**args)
    assert message in str(err.value)


def test_cli_prints_the_plan_and_json(capsys):
    assert planner.main(ISSUE_EXAMPLE) == 0
    out = capsys.readouterr().out
    assert out.startswith("VLMo capacity plan") and "largest micro-batch that fits" in out
    assert planner.main(ISSUE_EXAMPLE + ["--activation-checkpointing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["activation_checkpointing"] and data["parameters"]["total"] == 202_414_750
    assert data["epochs"] == pytest.approx(200_000 * 1024 / 4e6)


def test_cli_bad_input(capsys):
    from vlmo_fast.cli import main as cli_main
    with pytest.raises(SystemExit) as exc:
        cli_main(["plan"] + ISSUE_EXAMPLE + ["--gpus", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: batch_size (1024) must be divisible by gpus (3)") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        planner.main(ISSUE_EXAMPLE + ["--pairs", "4.5"])
    assert exc.value.code == 2 and "expected a positive whole number" in capsys.readouterr().err


def test_add_parser_wires_a_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="vlmo-fast")
    planner.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan"] + ISSUE_EXAMPLE + ["--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["micro_batch"] == 16
