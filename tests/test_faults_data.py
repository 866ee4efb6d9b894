"""Bad data against the data layer (issue 20, items 5 and 6): images that cannot be decoded
(decompression bombs, truncated files, text named .png, pixel formats without an RGB reading)
are counted skips in training and one-line DataErrors in evaluation; 16-bit and float images
are read by their real range; the too-many-bad stop names the files; every reader rejects
fields of the wrong type, bytes that are not UTF-8 and malformed Karpathy entries, naming the
file and the row, and accepts a UTF-8 byte-order mark. All files are written here."""
import io
import json
import struct
import tarfile
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmo_fast.data import build_pretrain_loader, build_retrieval_eval_set, build_task_dataset, build_tokenizer
from vlmo_fast.data.formats import (DataError, ImageRef, read_karpathy, read_manifest, read_nlvr2,
                                    read_tar_shards, read_texts, read_image_folder, read_vqav2)
from vlmo_fast.data.sources import detect_format, open_records
from vlmo_fast.data.loader import TooManyBadSamples
from vlmo_fast.data.transforms import MAX_IMAGE_PIXELS_ENV, ImageTransform, decode_image
from vlmo_fast.inference import load_image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _blank_bilevel_png(path, side: int):
    """A side x side 1-bit PNG of zeros, written chunk by chunk: 20000 x 20000 is ~48 KB on
    disk (Pillow itself takes seconds to encode it)."""
    row = bytes(1 + (side + 7) // 8)                # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return _blank_bilevel_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("embedded", num_documents=100)


def _bad_images(d, bomb):
    """{kind: path} of files no image reader may turn into pixels."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (d / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (d / "text.png").write_text("this is a caption, not an image\n")
    (d / "bomb.png").write_bytes(bomb.read_bytes())
    Image.fromarray(np.full((8, 8), 250.0, np.float32)).save(d / "hdr.tif")             # float outside [0, 1]
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(d / "nan.tif")
    Image.fromarray(np.full((8, 8), -7, np.int32)).save(d / "signed.tif")               # 32-bit, negative
    return {p.stem: p for p in (d / n for n in ("truncated.png", "text.png", "bomb.png", "hdr.tif", "nan.tif",
                                                 "signed.tif"))}


def _good_jpegs(d, n):
    for i in range(n):
        Image.new("RGB", (40, 30), (40 * (i % 6), 200, 30)).save(d / f"g{i}.jpg", "JPEG")
    return [{"image": f"g{i}.jpg", "caption": f"good {i}"} for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- item 5: images ------------------------------------------------------------------------------
def test_every_kind_of_undecodable_image_is_a_counted_skip_in_training(tmp_path, tok, bomb, caplog):
    bad = _bad_images(tmp_path, bomb)
    rows = _good_jpegs(tmp_path, 60) + [{"image": p.name, "caption": f"bad {k}"} for k, p in bad.items()]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    loader = build_pretrain_loader(path, tok, "vl", 11, img_size=16, max_text_len=10, max_bad_fraction=0.2)
    with caplog.at_level("WARNING", logger="vlmo_fast.data.sources"):
        batches = list(loader)
    assert sum(len(b["images"]) for b in batches) == len(rows)               # every bad one was replaced
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable sample")]
    assert loader.num_skipped == len(skips) >= len(bad)                     # (a substitute may be bad too)
    assert {name for name in (p.name for p in bad.values()) if any(name in m for m in skips)} == \
        {p.name for p in bad.values()}
    assert any("bomb.png is a decompression bomb" in m for m in skips)


def test_decompression_bomb_is_one_line_data_error_in_eval_and_inference(tmp_path, bomb):
    with pytest.raises(DataError) as e:
        load_image(bomb, 16)                                              # `vlmo-fast encode`'s path
    assert "bomb.png is a decompression bomb" in str(e.value) and "\n" not in str(e.value)
    _jsonl(tmp_path / "m.jsonl", [{"image": str(bomb), "caption": "a bomb"}])
    with pytest.raises(DataError, match=r"bomb.png is a decompression bomb .*m.jsonl line 1"):
        build_retrieval_eval_set(tmp_path / "m.jsonl", build_tokenizer("embedded", num_documents=20), img_size=16)
    # Pillow's warning turned into an error by the user's warning filter is a DataError too
    mid = _blank_bilevel_png(tmp_path / "mid.png", 10000)                  # 1e8 px: Pillow warns, 8192^2 limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="mid.png"):
            decode_image(ImageRef(str(mid)))


@pytest.mark.parametrize("kind", ["truncated", "text", "bomb", "hdr", "nan", "signed"])
def test_each_undecodable_image_is_a_one_line_data_error_naming_the_file(tmp_path, bomb, kind):
    path = _bad_images(tmp_path, bomb)[kind]
    with pytest.raises(DataError) as e:
        ImageTransform(16, train=False).load(ImageRef(str(path)), "m.jsonl line 7")
    message = str(e.value)
    assert str(path) in message and "m.jsonl line 7" in message and "\n" not in message
    reason = {"truncated": "corrupt", "text": "not an image", "bomb": "decompression bomb", "hdr": "[250, 250]",
              "nan": "NaN", "signed": "[-7, -7]"}[kind]
    assert reason in message
    with pytest.raises(DataError, match=path.name):
        load_image(path, 16)


def test_the_pixel_limit_is_configurable(tmp_path, tok, monkeypatch):
    Image.new("RGB", (100, 50), (10, 20, 30)).save(tmp_path / "wide.png")
    ref = ImageRef(str(tmp_path / "wide.png"))
    assert ImageTransform(16, train=False, max_pixels=5000).load(ref)[0].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"100x50 = 5,000 pixels, over the limit of 4,999"):
        ImageTransform(16, train=False, max_pixels=4999).load(ref)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "4999")
    with pytest.raises(DataError, match="over the limit of 4,999"):
        decode_image(ref)
    with pytest.raises(DataError, match="over the limit of 4,999"):
        load_image(ref.path, 16)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_IMAGE_PIXELS_ENV):
        decode_image(ref)
    monkeypatch.delenv(MAX_IMAGE_PIXELS_ENV)
    with pytest.raises(ValueError, match="max_image_pixels"):
        ImageTransform(16, max_pixels=0)
    # through the loader's options: the too-large image becomes a counted skip
    rows = _good_jpegs(tmp_path, 9) + [{"image": "wide.png", "caption": "wide"}]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    loader = build_pretrain_loader(path, tok, "vl", 5, img_size=16, max_text_len=10, max_bad_fraction=0.5,
                                   max_image_pixels=4999)
    list(loader)
    assert loader.num_skipped == 1
    # the default is 8192^2: a 9000 x 9000 image is refused from its header, not decoded
    with pytest.raises(DataError, match="81,000,000 pixels, over the limit of 67,108,864"):
        decode_image(ImageRef(str(_blank_bilevel_png(tmp_path / "big.png", 9000))))


def test_sixteen_bit_and_float_images_are_read_by_their_range(tmp_path):
    """Pillow's convert("RGB") clips: a 16-bit PNG at a quarter of full scale came out white,
    a float TIFF in [0, 1] black. Left half / right half of each test image: 1/4 and 3/4."""
    quarter, three_quarters = 0.25, 0.75
    left_right = np.empty((8, 16), np.float64)
    left_right[:, :8], left_right[:, 8:] = quarter, three_quarters
    Image.fromarray(np.rint(left_right * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(left_right.astype(np.float32)).save(tmp_path / "f32.tif")
    Image.fromarray(np.rint(left_right * 65535).astype(np.int32)).save(tmp_path / "i32.tif")
    for name, mode in (("g16.png", "I;16"), ("f32.tif", "F"), ("i32.tif", "I")):
        assert Image.open(tmp_path / name).mode == mode                    # the files are what they claim
        rgb = np.asarray(decode_image(ImageRef(str(tmp_path / name))), dtype=np.float64) / 255
        assert rgb.shape == (8, 16, 3)
        np.testing.assert_allclose(rgb[:, :8], quarter, atol=1 / 255, err_msg=name)
        np.testing.assert_allclose(rgb[:, 8:], three_quarters, atol=1 / 255, err_msg=name)
    # the same conversion for PIL images handed to the Encoder directly
    pixels = load_image(Image.open(tmp_path / "g16.png"), 16).numpy()
    assert abs(float(pixels.mean()) - (2 * 0.5 - 1)) < 0.02                 # mean of 1/4 and 3/4, in [-1, 1]


# -- item 5: the too-many-bad stop --------------------------------------------------------------
def test_too_many_bad_samples_stop_lists_the_files(tmp_path, tok):
    rows = _good_jpegs(tmp_path, 40)
    (tmp_path / "b0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "b2.png").write_text("text")
    rows += [{"image": "b0.jpg", "caption": "bad 0"}, {"image": "b1.jpg", "caption": "bad 1"},
             {"image": "b2.png", "caption": "bad 2"}]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    for workers in (0, 1):
        loader = build_pretrain_loader(path, tok, "vl", 43, img_size=16, max_text_len=10, max_bad_fraction=0.05,
                                       num_workers=workers)
        with pytest.raises(TooManyBadSamples, match=r"3 samples were unreadable") as e:
            list(loader)
        message = str(e.value)
        assert "b0.jpg is corrupt" in message and "b1.jpg does not exist" in message and "b2.png" in message
        assert all(f"m.jsonl line {n}" in message for n in (41, 42, 43))
    # the list is part of the loader's position (JSON, for the checkpoint) while the epoch runs
    loader = build_pretrain_loader(path, tok, "vl", 43, img_size=16, max_text_len=10, max_bad_fraction=0.5)
    list(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert len(state["epoch_bad_samples"]) == 3 and "batch" not in state["epoch_bad_samples"][0]
    resumed = build_pretrain_loader(path, tok, "vl", 43, img_size=16, max_text_len=10, max_bad_fraction=0.5)
    resumed.load_state_dict(state)
    assert resumed.epoch_bad_samples == loader.epoch_bad_samples


# -- item 6: typed fields --------------------------------------------------------------------------
WRONG_CAPTIONS = {"number": "12345", "boolean": "true", "NaN": "NaN", "object": '{"en": "a cat"}',
                  "list with a number": '["a cat", 5]', "null in a list": '[null]'}
WRONG_PATHS = {"null": "null", "list": '["a.jpg"]', "number": "7", "object": '{"path": "a.jpg"}'}
WRONG_IDS = {"boolean": "true", "NaN": "NaN", "float": "4.5", "object": '{"id": 1}', "list": "[1]"}


def _rows_with(field, raw_value):
    good = '{"image": "a.jpg", "caption": "a cat", "image_id": 1}'
    bad = {"caption": f'{{"image": "a.jpg", "caption": {raw_value}}}',
           "image": f'{{"image": {raw_value}, "caption": "a cat"}}',
           "image_id": f'{{"image": "a.jpg", "caption": "a cat", "image_id": {raw_value}}}'}[field]
    return good, bad


@pytest.mark.parametrize("field,kind,raw", [("caption", k, v) for k, v in WRONG_CAPTIONS.items()]
                         + [("image", k, v) for k, v in WRONG_PATHS.items()]
                         + [("image_id", k, v) for k, v in WRONG_IDS.items()])
def test_manifest_fields_of_the_wrong_type_are_rejected_naming_file_and_row(tmp_path, field, kind, raw):
    good, bad = _rows_with(field, raw)
    (tmp_path / "m.jsonl").write_text(f"{good}\n{bad}\n")
    with pytest.raises(DataError, match=rf"m.jsonl line 2: .*{field}"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.json").write_text(f"[{good},\n {bad}]")                  # ALBEF-style JSON list
    with pytest.raises(DataError, match=rf"m.json entry 1: .*{field}"):
        read_manifest(tmp_path / "m.json")


def test_captions_are_type_checked_for_the_text_stage_too(tmp_path, tok):
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": 12345}\n')
    with pytest.raises(DataError, match=r"m.jsonl line 1: caption 'caption' must be a string, got the number 12345"):
        build_pretrain_loader(tmp_path / "m.jsonl", tok, "text", 2)
    with pytest.raises(DataError, match="line 1"):
        read_texts(tmp_path / "m.jsonl")


def _karpathy(path, images):
    path.write_text(json.dumps({"images": [{"filename": "ok.jpg", "split": "test", "cocoid": 1,
                                            "sentences": [{"raw": "a cat"}]}] + images}))
    return path


@pytest.mark.parametrize("entry,reason", [
    ({"filename": "a.jpg", "split": "test", "sentences": "circle"}, "'sentences' must be a list"),
    ({"filename": "a.jpg", "split": "test", "sentences": [{"raw": 5}]}, r"sentences\[0\]: 'raw' must be a string"),
    ({"filename": "a.jpg", "split": "test", "sentences": [{"tokens": "a cat"}]}, "'tokens' must be a list"),
    ({"filename": "a.jpg", "split": "test", "sentences": [7]}, r"sentences\[0\]: sentence must be a string"),
    ({"filename": "a.jpg", "split": "test", "sentences": [{"imgid": 3}]}, "needs 'raw'"),
    ({"filename": None, "split": "test", "sentences": ["a cat"]}, "'filename' must be a string, got null"),
    ({"filename": "a.jpg", "split": 3, "sentences": ["a cat"]}, "'split' must be a string"),
    ({"filename": "a.jpg", "split": "train", "sentences": ["a cat"], "cocoid": [1]}, "'cocoid' must be"),
    (5, "expected a JSON object, got the number 5"),
])
def test_malformed_karpathy_entries_are_data_errors_naming_the_entry(tmp_path, entry, reason):
    path = _karpathy(tmp_path / "dataset_coco.json", [entry])
    with pytest.raises(DataError, match=rf"dataset_coco.json images\[1\].*{reason}"):
        read_karpathy(path, "test")


def test_karpathy_tokens_and_bare_strings_still_read(tmp_path):
    path = _karpathy(tmp_path / "k.json", [{"filename": "b.jpg", "split": "test", "imgid": 7,
                                            "sentences": [{"raw": None, "tokens": ["two", "dogs"]}, "a dog"]}])
    recs = read_karpathy(path, "test")
    assert [p.caption for p in recs.pairs] == ["a cat", "two dogs", "a dog"]
    assert [p.image_key for p in recs.pairs] == ["1", "7", "7"]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("caption", [12345, True, ["a cat"], {"en": "a cat"}, float("nan")])
def test_tar_json_captions_of_the_wrong_type_name_the_shard_and_sample(tmp_path, caption):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    shard = _tar(tmp_path / "s-000.tar", {"k0.jpg": jpeg.getvalue(), "k0.json": b'{"caption": "a cat"}',
                                          "k1.jpg": jpeg.getvalue(),
                                          "k1.json": json.dumps({"caption": caption}).encode()})
    with pytest.raises(DataError, match=r"s-000.tar sample 'k1': caption 'caption' of its .json member must be a "
                                        r"string"):
        read_tar_shards(shard)


def test_task_readers_check_types(tmp_path):
    (tmp_path / "n.json").write_text('{"identifier": "dev-1-0-0", "sentence": "two dogs", "label": "True"}\n'
                                     '{"identifier": "dev-1-0-1", "sentence": 5, "label": "False"}\n')
    with pytest.raises(DataError, match=r"n.json line 2: 'sentence' must be a string, got the number 5"):
        read_nlvr2(tmp_path / "n.json")
    (tmp_path / "n.json").write_text('{"identifier": "dev-1-0-0", "sentence": "two dogs", "label": 2}\n')
    with pytest.raises(DataError, match=r"n.json line 1: label must be True/False"):
        read_nlvr2(tmp_path / "n.json")
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"question_id": 1, "image_id": 42, "question": "What colour?"},
        {"question_id": "abc", "image_id": 43, "question": "How many?"}]}))
    with pytest.raises(DataError, match=r"q.json questions\[1\]: 'question_id' must be an integer"):
        read_vqav2(tmp_path / "q.json")
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 1, "image_id": 42, "question": 9}]}))
    with pytest.raises(DataError, match=r"questions\[0\]: 'question' must be a string"):
        build_task_dataset("vqa", tmp_path / "q.json", answer_vocab=["red"])


# -- item 6: encodings -----------------------------------------------------------------------------
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    latin1 = "a caf\xe9 on a street".encode("latin-1")
    cases = {
        "m.jsonl": (b'{"image": "a.jpg", "caption": "a cat"}\n\n{"image": "b.jpg", "caption": "' + latin1 + b'"}\n',
                    read_manifest, 3),
        "m.csv": b"image,caption\na.jpg,a cat\nb.jpg," + latin1 + b"\n",
        "m.tsv": b"image\tcaption\na.jpg\ta cat\nb.jpg\t" + latin1 + b"\n",
        "m.json": (b'[{"image": "a.jpg", "caption": "a cat"},\n {"image": "b.jpg",\n "caption": "' + latin1
                   + b'"}]', read_manifest, 3),
        "k.json": (b'{"images": [{"filename": "a.jpg", "split": "test",\n "sentences": ["' + latin1 + b'"]}]}',
                   lambda p: read_karpathy(p, "test"), 2),
        "n.jsonl": (b'{"identifier": "dev-1-0-0", "sentence": "' + latin1 + b'", "label": true}\n', read_nlvr2, 1),
        "corpus.txt": (b"first document\n\n" + latin1 + b"\n", read_texts, 3),
    }
    for name, case in cases.items():
        data, reader, line = case if isinstance(case, tuple) else (case, read_manifest, 3)
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name} line {line}: not valid UTF-8 \(byte 0xe9"):
            reader(tmp_path / name)
    # image-folder sidecar captions and tar text members
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.jpg")
    (folder / "x.txt").write_bytes(b"a cat\n" + latin1 + b"\n")
    with pytest.raises(DataError, match=r"x.txt line 2: not valid UTF-8"):
        read_image_folder(folder)
    jpeg = (folder / "x.jpg").read_bytes()
    shard = _tar(tmp_path / "s.tar", {"k0.jpg": jpeg, "k0.txt": latin1})
    with pytest.raises(DataError, match=r"s.tar member 'k0.txt' line 1: not valid UTF-8"):
        read_tar_shards(shard)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "m.csv").write_bytes(bom + "image,caption\na.jpg,a caf\u00e9\n".encode())
    (tmp_path / "m.tsv").write_bytes(bom + b"image\tcaption\na.jpg\ta cat\n")
    (tmp_path / "m.jsonl").write_bytes(bom + b'{"image": "a.jpg", "caption": "a cat"}\n')
    (tmp_path / "m.json").write_bytes(bom + b'[{"image": "a.jpg", "caption": "a cat"}]')
    for name, caption in (("m.csv", "a caf\u00e9"), ("m.tsv", "a cat"), ("m.jsonl", "a cat"), ("m.json", "a cat")):
        recs = read_manifest(tmp_path / name)
        assert [p.caption for p in recs.pairs] == [caption], name
        assert recs.pairs[0].image.path == str(tmp_path / "a.jpg")
    (tmp_path / "k.json").write_bytes(bom + json.dumps({"images": [{"filename": "a.jpg", "split": "test",
                                                                     "sentences": ["a cat"]}]}).encode())
    assert detect_format(tmp_path / "k.json") == "karpathy"
    assert [p.caption for p in open_records(tmp_path / "k.json", split="test").pairs] == ["a cat"]
    (tmp_path / "c.txt").write_bytes(bom + b"first\nsecond\n")
    assert read_texts(tmp_path / "c.txt") == ["first", "second"]


def test_format_detection_leaves_encoding_errors_to_the_reader(tmp_path):
    """detect_format peeks at a .json to tell Karpathy from a list; a non-UTF-8 byte there
    must reach the reader's error (file and line), not escape as a UnicodeDecodeError."""
    (tmp_path / "k.json").write_bytes(b'{"images": [{"filename": "a.jpg", "split": "test",\n'
                                      b' "sentences": ["caf\xe9"]}]}')
    assert detect_format(tmp_path / "k.json") == "karpathy"
    with pytest.raises(DataError, match=r"k.json line 2: not valid UTF-8"):
        open_records(tmp_path / "k.json", split="test")


def test_csv_errors_name_the_line(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,a cat\nb.jpg," + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"m.csv line 3: not valid CSV \(field larger than field limit"):
        read_manifest(tmp_path / "m.csv")
