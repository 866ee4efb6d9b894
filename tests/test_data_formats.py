"""Real formats on small files the tests write: manifests, Karpathy JSON, image folders,
text corpora, tar shards, VQAv2 / NLVR2; transforms; every bad-data case."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlmo_fast.data import build_pretrain_loader, build_retrieval_eval_set, build_tokenizer
from vlmo_fast.data.formats import (DataError, build_answer_vocab, read_image_folder, read_karpathy,
                                    read_manifest, read_nlvr2, read_tar_shards, read_texts, read_vqav2,
                                    vqa_score, vqa_targets)
from vlmo_fast.data.transforms import ImageTransform, decode_image, swap_left_right
from vlmo_fast.data.loader import TooManyBadSamples
from vlmo_fast.data.formats import ImageRef

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (240, 240, 240), (150, 40, 200)]


def _jpeg(path, colour, size=(40, 30)):
    Image.new("RGB", size, colour).save(path, format="JPEG")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("embedded", num_documents=100)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, c in enumerate(COLOURS):
        _jpeg(d / f"img{i}.jpg", c)
    return d


def test_jsonl_csv_tsv_manifests_with_configurable_keys(tmp_path, images):
    rows = [{"filepath": f"imgs/img{i}.jpg", "title": f"caption {i}", "extra": "ignored"} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "m.csv").write_text("filepath,title,extra\n"
                                    + "".join(f"{r['filepath']},\"{r['title']}\",x\n" for r in rows))
    (tmp_path / "m.tsv").write_text("filepath\ttitle\n" + "".join(f"{r['filepath']}\t{r['title']}\n" for r in rows))
    for name in ("m.jsonl", "m.csv", "m.tsv"):
        recs = read_manifest(tmp_path / name, image_key="filepath", caption_key="title")
        assert [p.caption for p in recs.pairs] == [f"caption {i}" for i in range(6)]
        assert recs.pairs[2].image.path == str(images / "img2.jpg")     # relative to the manifest
        assert recs.image_ids.tolist() == list(range(6))
    # defaults image/caption, an id column groups captions of one image; ALBEF JSON lists
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"image": str(images / f"img{i // 2}.jpg"),
                                                            "caption": f"c{i}", "image_id": i // 2}) for i in range(4)))
    assert read_manifest(tmp_path / "d.jsonl").image_ids.tolist() == [0, 0, 1, 1]
    (tmp_path / "a.json").write_text(json.dumps([{"image": "imgs/img0.jpg", "caption": ["one", "two"]}]))
    recs = read_manifest(tmp_path / "a.json")
    assert [p.caption for p in recs.pairs] == ["one", "two"] and recs.image_ids.tolist() == [0, 0]


def test_records_are_stored_in_numpy_buffers(tmp_path):
    # no per-row Python objects: workers keep sharing the parent's pages (copy-on-write)
    rows = [{"image": f"dir/ü{i}.jpg", "caption": f"caption {i} ✓", "image_id": i // 3} for i in range(10)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recs = read_manifest(tmp_path / "m.jsonl")
    table = recs.pairs
    assert isinstance(table.caption.blob, np.ndarray) and isinstance(recs.image_ids, np.ndarray)
    assert [p.caption for p in table] == [r["caption"] for r in rows]
    assert table[-1].image.path.endswith("dir/ü9.jpg") and table[4].origin.endswith("m.jsonl line 5")
    assert [p.caption for p in table[2:4]] == ["caption 2 ✓", "caption 3 ✓"]
    assert recs.num_images == 4 and recs.image_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    with pytest.raises(IndexError):
        table[10]


def test_manifest_errors_name_file_and_row(tmp_path, images):
    (tmp_path / "a.csv").write_text("image,caption\nimgs/img0.jpg,fine\nimgs/img1.jpg\n")
    with pytest.raises(DataError, match=r"a.csv line 3: missing column 'caption'"):
        read_manifest(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"image": "imgs/img0.jpg", "caption": "x"}\n'
                                      '{"image": "imgs/img1.jpg", "caption": "  "}\n')
    with pytest.raises(DataError, match=r"b.jsonl line 2: empty caption"):
        read_manifest(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"image": "x.jpg", "caption": "x"}\n{not json\n')
    with pytest.raises(DataError, match=r"c.jsonl line 2: not valid JSON"):
        read_manifest(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"img": "x.jpg", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 1: missing column 'image'.*image_key"):
        read_manifest(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"image": "imgs/none.jpg", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"e.jsonl line 1: image file .*none.jpg does not exist"):
        read_manifest(tmp_path / "e.jsonl", check_files=True)


def test_karpathy_json_and_retrieval_eval_set(tmp_path, images, tok):
    data = {"images": [
        {"filepath": "imgs", "filename": f"img{i}.jpg", "cocoid": 100 + i,
         "split": ["train", "restval", "test", "test", "val", "test"][i],
         "sentences": [{"raw": f"Image {i} caption {k}.", "tokens": []} for k in range(2 + i % 2)]}
        for i in range(6)]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    train = read_karpathy(tmp_path / "dataset_coco.json", "train")
    assert {p.image_key for p in train.pairs} == {"100", "101"}        # restval counts as train
    ev = build_retrieval_eval_set(tmp_path / "dataset_coco.json", tok, "test", img_size=24, max_text_len=12)
    assert ev.images.shape == (3, 3, 24, 24)
    assert ev.text_to_image.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert ev.image_ids == ["102", "103", "105"]
    # eval transform keeps the colour of a flat image (normalised to [-1, 1])
    expected = torch.tensor(COLOURS[2], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(ev.images[0].mean((1, 2)), expected, atol=0.05)
    with pytest.raises(ValueError, match="split must be one of"):
        read_karpathy(tmp_path / "dataset_coco.json", "dev")
    (tmp_path / "flickr.json").write_text(json.dumps({"images": data["images"][:2]}))
    with pytest.raises(DataError, match=r"flickr.json: no images in split 'test'"):
        read_karpathy(tmp_path / "flickr.json", "test")
    # a missing image in an eval set is an error naming the file and the record
    (images / "img3.jpg").unlink()
    with pytest.raises(DataError, match=r"img3.jpg does not exist \(.*images\[3\]"):
        build_retrieval_eval_set(tmp_path / "dataset_coco.json", tok, "test", img_size=24)


def test_image_folder_and_text_corpus(tmp_path, images):
    for i in range(3):
        (images / f"img{i}.txt").write_text(f"first {i}\n\nsecond {i}\n")
    with pytest.raises(DataError, match=r"img3.jpg: no caption file img3.txt"):
        read_image_folder(images)
    for i in range(3, 6):
        (images / f"img{i}.txt").write_text(f"only {i}\n")
    recs = read_image_folder(images)
    assert len(recs) == 9 and recs.image_ids[:3].tolist() == [0, 0, 1] and recs.pairs[1].caption == "second 0"
    (tmp_path / "lines.txt").write_text("doc one.\ndoc two.\n\n")
    assert read_texts(tmp_path / "lines.txt") == ["doc one.", "doc two."]
    (tmp_path / "paras.txt").write_text("para one\ncontinues.\n\npara two.\n")
    assert read_texts(tmp_path / "paras.txt") == ["para one continues.", "para two."]
    assert read_texts(tmp_path / "paras.txt", mode="line") == ["para one", "continues.", "para two."]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt: empty corpus"):
        read_texts(tmp_path / "empty.txt")


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg_bytes(colour):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_tar_shards(tmp_path, tok):
    for s in range(2):
        samples = []
        for k in range(3):
            key = f"s{s}/{k:04d}"
            samples.append((f"{key}.jpg", _jpeg_bytes(COLOURS[k])))
            if k == 1:
                samples.append((f"{key}.json", json.dumps({"caption": f"json caption {s}{k}"}).encode()))
            else:
                samples.append((f"{key}.txt", f"text caption {s}{k}".encode()))
        _tar(tmp_path / f"shard-{s:03d}.tar", samples)
    recs = read_tar_shards(str(tmp_path / "shard-{000..001}.tar"))
    assert [p.caption for p in recs.pairs] == ["text caption 00", "json caption 01", "text caption 02",
                                               "text caption 10", "json caption 11", "text caption 12"]
    img = decode_image(recs.pairs[1].image)
    assert np.abs(np.asarray(img, dtype=float).mean((0, 1)) - COLOURS[1]).max() < 8
    assert len(read_tar_shards(tmp_path)) == 6                         # a folder of shards
    loader = build_pretrain_loader(str(tmp_path / "shard-*.tar"), tok, "vl", 3, img_size=16, max_text_len=10)
    batches = list(loader)
    assert sum(len(b["image_ids"]) for b in batches) == 6
    _tar(tmp_path / "bad.tar", [("x.jpg", _jpeg_bytes(COLOURS[0]))])
    with pytest.raises(DataError, match=r"bad.tar sample 'x': no caption"):
        read_tar_shards(tmp_path / "bad.tar")


def test_transforms():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    t = ImageTransform(32, train=True)
    a, _ = t(img, np.random.default_rng(1))
    b, _ = t(img, np.random.default_rng(1))
    c, _ = t(img, np.random.default_rng(2))
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    ev, _ = ImageTransform(32, train=False)(img)
    assert ev.shape == (3, 32, 32)
    # eval: centre crop of the shorter-side resize
    left_half = Image.new("RGB", (64, 32), (255, 255, 255))
    left_half.paste((0, 0, 0), (0, 0, 16, 32))
    ev, _ = ImageTransform(16, train=False)(left_half)
    assert ev.min() > 0.8                                               # the black strip is cropped away
    flips = {ImageTransform(16, flip=True)(left_half, np.random.default_rng(s), "a ring left of a cross")[1]
             for s in range(20)}
    assert flips == {"a ring left of a cross", "a ring right of a cross"}
    assert swap_left_right("Left, right; leftover") == "Right, left; leftover"
    with pytest.raises(ValueError, match="rng"):
        ImageTransform(16)(left_half)


def _manifest_with_bad_images(tmp_path, n_good, bad):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    rows = []
    for i in range(n_good):
        _jpeg(d / f"g{i}.jpg", COLOURS[i % len(COLOURS)])
        rows.append({"image": f"g{i}.jpg", "caption": f"good {i}"})
    for i, kind in enumerate(bad):
        if kind == "corrupt":
            (d / f"b{i}.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
        rows.append({"image": f"b{i}.jpg", "caption": f"bad {i}"})
    path = d / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, tok, caplog):
    path = _manifest_with_bad_images(tmp_path, 30, ["corrupt", "missing"])
    kw = dict(img_size=16, max_text_len=10, max_bad_fraction=0.1)
    loader = build_pretrain_loader(path, tok, "vl", 8, **kw)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert [len(b["images"]) for b in batches] == [8, 8, 8, 8]          # batch sizes kept
    assert loader.num_skipped == 2 and sum(int(b["num_skipped"]) for b in batches) == 2
    caps = [loader.dataset.records.pairs[int(c)].caption for b in batches for c in b["caption_ids"]]
    assert not any(c.startswith("bad") for c in caps)
    assert "b0.jpg is corrupt" in caplog.text and "b1.jpg does not exist" in caplog.text
    assert "2 corrupt or unreadable samples skipped in epoch 0" in caplog.text
    # the limit is per epoch: the same two files met again in later epochs do not add up to a failure
    for _ in range(3):
        list(loader)
    assert loader.num_skipped == 8 and loader.epoch_skipped == 2
    # same substitutes with workers (deterministic), and past the allowed fraction a clear error
    with_workers = list(build_pretrain_loader(path, tok, "vl", 8, num_workers=2, **kw))
    for x, y in zip(batches, with_workers):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["caption_ids"], y["caption_ids"])
    strict = build_pretrain_loader(path, tok, "vl", 8, img_size=16, max_text_len=10)   # default 1 %
    with pytest.raises(TooManyBadSamples, match=r"1 samples were unreadable.*epoch 0.*max_bad_fraction=0.01 of the 32"):
        list(strict)
    no_skip = build_pretrain_loader(path, tok, "vl", 32, img_size=16, max_text_len=10, skip_bad=False)
    with pytest.raises(DataError, match=r"m.jsonl line 3[12]"):
        list(no_skip)
    # raised inside a worker: the same message reaches the main process (no silent crash)
    in_worker = build_pretrain_loader(path, tok, "vl", 32, img_size=16, max_text_len=10, skip_bad=False,
                                      num_workers=1)
    with pytest.raises(DataError, match=r"b[01].jpg .*m.jsonl line 3[12]"):
        list(in_worker)


def test_pretrain_loader_from_files_all_stages(tmp_path, tok, images):
    rows = [{"image": f"imgs/img{i}.jpg", "caption": f"a shape number {i}"} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "corpus.txt").write_text("first document here.\n\nsecond document.\n\nthird one.\n")
    vis = next(iter(build_pretrain_loader(tmp_path / "m.jsonl", tok, "vision", 6, img_size=32)))
    assert vis["images"].shape == (6, 3, 32, 32) and vis["patch_mask"].shape == (6, 4)
    txt = list(build_pretrain_loader(tmp_path / "corpus.txt", tok, "text", 2, max_text_len=12))
    assert sum(len(b["text_ids"]) for b in txt) == 3
    (tmp_path / "m.tsv").write_text("path\ttext\n" + "".join(f"imgs/img{i}.jpg\tcaption {i}\n" for i in range(5)))
    caps = build_pretrain_loader(tmp_path / "m.tsv", tok, "text", 5, image_key="path", caption_key="text", shuffle=False)
    assert tok.decode(next(iter(caps))["text_ids"][4]) == "caption 4"
    vl = build_pretrain_loader(tmp_path / "m.jsonl", tok, "vl", 4, img_size=32, rank=1, world=2)
    keys = [k for b in vl for k in b["keys"].tolist()]
    assert len(keys) == 3


def test_vqav2_reader(tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 1, "image_id": 42, "question": "What colour?"},
        {"question_id": 2, "image_id": 43, "question": "How many?"}]}
    anns = {"annotations": [
        {"question_id": 1, "image_id": 42, "answers": [{"answer": "Red."}] * 7 + [{"answer": "blue"}] * 3},
        {"question_id": 2, "image_id": 43, "answers": [{"answer": "2"}] * 2 + [{"answer": "two"}] * 8}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    recs = read_vqav2(tmp_path / "q.json", tmp_path / "a.json", image_root=tmp_path / "val2014")
    assert recs[0].image.path.endswith("val2014/COCO_val2014_000000000042.jpg")
    assert recs[0].answer_counts == {"red": 7, "blue": 3}
    vocab = build_answer_vocab(recs, min_count=3)
    assert vocab == ["two", "red", "blue"]
    ids, scores = vqa_targets(recs[1].answer_counts, {a: i for i, a in enumerate(vocab)})
    assert ids == [0] and scores == [1.0]
    assert [vqa_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    del anns["annotations"][1]
    (tmp_path / "a2.json").write_text(json.dumps(anns))
    with pytest.raises(DataError, match=r"q.json questions\[1\]: question_id 2 has no annotation"):
        read_vqav2(tmp_path / "q.json", tmp_path / "a2.json")


def test_nlvr2_reader(tmp_path):
    lines = [{"identifier": "train-10171-0-0", "directory": 5, "sentence": "One image has a dog.", "label": "True"},
             {"identifier": "dev-850-0-1", "sentence": "No dogs.", "label": "False"}]
    (tmp_path / "train.json").write_text("\n".join(json.dumps(r) for r in lines))
    recs = read_nlvr2(tmp_path / "train.json", image_root=tmp_path / "images")
    assert recs[0].left.path.endswith("images/5/train-10171-0-img0.png")
    assert recs[0].right.path.endswith("images/5/train-10171-0-img1.png")
    assert recs[1].left.path.endswith("images/dev-850-0-img0.png")
    assert [r.label for r in recs] == [1, 0]
    (tmp_path / "bad.json").write_text(json.dumps({"identifier": "x-1-0-0", "sentence": "s", "label": "maybe"}))
    with pytest.raises(DataError, match=r"bad.json line 1: label must be True/False"):
        read_nlvr2(tmp_path / "bad.json")


def test_decode_errors_name_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"x.png is corrupt .*row 9"):
        decode_image(ImageRef(str(tmp_path / "x.png")), "row 9")


def test_source_detection_errors(tmp_path, tok):
    from vlmo_fast.data import detect_format
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"x.parquet: cannot tell the format"):
        detect_format(tmp_path / "x.parquet")
    with pytest.raises(FileNotFoundError, match=r"nowhere.jsonl does not exist"):
        build_pretrain_loader(tmp_path / "nowhere.jsonl", tok, "vl")
    (tmp_path / "k.json").write_text('{"images": []}')
    (tmp_path / "l.json").write_text('[{"image": "a.jpg", "caption": "c"}]')
    assert (detect_format(tmp_path / "k.json"), detect_format(tmp_path / "l.json")) == ("karpathy", "manifest")
    with pytest.raises(TypeError, match="unexpected options for the embedded world"):
        build_pretrain_loader("embedded", tok, "vl", image_key="x")


def test_export_world_round_trips_through_every_reader(tmp_path, tok):
    from vlmo_fast.data import EmbeddedWorld
    from vlmo_fast.data.export import export_world, main
    world = EmbeddedWorld(0)
    captions = [world.caption_texts(world.scene("test", i)) for i in range(6)]
    jsonl = export_world(tmp_path / "j", "test", 6, img_size=32, fmt="jsonl")
    recs = read_manifest(jsonl)
    assert [p.caption for p in recs.pairs] == [c for caps in captions for c in caps] and recs.num_images == 6
    karpathy = export_world(tmp_path / "k", "test", 6, img_size=32, fmt="karpathy")
    ev = build_retrieval_eval_set(karpathy, tok, "test", img_size=32, max_text_len=16)
    direct = build_retrieval_eval_set("embedded", tok, "test", img_size=32, max_text_len=16, num_images=6)
    assert ev.captions == direct.captions and torch.equal(ev.text_to_image, direct.text_to_image)
    assert (ev.images - direct.images).abs().max() <= 1 / 127.5 + 1e-6     # PNG: 8-bit quantisation only
    folder = export_world(tmp_path / "f", "test", 6, img_size=32, fmt="folder")
    assert len(read_image_folder(folder)) == 30
    shards = main([str(tmp_path / "t"), "--num-images", "6", "--img-size", "32", "--format", "tar",
                   "--image-format", "jpg"])
    assert [p.caption for p in read_tar_shards(shards).pairs] == [caps[0] for caps in captions]
