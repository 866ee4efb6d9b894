"""RetrievalIndex: build from folders/manifests, save/load (mmap), search, model mismatch,
empty corpora, and nothing half-written when a build dies."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmo_fast.index import (INDEX_FILE, IndexModelMismatchError, RetrievalIndex,
                             read_image_manifest)
from vlmo_fast.inference import Encoder
from vlmo_fast.model import VLMo

from test_inference import WordTokenizer


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", vocab_size=100, max_text_len=8)
    return Encoder(model, WordTokenizer(), batch_size=2, progress=False)


@pytest.fixture
def folder(tmp_path, encoder):
    size = encoder.config.img_size
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(["b.png", "a.png", "sub/c.jpg", "d.png", "e.png"]):
        arr = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_build_save_load_search(encoder, folder, tmp_path):
    mem = RetrievalIndex.build(encoder, folder)
    assert mem.ids == ["a.png", "b.png", "d.png", "e.png", "sub/c.jpg"]   # sorted, relative
    disk = RetrievalIndex.build(encoder, folder, directory=tmp_path / "idx")
    assert isinstance(disk.embeddings, np.memmap)
    np.testing.assert_allclose(np.asarray(disk.embeddings), mem.embeddings, atol=1e-6)
    loaded = RetrievalIndex.load(tmp_path / "idx", encoder=encoder)
    assert loaded.ids == mem.ids and loaded.dim == encoder.embed_dim and len(loaded) == 5
    # an image finds itself first, with cosine 1
    hits = loaded.search_image(encoder, [folder / "d.png"], k=3)[0]
    assert hits[0][0] == "d.png" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]
    # text search agrees with brute force; chunked scan agrees with one block
    q = encoder.embed_texts(["a red square", "green"])
    scores, idx = loaded.search(q, k=4)
    ref = (q @ torch.from_numpy(mem.embeddings).T).topk(4, dim=1)
    torch.testing.assert_close(scores, ref.values)
    assert torch.equal(idx, ref.indices)
    s2, i2 = loaded.search(q, k=4, chunk_rows=2)
    torch.testing.assert_close(s2, scores)
    assert torch.equal(i2, idx)
    hits = loaded.search_text(encoder, ["a red square", "green"], k=4)
    assert [[h[0] for h in row] for row in hits] == [[mem.ids[i] for i in row] for row in idx.tolist()]
    assert len(loaded.search_text(encoder, ["green"], k=50)[0]) == 5   # k clamps to the corpus
    # in-memory index saved explicitly loads the same
    mem.save(tmp_path / "idx2")
    np.testing.assert_array_equal(np.asarray(RetrievalIndex.load(tmp_path / "idx2").embeddings),
                                  mem.embeddings)


def test_manifests(encoder, folder, tmp_path):
    (folder / "list.txt").write_text("a.png\nsub/c.jpg\n\n")
    paths, ids = read_image_manifest(folder / "list.txt")
    assert ids == ["a.png", "sub/c.jpg"] and paths[1] == folder / "sub" / "c.jpg"
    (folder / "m.csv").write_text("id,image,caption\nx,a.png,one\ny,b.png,two\nx2,a.png,three\n")
    assert read_image_manifest(folder / "m.csv")[1] == ["x", "y"]   # a.png kept once
    (folder / "m.jsonl").write_text('{"image": "b.png"}\n{"image_path": "d.png", "id": "dd"}\n')
    assert read_image_manifest(folder / "m.jsonl")[1] == ["b.png", "dd"]
    (folder / "m.json").write_text(json.dumps([{"image": "e.png", "caption": "c1"},
                                               {"image": "e.png", "caption": "c2"}]))
    index = RetrievalIndex.build(encoder, folder / "m.json")
    assert index.ids == ["e.png"]
    (folder / "bad.jsonl").write_text('{"caption": "no image"}\n')
    with pytest.raises(ValueError, match="no image path"):
        read_image_manifest(folder / "bad.jsonl")
    (folder / "missing.txt").write_text("a.png\nnope.png\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image_manifest(folder / "missing.txt")


def test_empty_corpus(encoder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        RetrievalIndex.build(encoder, tmp_path / "empty", directory=tmp_path / "idx")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty corpus"):
        RetrievalIndex.build(encoder, tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="empty corpus"):
        RetrievalIndex.build(encoder, [])
    assert not (tmp_path / "idx").exists()


def test_other_model_is_refused(encoder, folder, tmp_path):
    RetrievalIndex.build(encoder, folder, directory=tmp_path / "idx")
    model = VLMo.from_preset("tiny", vocab_size=100, max_text_len=8)
    model.load_state_dict(encoder.model.state_dict())
    assert Encoder(model, progress=False).fingerprint == encoder.fingerprint  # same weights: same model
    with torch.no_grad():
        model.itc.image_proj.weight[0, 0] += 1e-3   # fine-tuned a little: another model
    same_size = Encoder(model, WordTokenizer(), progress=False)
    with pytest.raises(IndexModelMismatchError, match="built with model"):
        RetrievalIndex.load(tmp_path / "idx", encoder=same_size)
    other_size = Encoder(VLMo.from_preset("tiny", vocab_size=100, max_text_len=8, dim=32),
                         WordTokenizer(), progress=False)
    index = RetrievalIndex.load(tmp_path / "idx")
    with pytest.raises(IndexModelMismatchError, match="32-d"):
        index.search_text(other_size, ["a"])
    with pytest.raises(ValueError, match=r"queries must be \[Q, 64\]"):
        index.search(torch.zeros(1, 32))


class Dying:
    """Wraps an Encoder; its image stream dies after the first batch (a killed build)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def iter_image_embeddings(self, images):
        for i, batch in enumerate(self.encoder.iter_image_embeddings(images)):
            if i == 1:
                raise KeyboardInterrupt("killed")
            yield batch


def test_nothing_half_written(encoder, folder, tmp_path):
    target = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        RetrievalIndex.build(Dying(encoder), folder, directory=target)
    assert not (target / INDEX_FILE).exists()
    assert [p.name for p in target.iterdir()] == []   # the temporary was removed
    first = RetrievalIndex.build(encoder, folder, directory=target)
    old_files = sorted(p.name for p in target.iterdir())
    with pytest.raises(KeyboardInterrupt):
        RetrievalIndex.build(Dying(encoder), [folder / "a.png", folder / "b.png", folder / "d.png"],
                             directory=target)
    # the previous index is intact and alone
    assert sorted(p.name for p in target.iterdir()) == old_files
    again = RetrievalIndex.load(target, encoder=encoder)
    assert again.ids == first.ids
    # a successful rebuild replaces the embeddings file
    RetrievalIndex.build(encoder, [folder / "a.png"], directory=target)
    files = sorted(p.name for p in target.iterdir())
    assert len(files) == 2 and INDEX_FILE in files and files != old_files
    assert RetrievalIndex.load(target).ids == [str(folder / "a.png")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an index"):
        RetrievalIndex.build(encoder, folder, directory=tmp_path / "other")
