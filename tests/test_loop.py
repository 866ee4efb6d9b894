"""The one training loop (vlmo_fast.training.loop.TrainLoop) as fine-tuning uses it: what
pretraining had and fine-tuning lacked before they shared the loop (issue 21): the
non-finite policy (--skip-nonfinite, or stop with exit code 3 naming the step and the last
good checkpoint), grad-norm / peak-memory / throughput logging, the shared flags' checks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from test_eval_runner import make_checkpoint, tiny_tokenizer
    return make_checkpoint(tmp_path_factory.mktemp("pre"), tiny_tokenizer())


def _finetune(args, fault=None):
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("VLMO_FAST_FAULT", None)
    if fault:
        env["VLMO_FAST_FAULT"] = fault
    return subprocess.run([sys.executable, "train/finetune.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(path):
    from vlmo_fast.training.logs import read_metrics
    return read_metrics(path)


def test_finetune_nonfinite_stops_with_exit_3_or_is_skipped(tmp_path, pretrained):
    base = ["--task", "vqa", "--init", str(pretrained), "--steps", "3", "--batch-size", "4",
            "--save-every", "1", "--log-every", "1", "--no-progress", "--no-eval"]
    stop = _finetune([*base, "--output-dir", str(tmp_path / "stop")], fault="nan_inputs_at_step:2")
    assert stop.returncode == 3, stop.stderr[-3000:]
    err = stop.stderr.strip().splitlines()
    assert err[-1].startswith("error: [vqa] non-finite loss at step 2") and "step_000001" in err[-1]
    assert "Traceback" not in stop.stderr

    skip = _finetune([*base, "--output-dir", str(tmp_path / "skip"), "--skip-nonfinite"],
                     fault="nan_inputs_at_step:2")
    assert skip.returncode == 0, skip.stderr[-3000:]
    rows = _rows(tmp_path / "skip" / "metrics.jsonl")
    # step 2's only micro-batch was skipped: no row for it, the count logged, the rest finite
    assert [r["step"] for r in rows] == [1, 3]
    assert rows[-1]["skipped_steps"] == 1
    for r in rows:
        assert r["grad_norm"] > 0 and r["peak_memory_mb"] > 0 and r["samples_per_s"] > 0
    done = json.loads((tmp_path / "skip" / "final" / "DONE").read_text())
    assert done["skipped_steps"] == 1 and done["steps"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--clip", "-0.5"], "--clip must be >= 0"),
    (["--warmup-steps", "-2"], "--warmup-steps must be >= 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in"),
    (["--betas", "0.9", "1.5"], "--betas must be in"),
    (["--override-on-resume", "batch_size"], "cannot be overridden"),
])
def test_finetune_checks_the_shared_flags_like_pretraining(pretrained, extra, message):
    """Fine-tuning skipped the weight-decay / clip / warmup checks pretraining has: one
    `validate_common` now serves both jobs."""
    from vlmo_fast.training import finetune, pretrain
    ft = finetune.build_parser().parse_args(["--task", "vqa", "--init", str(pretrained),
                                             "--output-dir", "/tmp/unused", *extra])
    with pytest.raises(ValueError, match=message):
        finetune.validate_args(ft)
    pt = pretrain.build_parser().parse_args(["--output-dir", "/tmp/unused", *extra])
    with pytest.raises(ValueError, match=message):
        pretrain.validate_args(pt)


def test_both_jobs_declare_the_shared_flags_once():
    """Every flag of the shared groups parses identically in both jobs (declared once)."""
    from vlmo_fast.training import finetune, pretrain
    shared = {"--steps", "--batch-size", "--grad-accum", "--lr", "--weight-decay", "--betas", "--warmup-steps",
              "--schedule", "--min-lr-ratio", "--clip", "--precision", "--activation-checkpointing",
              "--output-dir", "--num-workers", "--seed", "--log-every", "--save-every", "--keep-last",
              "--resume", "--override-on-resume", "--skip-nonfinite", "--no-progress"}
    for parser in (finetune.build_parser(), pretrain.build_parser()):
        flags = {s for action in parser._actions for s in action.option_strings}
        assert shared <= flags


def test_pretrain_accepts_shard_patterns_and_urls_for_data(tmp_path):
    """--data takes what the data layer streams (brace patterns, pipe:, URLs), checked without
    reading a shard; a pattern whose first shard is missing is refused naming it."""
    pytest.importorskip("webdataset")
    from vlmo_fast.training import pretrain
    import tarfile
    for i in range(2):
        with tarfile.open(tmp_path / f"data-{i:03d}.tar", "w"):
            pass
    parse = lambda data: pretrain.build_parser().parse_args(["--output-dir", "/tmp/unused", "--data", data,
                                                             "--tokenizer", "embedded"])
    pretrain.validate_args(parse(str(tmp_path / "data-{000..001}.tar")))
    pretrain.validate_args(parse(f"pipe:cat {tmp_path}/data-{{000..001}}.tar"))
    with pytest.raises(ValueError, match="--data: .*data-007.tar"):
        pretrain.validate_args(parse(str(tmp_path / "data-{007..009}.tar")))


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_a_bad_deepspeed_timeout_is_one_line_exit_2(job, monkeypatch, capsys):
    """DEEPSPEED_TIMEOUT is read while the parser is built (deepspeed's import reads it):
    a bad value is named in one line, exit 2, not a traceback from inside deepspeed."""
    import importlib
    module = importlib.import_module(f"vlmo_fast.training.{job}")
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "abc")
    with pytest.raises(SystemExit) as info:
        module.main(["--output-dir", "/tmp/unused"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: DEEPSPEED_TIMEOUT='abc'")
