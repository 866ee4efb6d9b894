"""Issue 20 items 7-9 and issue 21's exit contract: the retrieval index detects tampering and
stays inside its folder, tokenizer files are taken for what they are, the CLI answers every
user error with one line and exit status 2, and `vlmo_fast.errors` is that one contract."""
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from vlmo_fast.errors import EXIT_NONFINITE, EXIT_USER_ERROR, NonFiniteLoss, run_or_exit
from vlmo_fast.index import INDEX_FILE, RetrievalIndex
from vlmo_fast.io import CorruptFileError


# -- the retrieval index (issue 20, item 7) ------------------------------------------------------
@pytest.fixture
def index_dir(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"img{i}.png" for i in range(6)]
    return RetrievalIndex(emb, ids, "0123456789abcdef").save(tmp_path / "idx")


def _meta(directory: Path) -> dict:
    return json.loads((directory / INDEX_FILE).read_text())


def _write_meta(directory: Path, meta: dict) -> None:
    (directory / INDEX_FILE).write_text(json.dumps(meta))


def _embeddings_file(directory: Path) -> Path:
    return directory / _meta(directory)["embeddings_file"]


def test_index_records_hashes_and_loads_verified(index_dir):
    meta = _meta(index_dir)
    entry = meta["files"][meta["embeddings_file"]]
    assert entry["bytes"] == _embeddings_file(index_dir).stat().st_size and len(entry["sha256"]) == 64
    assert len(meta["ids_sha256"]) == 64
    index = RetrievalIndex.load(index_dir)
    assert index.ids == [f"img{i}.png" for i in range(6)]
    scores, rows = index.search(np.array(index.embeddings[2]), k=1)
    assert rows.item() == 2 and scores.item() == pytest.approx(1.0, abs=1e-6)


def test_index_edited_embedding_row_is_detected(index_dir):
    path = _embeddings_file(index_dir)
    data = bytearray(path.read_bytes())
    data[-4:] = struct.pack("<f", 0.5)   # one value of the last row, same size
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"{path.name}: SHA-256 differs"):
        RetrievalIndex.load(index_dir)
    # the trusted fast path skips the hashes (and still reads the array)
    assert RetrievalIndex.load(index_dir, verify=False).embeddings[-1, -1] == 0.5


def test_index_reordered_ids_are_detected(index_dir):
    meta = _meta(index_dir)
    meta["ids"] = meta["ids"][::-1]
    _write_meta(index_dir, meta)
    with pytest.raises(CorruptFileError, match=r"index.json: its ids do not match ids_sha256"):
        RetrievalIndex.load(index_dir)


@pytest.mark.parametrize("verify", [True, False])
def test_index_truncated_embeddings_name_the_file(index_dir, verify):
    path = _embeddings_file(index_dir)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptFileError, match=rf"{path.name}: has \d+ bytes.*truncated"):
        RetrievalIndex.load(index_dir, verify=verify)


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_index_files_stay_inside_the_folder(index_dir, tmp_path, escape):
    """An index.json naming a file outside its folder is refused even when that file is a
    perfect copy (same size and hash): an index must never make a reader open files elsewhere."""
    meta = _meta(index_dir)
    original = meta["embeddings_file"]
    outside = tmp_path / "elsewhere" / "stolen.npy"
    outside.parent.mkdir()
    shutil.copy(index_dir / original, outside)
    if escape == "absolute":
        name = str(outside)
    elif escape == "dotdot":
        name = "../elsewhere/stolen.npy"
    else:
        name = "embeddings-link.npy"
        os.symlink(outside, index_dir / name)
    meta["files"] = {name: meta["files"][original]}
    meta["embeddings_file"] = name
    _write_meta(index_dir, meta)
    expected = "outside the index folder" if escape == "symlink" else "relative names inside its folder"
    for verify in (True, False):
        with pytest.raises(CorruptFileError, match=expected):
            RetrievalIndex.load(index_dir, verify=verify)


@pytest.mark.parametrize("damage", ["not json", "no ids", "ids not strings", "no files record"])
def test_damaged_index_json_names_it(index_dir, damage):
    meta = _meta(index_dir)
    if damage == "not json":
        (index_dir / INDEX_FILE).write_text('{"format": "vlmo_fast.retrieval_index", ')
    else:
        if damage == "no ids":
            del meta["ids"]
        elif damage == "ids not strings":
            meta["ids"] = list(range(len(meta["ids"])))
        else:
            del meta["files"]
        _write_meta(index_dir, meta)
    with pytest.raises(CorruptFileError, match=r"index.json: "):
        RetrievalIndex.load(index_dir, verify=False)


def test_version_1_index_opens_only_unverified_and_upgrades(index_dir, tmp_path):
    meta = _meta(index_dir)
    for key in ("files", "ids_sha256"):
        del meta[key]
    meta["version"] = 1
    _write_meta(index_dir, meta)
    with pytest.raises(CorruptFileError, match="version 1 records no hashes.*verify=False"):
        RetrievalIndex.load(index_dir)
    old = RetrievalIndex.load(index_dir, verify=False)
    old.save(tmp_path / "upgraded")
    assert RetrievalIndex.load(tmp_path / "upgraded").ids == old.ids


# -- tokenizer sources (issue 20, item 8) ------------------------------------------------------
BERT_TOKENS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "cir"]


def test_vocab_file_under_another_name_loads_as_a_vocabulary(tmp_path):
    from vlmo_fast.data import build_tokenizer
    (tmp_path / "my-vocab.txt").write_text("\n".join(BERT_TOKENS) + "\n")
    tok = build_tokenizer(str(tmp_path / "my-vocab.txt"))
    assert tok.get_vocab() == {t: i for i, t in enumerate(BERT_TOKENS)}
    ids, _ = tok.encode_batch(["A red circles"], max_len=6)
    assert ids[0].tolist() == [3, 6, 7, 8, 9, 4]


def test_training_on_a_corpus_must_be_explicit(tmp_path):
    from vlmo_fast.data import build_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle above a blue square\ntwo green triangles\n")
    with pytest.raises(ValueError, match=rf"not a vocabulary: line 1 .*write train:{corpus}"):
        build_tokenizer(corpus)
    tok = build_tokenizer(f"train:{corpus}", vocab_size=200)
    assert {"circle", "triangles", "[MASK]"} <= set(tok.get_vocab())
    with pytest.raises(FileNotFoundError, match="corpus .*nope.txt does not exist"):
        build_tokenizer(f"train:{tmp_path / 'nope.txt'}")
    with pytest.raises(ValueError, match="names no corpus"):
        build_tokenizer("train:")


def test_ambiguous_tokenizer_files_say_what_to_write(tmp_path):
    from vlmo_fast.data import build_tokenizer
    from vlmo_fast.data.tokenizer import resolve_tokenizer_source
    words = tmp_path / "words.txt"   # one token per line, but no special tokens: a word list?
    words.write_text("red\ngreen\nblue\n")
    with pytest.raises(ValueError, match=r"no line \[CLS\] / \[SEP\] / \[MASK\] / \[PAD\].*train:"):
        build_tokenizer(words)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a red circle\n")
    with pytest.raises(ValueError, match="folder without vocab.txt.*train:"):
        build_tokenizer(tmp_path / "texts")
    assert resolve_tokenizer_source(f"train:{tmp_path / 'texts'}") == ("train", tmp_path / "texts")
    assert resolve_tokenizer_source("embedded") == ("embedded", None)


# -- the CLI (issue 20, item 9) ------------------------------------------------------------------
def _cli(argv, capsys):
    """(exit status, stderr) of `vlmo-fast argv` run in-process."""
    from vlmo_fast.cli import main
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """Weights and config, no tokenizer beside them."""
    from vlmo_fast.model import VLMo
    directory = tmp_path_factory.mktemp("bare") / "ckpt"
    VLMo.from_preset("tiny", vocab_size=100).save_pretrained(directory)
    return directory


def test_texts_without_vocab_exit_2(bare_checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(bare_checkpoint), "--no-progress"]
    status, err = _cli(["encode", *common, "--texts", "a red circle", "--out", str(tmp_path / "t.npy")], capsys)
    assert status == 2 and "has no vocab.txt" in _one_error_line(err)
    status, err = _cli(["search", *common, "--index", str(tmp_path), "--text", "a red circle"], capsys)
    assert status == 2 and "has no vocab.txt" in _one_error_line(err)
    assert not (tmp_path / "t.npy").exists()


def test_convert_to_pth_never_overwrites_silently(bare_checkpoint, tmp_path, capsys):
    import torch
    target = tmp_path / "ref.pth"
    target.write_bytes(b"someone's file")
    status, err = _cli(["convert", "--from", str(bare_checkpoint), "--to", str(target)], capsys)
    assert status == 2 and "exists; pass --overwrite" in _one_error_line(err)
    assert target.read_bytes() == b"someone's file"
    (tmp_path / "folder").mkdir()
    status, err = _cli(["convert", "--from", str(bare_checkpoint), "--to", str(tmp_path / "folder")], capsys)
    assert status == 2 and "is a folder" in _one_error_line(err)
    status, _ = _cli(["convert", "--from", str(bare_checkpoint), "--to", str(target), "--overwrite"], capsys)
    assert status == 0 and "state_dict" in torch.load(target, weights_only=True)


def _decompression_bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit grayscale PNG of side x side pixels (~50 KB on disk, 400 M pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000   # filter byte + packed bits, 1000 rows
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(rows) for _ in range(side // 1000)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_encode_decompression_bomb_exits_2(bare_checkpoint, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _decompression_bomb_png(bomb)
    assert bomb.stat().st_size < 100_000
    status, err = _cli(["encode", "--checkpoint", str(bare_checkpoint), "--no-progress", "--images", str(bomb),
                        "--out", str(tmp_path / "i.npy")], capsys)
    assert status == 2
    assert "pixels" in _one_error_line(err)


def test_search_refuses_a_tampered_index_with_one_line(bare_checkpoint, index_dir, tmp_path, capsys):
    path = _embeddings_file(index_dir)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    img = tmp_path / "q.png"
    from PIL import Image
    Image.new("RGB", (16, 16)).save(img)
    status, err = _cli(["search", "--checkpoint", str(bare_checkpoint), "--no-progress", "--index", str(index_dir),
                        "--image", str(img)], capsys)
    assert status == 2 and "SHA-256 differs" in _one_error_line(err)


# -- the exit contract (issue 21) ----------------------------------------------------------------
def _raise(exc):
    raise exc


def test_run_or_exit_passes_results_through():
    assert run_or_exit(lambda a, b=0: a + b, 2, b=3) == 5


@pytest.mark.parametrize("exc", [
    ValueError("bad --lr -1"), FileNotFoundError("no such file: x.json"),
    FileExistsError("out exists"), IsADirectoryError("out is a folder"), NotADirectoryError("not a folder"),
    PermissionError("cannot read x"),
], ids=lambda e: type(e).__name__)
def test_user_errors_exit_2_with_one_line(exc, capsys):
    with pytest.raises(SystemExit) as info:
        run_or_exit(_raise, exc)
    assert info.value.code == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == f"error: {exc}\n"   # the format eval/runner.py printed


def test_package_error_types_are_user_errors(capsys):
    from PIL import Image

    from vlmo_fast.checkpoint import CheckpointMismatchError
    from vlmo_fast.data import DataError
    for exc in (DataError("m.jsonl row 3: caption is a number"), CorruptFileError("w.bin", "truncated"),
                CheckpointMismatchError("missing: blocks.0.attn.qkv.weight"),
                Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit")):
        with pytest.raises(SystemExit) as info:
            run_or_exit(_raise, exc)
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {exc}\n"


def test_type_errors_of_checks_are_user_errors_but_bugs_keep_their_traceback(capsys):
    """A TypeError from one of the package's checks (a wrongly typed config value) exits 2 with
    one line; a TypeError from a failed operation (a call with a missing argument, as a bug in
    a job would raise) is not reported as the user's fault: its traceback goes through."""
    from vlmo_fast.config import VLMoConfig
    from vlmo_fast.training.common import to_device
    with pytest.raises(SystemExit) as info:
        run_or_exit(VLMoConfig.preset, "tiny", dim="x")
    assert info.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        run_or_exit(to_device, {})


def test_multiline_message_is_one_line(capsys):
    with pytest.raises(SystemExit):
        run_or_exit(_raise, ValueError("checkpoint does not fit:\n  missing: a\n  unexpected: b"))
    assert capsys.readouterr().err == "error: checkpoint does not fit: | missing: a | unexpected: b\n"


def test_nonfinite_loss_exits_3(capsys):
    assert issubclass(NonFiniteLoss, RuntimeError)
    with pytest.raises(SystemExit) as info:
        run_or_exit(_raise, NonFiniteLoss("non-finite loss at step 7"))
    assert info.value.code == EXIT_NONFINITE == 3
    assert capsys.readouterr().err == "error: non-finite loss at step 7\n"


def test_bugs_keep_their_traceback(monkeypatch):
    for exc in (RuntimeError("bug"), KeyError("k"), AttributeError("x"), OSError(28, "No space left on device")):
        with pytest.raises(type(exc)):
            run_or_exit(_raise, exc)
    monkeypatch.setenv("VLMO_FAST_TRACEBACK", "1")   # debugging: user errors keep theirs too
    with pytest.raises(ValueError):
        run_or_exit(_raise, ValueError("bad"))


@pytest.mark.parametrize("row, message", [
    ({"image": None}, "must be a string"),
    ({"image": ["a.png", "b.png"]}, "must be a string"),
    ({"image": "b.png", "id": True}, "must be a string or an integer"),
    ({"image": "b.png", "id": {"x": 1}}, "must be a string or an integer"),
])
def test_index_manifest_fields_are_typed(tmp_path, row, message):
    """`vlmo-fast index --images manifest.jsonl`: a null/list path or a boolean/dict id was
    str()-ed into 'None' / "['a.png', ...]" / 'True' (issue 20 item 6, for the index's reader)."""
    from vlmo_fast.data.formats import DataError
    from vlmo_fast.index import read_image_manifest
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "a.png"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        read_image_manifest(manifest)


def test_index_manifest_not_utf8_names_the_file(tmp_path):
    from vlmo_fast.data.formats import DataError
    from vlmo_fast.index import read_image_manifest
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbfimage,id\na.png,caf\xe9\n")
    with pytest.raises(DataError, match="m.csv.*UTF-8"):
        read_image_manifest(manifest)
