"""Fine-tuning task data: embedded VQA / NLVR2 datasets and loaders, VQAv2 / NLVR2 files."""
import json

import pytest
import torch
from PIL import Image

from vlmo_fast.data import build_tokenizer
from vlmo_fast.data.tasks import build_task_dataset, build_task_loader


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("embedded", num_documents=100)


def test_embedded_vqa_loader(tok):
    loader = build_task_loader("vqa", "embedded", tok, "train", 8, img_size=32, max_text_len=20, num_samples=24)
    vocab = loader.answer_vocab
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b["images"].shape == (8, 3, 32, 32) and b["text_ids"].shape == (8, 20)
    assert b["vqa_targets"].shape == (8, len(vocab))
    assert torch.equal(b["vqa_targets"].argmax(1), b["answer_ids"]) and (b["vqa_targets"].sum(1) == 1).all()
    ds = build_task_dataset("vqa", "embedded", "test_comp", img_size=32, num_samples=5)
    item = ds[3]
    assert vocab[item["answer_ids"][0]] in ds.answer_vocab and item["question"].endswith("?")


def test_embedded_nlvr2_loader_and_resume(tok):
    kw = dict(img_size=32, max_text_len=20, num_samples=20, seed=3)
    loader = build_task_loader("nlvr2", "embedded", tok, "train", 4, **kw)
    all_batches = list(loader)
    b = all_batches[0]
    assert b["images_left"].shape == (4, 3, 32, 32) and b["images_right"].shape == (4, 3, 32, 32)
    assert not torch.equal(b["images_left"], b["images_right"])
    labels = torch.cat([x["labels"] for x in all_batches])
    assert set(labels.tolist()) == {0, 1}
    again = build_task_loader("nlvr2", "embedded", tok, "train", 4, **kw)
    again.load_state_dict(json.loads(json.dumps({**loader.state_dict(), "epoch": 0, "batch_index": 2})))
    for x, y in zip(all_batches[2:], again):
        assert torch.equal(x["keys"], y["keys"]) and torch.equal(x["images_left"], y["images_left"])
    ev = build_task_loader("nlvr2", "embedded", tok, "test", 4, **kw)
    assert torch.cat([x["keys"] for x in ev]).tolist() == list(range(20))   # eval splits in order


def test_vqav2_and_nlvr2_files(tmp_path, tok):
    (tmp_path / "val2014").mkdir()
    for i in (1, 2):
        Image.new("RGB", (30, 20), (40 * i, 10, 10)).save(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    q = {"data_subtype": "val2014", "questions": [{"question_id": 10 + i, "image_id": i, "question": f"q{i}?"}
                                                  for i in (1, 2)]}
    a = {"annotations": [{"question_id": 11, "answers": [{"answer": "yes"}] * 10},
                         {"question_id": 12, "answers": [{"answer": "no"}] * 2 + [{"answer": "yes"}] * 8}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    loader = build_task_loader("vqa", tmp_path / "q.json", tok, "val", 2, img_size=16, annotations=tmp_path / "a.json",
                               image_root=tmp_path / "val2014", min_answer_count=1)
    assert loader.answer_vocab == ["yes", "no"]
    b = next(iter(loader))
    assert torch.allclose(b["vqa_targets"], torch.tensor([[1.0, 0.0], [1.0, 0.6]]))
    assert b["question_ids"].tolist() == [11, 12]
    for i in range(2):
        for side in (0, 1):
            Image.new("RGB", (24, 24), (200, 200 * side, 0)).save(tmp_path / f"dev-{i}-0-img{side}.png")
    rows = [{"identifier": f"dev-{i}-0-{k}", "sentence": f"s{i}{k}", "label": ["True", "False"][k]}
            for i in range(2) for k in range(2)]
    (tmp_path / "dev.json").write_text("\n".join(json.dumps(r) for r in rows))
    loader = build_task_loader("nlvr2", tmp_path / "dev.json", tok, "dev", 4, img_size=16)
    b = next(iter(loader))
    assert b["labels"].tolist() == [1, 0, 1, 0] and b["images_left"].shape == (4, 3, 16, 16)
    assert (b["images_right"][:, 1] > b["images_left"][:, 1]).all()     # img1 is the greener one
    with pytest.raises(ValueError, match="task"):
        build_task_loader("captioning", "embedded", tok)


def test_zero_shot_eval_sets(tmp_path):
    from vlmo_fast.data import SHAPES, build_zero_shot_eval_set
    from vlmo_fast.data.world import EmbeddedWorld
    zs = build_zero_shot_eval_set("embedded", "test_comp", img_size=32, num_images=20)
    assert zs.images.shape == (20, 3, 32, 32) and len(zs.class_names) == 48
    held = EmbeddedWorld(0).held_out
    assert all(tuple(zs.class_names[k].split()) in held for k in zs.labels.tolist())   # unseen pairs
    shapes = build_zero_shot_eval_set("embedded", "test", img_size=32, num_images=30, attribute="shape")
    assert shapes.class_names == list(SHAPES) and len(set(shapes.labels.tolist())) > 3
    assert shapes.prompt_texts()[0][0] == "a circle"
    for k, name in enumerate(("red_car", "blue_boat")):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / name / f"{i}.png")
    folder = build_zero_shot_eval_set(tmp_path, img_size=16)
    assert folder.class_names == ["blue boat", "red car"] and folder.labels.tolist() == [0, 0, 1, 1]
