"""train/evaluate.py (vlmo_fast.eval.runner) on tiny checkpoints and the embedded world."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmo_fast.data import COLOURS, SHAPES, EmbeddedWorld, WordPieceTokenizer
from vlmo_fast.eval import NLVR2Model
from vlmo_fast.eval.runner import main
from vlmo_fast.model import VLMo

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer() -> WordPieceTokenizer:
    """A WordPiece vocabulary from a slice of the embedded world's texts (fast to train)."""
    world = EmbeddedWorld(0)
    texts = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for i in range(20):
        texts += world.caption_texts(world.scene("train", i))
        texts.append(world.vqa_item("train", i)["question"])
        texts.append(world.nlvr2_item("train", i)["statement"])
    return WordPieceTokenizer.train(texts, vocab_size=400)


def make_checkpoint(directory: Path, tokenizer, **overrides) -> Path:
    model = VLMo.from_preset("tiny", vocab_size=tokenizer.vocab_size, **overrides)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_retrieval_writes_json(tok, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok)
    out = tmp_path / "res" / "retrieval.json"
    res = main(["--task", "retrieval", "--checkpoint", str(ckpt), "--split", "test_comp",
                "--num-items", "12", "--rerank-k", "3", "--out", str(out), "--no-progress",
                "--batch-size", "16"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["sizes"] == {"images": 12, "texts": 60}     # 5 captions per scene
    for proto in ("itc", "itc_itm_rerank"):
        assert set(res["metrics"][proto]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
        assert all(0 <= v <= 1 for v in res["metrics"][proto].values())
    assert res["chance"]["t2i_r1"] == pytest.approx(1 / 12)
    assert res["timing"]["itc_seconds"] > 0 and len(res["model_hash"]) == 16
    printed = capsys.readouterr().out
    assert "ITC+ITM" in printed and "chance" in printed


def test_zeroshot_vqa_nlvr2(tok, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok)
    res = main(["--task", "zeroshot", "--checkpoint", str(ckpt), "--num-items", "40", "--no-progress"])
    assert res["sizes"] == {"images": 40, "classes": 48}   # colour x shape pairs
    assert res["chance"]["top1"] == pytest.approx(1 / 48) and 0 <= res["metrics"]["top1"] <= 1
    res = main(["--task", "zeroshot", "--checkpoint", str(ckpt), "--num-items", "10", "--attribute",
                "shape", "--split", "test_comp", "--no-progress"])
    assert res["sizes"] == {"images": 10, "classes": 6} and res["protocol"]["classes"][0] == SHAPES[0]

    with pytest.raises(SystemExit):   # no answer head: a clear error, exit status 2
        main(["--task", "vqa", "--checkpoint", str(ckpt), "--num-items", "4"])
    n_answers = len(EmbeddedWorld(0).answer_vocab)
    vqa = make_checkpoint(tmp_path / "vqa", tok, num_classes=n_answers)
    res = main(["--task", "vqa", "--checkpoint", str(vqa), "--num-items", "6", "--no-progress"])
    assert res["sizes"] == {"questions": 6, "answers": n_answers}
    assert 0 <= res["metrics"]["vqa_score"] <= 1 and 0 < res["chance"]["vqa_score"] <= 1

    backbone = VLMo.from_preset("tiny", vocab_size=tok.vocab_size)
    NLVR2Model(backbone).save_pretrained(tmp_path / "nlvr2")
    tok.save(tmp_path / "nlvr2")
    res = main(["--task", "nlvr2", "--checkpoint", str(tmp_path / "nlvr2"), "--num-items", "6",
                "--no-progress"])
    assert res["sizes"] == {"examples": 6} and 0.5 <= res["chance"]["accuracy"] <= 1


def test_bad_input_exits_with_a_message(tok, tmp_path, capsys):
    ckpt = tmp_path / "bare"
    VLMo.from_preset("tiny", vocab_size=tok.vocab_size).save_pretrained(ckpt)
    with pytest.raises(SystemExit) as exc:
        main(["--task", "retrieval", "--checkpoint", str(ckpt), "--num-items", "3"])
    assert exc.value.code == 2 and "no vocab.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task", "retrieval", "--checkpoint", str(tmp_path / "missing")])
    assert "not a save_pretrained folder" in capsys.readouterr().err
    make_checkpoint(tmp_path / "ok", tok)
    with pytest.raises(SystemExit):
        main(["--task", "zeroshot", "--checkpoint", str(tmp_path / "ok"), "--split", "dev"])
    assert "--split must be one of" in capsys.readouterr().err


def test_script_entry_point(tok, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok)
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "evaluate.py"), "--task", "retrieval",
                           "--checkpoint", str(ckpt), "--num-items", "4", "--rerank-k", "0",
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "retrieval on embedded:test" in proc.stdout


def test_vqa_from_vqav2_files(tok, tmp_path):
    from PIL import Image
    root = tmp_path / "coco"
    root.mkdir()
    for image_id in (1, 2):
        arr = (torch.rand(40, 48, 3) * 255).byte().numpy()
        Image.fromarray(arr).save(root / f"COCO_val2014_{image_id:012d}.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"question_id": 10, "image_id": 1, "question": "what shape is it?"},
        {"question_id": 11, "image_id": 2, "question": "what colour is it?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 10, "answers": [{"answer": "circle"}] * 3 + [{"answer": "ring"}] * 7},
        {"question_id": 11, "answers": [{"answer": "teal"}] * 10}]}))
    ckpt = make_checkpoint(tmp_path / "vqa", tok, num_classes=2)
    (ckpt / "answer_vocab.json").write_text(json.dumps(["circle", "red"]))
    res = main(["--task", "vqa", "--checkpoint", str(ckpt), "--data", str(tmp_path / "q.json"),
                "--annotations", str(tmp_path / "a.json"), "--image-root", str(root), "--split", "val",
                "--no-progress"])
    # reachable: q10 "circle" (3 annotators) 0.9, q11 "teal" is not in the vocabulary: 0
    assert res["upper_bound"]["vqa_score"] == pytest.approx(0.45)
    assert res["metrics"]["vqa_score"] in (pytest.approx(0.0), pytest.approx(0.45))
    (ckpt / "answer_vocab.json").unlink()
    with pytest.raises(SystemExit):   # a VQAv2 file needs the fine-tuning answer vocabulary
        main(["--task", "vqa", "--checkpoint", str(ckpt), "--data", str(tmp_path / "q.json"),
              "--annotations", str(tmp_path / "a.json"), "--image-root", str(root)])


def test_results_table_hand_checked():
    from vlmo_fast.eval.runner import results_table
    iid = {"task": "zeroshot", "split": "test", "metrics": {"top1": 0.5}, "chance": {"top1": 1 / 48}}
    comp = {"task": "zeroshot", "split": "test_comp", "metrics": {"top1": 0.125}, "chance": {"top1": 1 / 48}}
    ret = {"task": "retrieval", "split": "test", "chance": {"i2t_r1": 0.1},
           "metrics": {"itc": {"i2t_r1": 0.25, "mean": 0.3}, "itc_itm_rerank": None}}
    assert results_table([iid, comp, ret]).splitlines() == [
        "| metric | test | test_comp | chance |",
        "|---|---|---|---|",
        "| zeroshot top1 | 50.0 | 12.5 | 2.1 |",
        "| retrieval ITC i2t R@1 | 25.0 | - | 10.0 |"]


def test_results_table_keeps_checkpoints_apart():
    from vlmo_fast.eval.runner import results_table
    pre = {"task": "zeroshot", "split": "test", "checkpoint": "runs/demo/vl/final",
           "metrics": {"top1": 0.5}, "chance": {"top1": 0.25}}
    tuned = {**pre, "checkpoint": "runs/ft-zs/final", "metrics": {"top1": 0.75}}
    assert results_table([pre, tuned]).splitlines()[2:] == [
        "| demo/vl: zeroshot top1 | 50.0 | 25.0 |",
        "| ft-zs: zeroshot top1 | 75.0 | 25.0 |"]


def test_retrieval_from_karpathy_json(tok, tmp_path):
    from PIL import Image
    (tmp_path / "imgs" / "val2014").mkdir(parents=True)
    images = []
    for i, split in enumerate(["test", "test", "train", "test"]):
        name = f"im{i}.jpg"
        Image.fromarray((torch.rand(36, 44, 3) * 255).byte().numpy()).save(tmp_path / "imgs" / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": i,
                       "sentences": [{"raw": f"a red circle number {i}"}, {"raw": f"shape {i}"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images}))
    ckpt = make_checkpoint(tmp_path / "ckpt", tok)
    res = main(["--task", "retrieval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "karpathy.json"),
                "--image-root", str(tmp_path / "imgs"), "--split", "test", "--rerank-k", "2", "--no-progress"])
    assert res["sizes"] == {"images": 3, "texts": 6}   # the train image is left out
    assert res["chance"]["t2i_r1"] == pytest.approx(1 / 3)
    assert all(0 <= v <= 1 for v in res["metrics"]["itc"].values())
