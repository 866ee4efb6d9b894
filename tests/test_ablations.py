"""train/ablations.py: the statistics (hand-computed values), the plan, the pretraining flags of
the two new switches and their stage recipe, and the `tiny` budget end to end on the embedded
world and on a manifest of real PNG files (a rerun skips finished runs)."""
import json
import math
from pathlib import Path

import pytest
import torch

from vlmo_fast.training import ablations as ab


# -- statistics ----------------------------------------------------------------------------------
def test_student_t_quantiles_match_closed_forms_and_scipy():
    # df = 1 is Cauchy: t = tan(pi (p - 1/2)); df = 2: t = (2p - 1) sqrt(2 / (1 - (2p - 1)^2))
    assert ab.student_t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)
    assert ab.student_t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95 ** 2)), rel=1e-10)
    assert ab.student_t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-10)
    assert ab.student_t_quantile(0.025, 2) == pytest.approx(-4.302652729749464, rel=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (3, 4, 5, 9, 29, 200):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert ab.student_t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            ab.student_t_quantile(bad, 3)
    with pytest.raises(ValueError, match="df must be an int >= 1"):
        ab.student_t_quantile(0.9, 0)


def test_mean_ci_paired_differences_and_verdicts_by_hand():
    # 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    ci = ab.mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(2.4841377118193, rel=1e-9)
    assert (ci.low, ci.high) == (pytest.approx(2 - 2.4841377118193), pytest.approx(2 + 2.4841377118193))
    one = ab.mean_ci([0.4])
    assert one.half_width is None and one.low is None and ab.verdict(one) == ab.INCONCLUSIVE
    with pytest.raises(ValueError, match="at least one value"):
        ab.mean_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        ab.mean_ci([1.0, float("nan")])

    # paired by seed: only seeds both have; variant - baseline
    diffs = ab.paired_differences({0: 0.50, 1: 0.40, 2: 0.45, 5: 0.9}, {0: 0.60, 1: 0.55, 2: 0.50, 3: 0.1})
    assert list(diffs) == [0, 1, 2]
    assert [round(v, 12) for v in diffs.values()] == [-0.1, -0.15, -0.05]
    d = ab.mean_ci(list(diffs.values()))      # mean -0.1, sd 0.05, hw 4.302653 * 0.05 / sqrt(3)
    assert d.mean == pytest.approx(-0.1) and d.half_width == pytest.approx(0.12420688559, rel=1e-9)
    assert ab.verdict(d) == ab.INCONCLUSIVE                      # [-0.224, 0.024] spans 0
    assert ab.verdict(ab.Interval(-0.1, 0.05, 3)) == ab.REPRODUCES        # [-0.15, -0.05]: baseline better
    assert ab.verdict(ab.Interval(0.1, 0.05, 3)) == ab.NOT_REPRODUCED     # [0.05, 0.15]: variant better
    assert ab.verdict(ab.Interval(-0.1, 0.1, 3)) == ab.INCONCLUSIVE       # touches 0
    assert ab.verdict(ab.Interval(-0.02, 0.0, 3)) == ab.REPRODUCES        # equal differences, all < 0


def _result(variant, seed, retrieval, nlvr2):
    return {"variant": variant, "seed": seed, "metrics": {"retrieval_test_mean": retrieval,
                                                           "nlvr2_test_acc": nlvr2, "zeroshot_test_top1": 0.1}}


def test_summary_table_and_chart_from_results(tmp_path):
    results = [_result("vlmo", s, r, n) for s, r, n in ((0, 0.30, 0.70), (1, 0.32, 0.72), (2, 0.31, 0.71))]
    # shared FFN: worse on every seed by 0.05 +- 0.01 (retrieval); NLVR2 noisy around zero
    results += [_result("shared_ffn", s, r, n) for s, r, n in ((0, 0.24, 0.75), (1, 0.28, 0.66), (2, 0.25, 0.72))]
    results += [_result("no_vl_expert", 0, 0.2, 0.5)]
    summary = ab.write_summary(tmp_path, results, ["ffn"], ["test"])
    base = summary["variants"]["vlmo"]["metrics"]["retrieval_test_mean"]
    assert base["mean"] == pytest.approx(0.31) and base["half_width"] == pytest.approx(
        ab.student_t_quantile(0.975, 2) * 0.01 / math.sqrt(3))
    comp = summary["arms"]["ffn"]["comparisons"]
    r = comp["shared_ffn"]["retrieval_test_mean"]      # differences -0.06, -0.04, -0.06
    assert r["mean"] == pytest.approx(-0.16 / 3) and r["verdict"] == ab.REPRODUCES
    # deviations -0.02/3, +0.04/3, -0.02/3: sd = sqrt(0.0024 / 9 / 2) = 0.0115470
    assert r["half_width"] == pytest.approx(4.302652729749464 * 0.011547005383792 / math.sqrt(3), rel=1e-9)
    assert comp["shared_ffn"]["nlvr2_test_acc"]["verdict"] == ab.INCONCLUSIVE
    assert "verdict" not in comp["shared_ffn"]["zeroshot_test_top1"]          # not a key metric
    assert comp["no_vl_expert"]["retrieval_test_mean"]["verdict"] == ab.INCONCLUSIVE   # one seed
    md = (tmp_path / "summary.md").read_text()
    assert "| ffn | standard Transformer (one FFN for all modalities) | 3 |" in md
    assert "-5.3 ± 2.9" in md and "reproduces" in md and "Table 5" in md
    assert (tmp_path / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "summary.json").read_text())["headline"] == "retrieval_test_mean"


def test_plan_shares_the_baseline_and_budgets_are_sized():
    runs = ab.plan_runs(["ffn", "attention"], 2)
    assert [r.name for r in runs[:4]] == ["vlmo-seed0", "shared_ffn-seed0", "no_vl_expert-seed0",
                                          "per_modality_attention-seed0"]
    assert len(runs) == 8 and len(set(runs)) == 8
    assert len(ab.plan_runs(list(ab.ARMS), 3)) == 30
    with pytest.raises(ValueError, match=r"--arms: unknown arm\(s\) \['heads'\]"):
        ab.parse_arms("ffn,heads", ab.BUDGETS["tiny"])
    # small is the demo's job; its vl stage is at least the demo's
    from vlmo_fast.demo import DEMO_ARGS
    small = ab.BUDGETS["small"].pretrain
    assert ab.flag_value(small, "--vl-steps") == ab.flag_value(DEMO_ARGS, "--vl-steps")
    assert int(ab.flag_value(small, "--vl-steps")) >= 800
    assert "--output-dir" not in small and "--resume" not in small and "--stage" not in small
    # 2-process runs split the global batch; the variant's flags come last
    settings = ab._settings(ab.build_parser().parse_args(["--output-dir", "x"]), ab.BUDGETS["small"])
    argv = ab.pretrain_argv(ab.Run("hardneg_local", 1), ab.BUDGETS["small"], settings, Path("tok"), Path("out"))
    assert ab.flag_value(argv, "--batch-size") == str(ab.BUDGETS["small"].batch_size // 2)
    assert argv.count("--batch-size") == 1 and argv[-2:] == ["--hard-negatives", "local"]
    assert ab.VARIANTS["hardneg_local"].processes == 2 == ab.VARIANTS["hardneg_global"].processes


@pytest.mark.parametrize("extra, message", [
    (["--arms", "ffn,ffn"], "names an arm twice"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--budget", "base"], "documented only"),
    (["--eval-data", __file__], "is for --data PATH"),
    (["--data", "/nonexistent.jsonl", "--tokenizer", "embedded"], "--data: .*no such file"),
    (["--data", "/nonexistent/shard-{0..3}.tar", "--tokenizer", "embedded"], "--data: "),
    (["--data", __file__], "--tokenizer is required"),
    (["--eval-splits", "test,train2"], "not embedded-world splits"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, extra, message):
    args = ab.build_parser().parse_args(["--output-dir", str(tmp_path / "out"), *extra])
    with pytest.raises(ValueError, match=message):
        ab.run(args)
    assert not (tmp_path / "out").exists()


# -- the switches in the pretraining job --------------------------------------------------------
def _pretrain_args(*extra):
    from vlmo_fast.training.pretrain import build_parser
    return build_parser().parse_args(["--output-dir", "/tmp/unused", *extra])


def test_pretrain_flags_set_the_switches_and_cannot_change_an_init_model(tmp_path):
    from vlmo_fast import VLMo
    from vlmo_fast.data import build_tokenizer
    from vlmo_fast.training.pretrain import Job, validate_args
    tok = build_tokenizer("embedded")
    cfg = Job(_pretrain_args("--no-vl-expert", "--attention", "per_modality")).base_config(tok)
    assert cfg.vl_expert is False and cfg.attention == "per_modality"
    plain = Job(_pretrain_args()).base_config(tok)
    assert plain.vl_expert is True and plain.attention == "shared"
    with pytest.raises(ValueError, match="--attention and --model-overrides disagree on attention"):
        validate_args(_pretrain_args("--attention", "per_modality", "--model-overrides", '{"attention": "shared"}'))
    VLMo.from_preset("tiny", vocab_size=tok.vocab_size).save_pretrained(tmp_path / "init")
    job = Job(_pretrain_args("--stage", "vl", "--init", str(tmp_path / "init"), "--attention", "per_modality"))
    with pytest.raises(ValueError, match="--attention: the --init checkpoint .* holds a model with "
                                         "attention='shared', not 'per_modality'"):
        job.base_config(tok)
    # restating the checkpoint's own setting is fine
    assert Job(_pretrain_args("--stage", "vl", "--init", str(tmp_path / "init"), "--attention",
                              "shared")).base_config(tok).attention == "shared"


def test_per_modality_attention_stage_recipe():
    """vision trains the vision attention; text copies it into the language attention and
    freezes both (the model then computes what the shared one does); vl trains both."""
    from vlmo_fast import VLMo
    from vlmo_fast.training.stages import prepare_stage
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", attention="per_modality")
    prepare_stage(model, "vision")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.weight" in trainable and "blocks.0.attn_text.qkv.weight" not in trainable
    assert not torch.equal(model.blocks[0].attn.qkv.weight, model.blocks[0].attn_text.qkv.weight)
    prepare_stage(model, "text")
    for blk in model.blocks:
        for (name, a), b in zip(blk.attn.named_parameters(), blk.attn_text.parameters()):
            assert torch.equal(a, b) and not a.requires_grad and not b.requires_grad, name
    prepare_stage(model, "vl")
    assert all(p.requires_grad for p in model.parameters())


# -- end to end (the tiny budget) ---------------------------------------------------------------
def _run(capsys, *argv):
    summary = ab.run(ab.build_parser().parse_args(["--budget", "tiny", *argv]))
    return summary, capsys.readouterr().out


def test_tiny_budget_end_to_end_then_a_rerun_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "abl"
    summary, text = _run(capsys, "--output-dir", str(out))
    names = ["vlmo-seed0", "shared_ffn-seed0", "no_vl_expert-seed0", "per_modality_attention-seed0"]
    for i, name in enumerate(names, 1):
        assert f"[{i}/4] {name}: retrieval mean R (test) " in text
    assert "~0s left" in text and text.count("left") == 4
    for name in names:
        result = json.loads((out / "results" / f"{name}.json").read_text())
        m = result["metrics"]
        for split in ("test", "test_comp"):
            for key in (f"retrieval_{split}_r1", f"retrieval_{split}_r10", f"retrieval_{split}_mean",
                        f"zeroshot_{split}_top1", f"nlvr2_{split}_acc"):
                assert 0.0 <= m[key] <= 1.0, (name, key)
        assert not result["skipped"] and result["settings"]["budget"] == "tiny"
        # ITM accuracy over the last 10 % of the vl stage's logged steps (4 steps: the last one)
        rows = [json.loads(line) for line in (out / "runs" / result["variant"] / "seed0" / "pretrain" / "vl"
                                              / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "itm_acc" in r][-1]
        assert m["itm_train_acc"] == pytest.approx(last["itm_acc"]) and m["itm_train_loss"] == pytest.approx(last["itm"])
    # each variant's switch reached its model (config.json of the exported weights)
    def config(name):
        return json.loads((out / "runs" / name / "seed0" / "pretrain" / "vl" / "final" / "config.json").read_text())
    assert config("no_vl_expert")["vl_expert"] is False and config("vlmo")["vl_expert"] is True
    assert config("per_modality_attention")["attention"] == "per_modality"
    assert set(summary["arms"]) == {"ffn", "attention"}
    md = (out / "summary.md").read_text()
    assert "MoME without the VL expert" in md and "inconclusive" in md   # one seed: never a verdict
    assert "ITM acc (train, last 10 % of vl)" in md and "ITC+ITM re-rank mean R (test)" in md
    assert (out / "ablations.png").stat().st_size > 1000

    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    metrics_log = out / "runs" / "vlmo" / "seed0" / "pretrain" / "vl" / "metrics.jsonl"
    log_before = metrics_log.read_text()
    _, text = _run(capsys, "--output-dir", str(out))
    assert all(f"{name}: finished earlier" in text for name in names)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and metrics_log.read_text() == log_before

    # a result written before the runner recorded the ITM tail gets it from the run's vl log
    path = out / "results" / "vlmo-seed0.json"
    result = json.loads(path.read_text())
    full = dict(result["metrics"])
    for key in ("itm_train_acc", "itm_train_loss"):
        del result["metrics"][key]
    path.write_text(json.dumps(result))
    _, text = _run(capsys, "--output-dir", str(out))
    assert text.count("finished earlier") == 4
    assert json.loads(path.read_text())["metrics"] == full

    # a run without its result JSON is finished from what its jobs left: pretraining and the
    # fine-tune are done (final/DONE), only the missing evaluation runs again
    before = json.loads((out / "results" / "no_vl_expert-seed0.json").read_text())
    (out / "results" / "no_vl_expert-seed0.json").unlink()
    (out / "runs" / "no_vl_expert" / "seed0" / "eval" / "zeroshot-test.json").unlink()
    vl_log = out / "runs" / "no_vl_expert" / "seed0" / "pretrain" / "vl" / "metrics.jsonl"
    nlvr2_log = out / "runs" / "no_vl_expert" / "seed0" / "nlvr2" / "metrics.jsonl"
    logs = vl_log.read_text(), nlvr2_log.read_text()
    _, text = _run(capsys, "--output-dir", str(out))
    assert "[3/4] no_vl_expert-seed0: retrieval mean R (test)" in text and text.count("finished earlier") == 3
    assert (vl_log.read_text(), nlvr2_log.read_text()) == logs
    after = json.loads((out / "results" / "no_vl_expert-seed0.json").read_text())
    assert after["metrics"] == before["metrics"]

    # results of other settings are refused, not mixed in
    path = out / "results" / "shared_ffn-seed0.json"
    result = json.loads(path.read_text())
    result["settings"]["budget_values"]["nlvr2_steps"] = 999
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="shared_ffn-seed0.json holds a run made with other settings "
                                         r"\(they differ in budget_values.nlvr2_steps\)"):
        _run(capsys, "--output-dir", str(out))


def _png_manifest(folder: Path) -> Path:
    """12 real PNG files (a coloured shape on a plain background) and their captions."""
    from PIL import Image, ImageDraw
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
    rows = []
    for i in range(12):
        colour = list(colours)[i % 3]
        shape = ("square", "circle")[i // 3 % 2]
        side = ("left", "right")[i // 6]
        img = Image.new("RGB", (48, 40), (235, 235, 225))
        x0 = 4 if side == "left" else 26
        box = (x0, 10, x0 + 18, 28)
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colours[colour])
        img.save(folder / f"img_{i}.png")
        rows.append({"image": f"img_{i}.png", "caption": f"a {colour} {shape} on the {side}"})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "captions.txt").write_text("".join(r["caption"] + "\n" for r in rows))
    return manifest


def test_tiny_budget_on_a_manifest_of_real_png_files(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    manifest = _png_manifest(data)
    out = tmp_path / "abl"
    summary, text = _run(capsys, "--output-dir", str(out), "--arms", "attention", "--data", str(manifest),
                         "--tokenizer", f"train:{data / 'captions.txt'}", "--vocab-size", "100")
    assert "retrieval is evaluated on --data" in text and "[2/2] per_modality_attention-seed0" in text
    result = json.loads((out / "results" / "per_modality_attention-seed0.json").read_text())
    assert result["eval_on_training_data"] is True
    assert sorted(result["skipped"]) == ["nlvr2_test", "zeroshot_test"]
    assert set(result["metrics"]) == {"retrieval_test_r1", "retrieval_test_r10", "retrieval_test_mean",
                                      "rerank_test_mean", "itm_train_acc", "itm_train_loss"}
    assert result["chance"]["itm_train_acc"] == pytest.approx(2 / 3)
    retrieval = json.loads((out / "runs" / "vlmo" / "seed0" / "eval" / "retrieval-test.json").read_text())
    assert retrieval["sizes"] == {"images": 12, "texts": 12}
    assert (out / "tokenizer" / "vocab.txt").is_file()
    assert "retrieval_test_mean" in summary["arms"]["attention"]["comparisons"]["per_modality_attention"]

    # --jobs 2: the same runs, each in a child process of the runner, give the same results
    out2 = tmp_path / "abl-jobs"
    summary2, text2 = _run(capsys, "--output-dir", str(out2), "--arms", "attention", "--data", str(manifest),
                           "--tokenizer", f"train:{data / 'captions.txt'}", "--vocab-size", "100", "--jobs", "2")
    assert "[2/2] " in text2 and text2.count(" left") == 2 and "saved " in text2
    for name in ("vlmo-seed0", "per_modality_attention-seed0"):
        first = json.loads((out / "results" / f"{name}.json").read_text())
        second = json.loads((out2 / "results" / f"{name}.json").read_text())
        assert second["metrics"] == pytest.approx(first["metrics"], abs=1e-6), name
        assert (out2 / "runs" / name.split("-seed")[0] / "seed0" / "runner.log").is_file()
    assert summary2["arms"] == summary["arms"]


@pytest.mark.parametrize("flag, value", [("--hard-negative-scale", "1.5"), ("--hard-negative-scale", "-0.1"),
                                         ("--hard-negative-warmup", "-1")])
def test_pretrain_refuses_bad_hard_negative_flags_before_any_work(flag, value):
    from vlmo_fast.training.pretrain import validate_args
    with pytest.raises(ValueError, match=f"{flag} must be"):
        validate_args(_pretrain_args(flag, value))
