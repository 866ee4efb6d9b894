"""`deepspeed train/pretrain.py` for real: 2 CPU processes (gloo), tiny preset, embedded data,
a few steps per stage. Each launch covers several things (launches cost ~20-60 s here):

- ZeRO-2, `--stage all`: vision -> text -> vl hand-over through exported weights, frozen
  parameters of the text stage bitwise unchanged, final weights + tokenizer loadable, logs,
  plots, the retrieval JSON.
- ZeRO-3, `--stage all --skip-text-stage --ffn shared --hard-negatives none --itc-accum cached`.
- ZeRO-1 resume: an uninterrupted run vs a run SIGKILLed inside a checkpoint write (after the
  files, before the `latest` pointer) and rerun with the same command: same losses, same weights.
- one process (`python train/pretrain.py`): NaN inputs stop the run naming the step and the
  last good checkpoint; `--skip-nonfinite` skips the step and finishes.
The first DeepSpeed start on a machine JIT-builds its shared-memory comm op (~1 min, cached in
~/.cache/torch_extensions).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
COMMON = ["--batch-size", "4", "--log-every", "1", "--no-progress", "--rerank-k", "4", "--eval-images", "12"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from vlmo_fast.data import build_tokenizer
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(source="embedded", vocab_size=1000).save(d)
    return str(d)


def _env(fault=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("VLMO_FAST_FAULT", None)
    if fault:
        env["VLMO_FAST_FAULT"] = fault
    return env


def launch(args, port, fault=None, processes=2, timeout=420):
    if processes == 1:
        cmd = [PY, "train/pretrain.py", *args]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(processes), "--master_port", str(port), "train/pretrain.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(fault), capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def rows(path):
    from vlmo_fast.training.logs import read_metrics
    return read_metrics(path)   # each step once (a resumed run's restart markers resolved)


def weights(directory):
    from safetensors.torch import load_file
    return load_file(str(Path(directory) / "model.safetensors"))


def test_zero2_all_stages_hand_over_and_frozen_bitwise(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    proc = ok(launch(["--deepspeed_config", "train/configs/zero2.json", "--output-dir", str(out),
                      "--tokenizer", tokenizer_dir, "--stage", "all", "--steps", "3", "--save-every", "2",
                      *COMMON], 29611))
    from vlmo_fast.model import VLMo
    for stage in ("vision", "text", "vl"):
        final = out / stage / "final"
        assert (final / "DONE").is_file() and (final / "vocab.txt").is_file()
        VLMo.from_pretrained(final)
        r = rows(out / stage / "metrics.jsonl")
        assert [x["step"] for x in r] == [1, 2, 3]
        assert all(torch.isfinite(torch.tensor(x["loss"])) for x in r)
        assert (out / stage / "curves.png").stat().st_size > 1000
        assert any((out / stage / "tensorboard").iterdir())
        assert (out / stage / "checkpoints" / "latest").read_text().strip() == "step_000003"
    vl = rows(out / "vl" / "metrics.jsonl")[-1]
    for k in ("itc", "itc_vl", "itm", "mlm", "itm_acc", "itc_i2t_acc", "logit_scale", "lr", "grad_norm",
              "samples_per_s", "peak_memory_mb"):
        assert k in vl, k

    # text stage: everything outside its trainable set is bitwise what the vision stage exported
    before, after = weights(out / "vision" / "final"), weights(out / "text" / "final")
    trained_prefixes = ("text_embeddings.", "token_type_embeddings.", "mlm_head.", "rel_pos_bias.", "norm.")
    changed = set()
    for k, v in before.items():
        if ".mlp." in k:  # stacked experts: vision (0) and VL (2) frozen, language (1) trains
            frozen_slices = [e for e in range(v.shape[0]) if e != 1]
            assert all(torch.equal(v[e], after[k][e]) for e in frozen_slices), k
            if not torch.equal(v[1], after[k][1]):
                changed.add(k)
        elif k.startswith(trained_prefixes):
            if not torch.equal(v, after[k]):
                changed.add(k)
        else:
            assert torch.equal(v, after[k]), f"{k} changed in the text stage"
    assert any(".mlp.fc1_weight" in k for k in changed) and any(k.startswith("text_embeddings.") for k in changed)
    # vl starts from the text stage's weights: its first-step losses are those of a trained text side
    result = json.loads((out / "retrieval_test.json").read_text())
    assert set(result["itc"]) >= {"i2t_r1", "t2i_r10"} and "chance" in result and result["rerank"]
    assert "zero-shot retrieval" in proc.stdout


def test_zero3_skip_text_shared_ffn_no_hard_negatives_cached_itc(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    ok(launch(["--deepspeed_config", "train/configs/zero3.json", "--output-dir", str(out),
               "--tokenizer", tokenizer_dir, "--stage", "all", "--skip-text-stage", "--ffn", "shared",
               "--hard-negatives", "none", "--itc-accum", "cached", "--grad-accum", "2", "--steps", "2",
               "--save-every", "2", "--no-eval", *COMMON], 29612))
    assert not (out / "text").exists()
    w = weights(out / "vl" / "final")
    # one shared FFN, exported as equal experts
    assert torch.equal(w["blocks.3.mlp.fc1_weight"][0], w["blocks.3.mlp.fc1_weight"][2])
    r = rows(out / "vl" / "metrics.jsonl")
    assert len(r) == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r)
    # cached ITC spans the accumulated global batch: 4 x 2 micro-batches x 2 processes = 16 pairs,
    # so its chance-level loss is ~log(16), not log(8)
    assert r[0]["itc"] > 2.5


def test_zero1_kill_during_checkpoint_then_resume_matches_uninterrupted(tmp_path, tokenizer_dir):
    args = ["--deepspeed_config", "train/configs/zero1.json", "--tokenizer", tokenizer_dir, "--stage", "vl",
            "--from-scratch", "--steps", "5", "--save-every", "2", "--no-eval", *COMMON]
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(launch([*args, "--output-dir", str(full)], 29613))
    killed = launch([*args, "--output-dir", str(cut)], 29614, fault="kill_in_checkpoint:4")
    assert killed.returncode != 0
    ckpts = cut / "vl" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"  # the torn save is not pointed at
    assert (ckpts / "step_000004").is_dir()
    resumed = ok(launch([*args, "--output-dir", str(cut)], 29615))
    assert "resumed from" in resumed.stdout and "step_000002" in resumed.stdout
    a, b = rows(full / "vl" / "metrics.jsonl"), rows(cut / "vl" / "metrics.jsonl")
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for k in ("loss", "itc", "itm", "mlm"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
    wa, wb = weights(full / "vl" / "final"), weights(cut / "vl" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_stops_with_step_and_checkpoint_or_is_skipped(tmp_path, tokenizer_dir):
    base = ["--tokenizer", tokenizer_dir, "--stage", "vision", "--steps", "3", "--save-every", "1", *COMMON]
    stop = launch([*base, "--output-dir", str(tmp_path / "stop")], 0, fault="nan_inputs_at_step:2", processes=1)
    assert stop.returncode == 3
    assert "non-finite loss at step 2" in stop.stderr and "step_000001" in stop.stderr
    skip = ok(launch([*base, "--output-dir", str(tmp_path / "skip"), "--skip-nonfinite"], 0,
                     fault="nan_inputs_at_step:2", processes=1))
    r = rows(tmp_path / "skip" / "vision" / "metrics.jsonl")
    assert r[-1]["skipped_steps"] == 1 and torch.isfinite(torch.tensor(r[-1]["loss"]))
    assert "done" in skip.stdout
