"""FaissRetrievalIndex: the exact index's API and integrity rules over FAISS flat / IVF /
IVF-PQ / HNSW, with recall measured against the exact scan."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

faiss = pytest.importorskip("faiss")

from vlmo_fast.index import INDEX_FILE, IndexModelMismatchError, RetrievalIndex  # noqa: E402
from vlmo_fast.index_faiss import KINDS, FaissRetrievalIndex, factory_for  # noqa: E402
from vlmo_fast.inference import Encoder  # noqa: E402
from vlmo_fast.io import CorruptFileError  # noqa: E402
from vlmo_fast.model import VLMo  # noqa: E402

from test_inference import WordTokenizer  # noqa: E402


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """L2-normalised points around `clusters` centres: the structure real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    x = clustered(3000)
    return x, [f"img{i:05d}" for i in range(len(x))]


def test_flat_equals_the_exact_index(corpus):
    x, ids = corpus
    flat = FaissRetrievalIndex.from_embeddings(x, ids, "m0", kind="flat")
    exact = RetrievalIndex(x, ids, "m0")
    q = clustered(20, seed=5)
    s_f, i_f = flat.search(q, k=10)
    s_e, i_e = exact.search(q, k=10)
    assert s_f.dtype == torch.float32 and i_f.dtype == torch.int64 and i_f.shape == (20, 10)
    assert torch.equal(i_f, i_e)
    torch.testing.assert_close(s_f, s_e, atol=1e-5, rtol=0)
    assert flat.measure_recall(k=10, sample=100) == 1.0


@pytest.mark.parametrize("kind, floor", [("ivf", 0.9), ("hnsw", 0.9), ("ivfpq", 0.3)])
def test_approximate_kinds_reach_their_recall(corpus, kind, floor):
    x, ids = corpus
    index = FaissRetrievalIndex.from_embeddings(x, ids, "m0", kind=kind)
    assert index.factory == factory_for(kind, len(x), x.shape[1])
    recall = index.measure_recall(k=10, sample=200)
    assert floor <= recall <= 1.0
    if kind == "ivfpq":
        # PQ scores are approximate; exact re-scoring of 8 x k candidates recovers most of it,
        # and the scores it returns are the exact cosines of the rows it returns
        reranked = index.measure_recall(k=10, sample=200, rerank=8)
        assert reranked > recall
        s, i = index.search(x[:5], k=10, rerank=8)
        torch.testing.assert_close(s, torch.from_numpy(np.einsum("qd,qkd->qk", x[:5], x[i.numpy()])),
                                   atol=1e-5, rtol=0)
        assert index.memory_bytes < x.nbytes / 2   # compressed: 4 bytes per vector here
    if kind == "ivf":
        # visiting every list is the exact scan
        full = index.faiss_index.nlist
        assert index.measure_recall(k=10, sample=200, nprobe=full) == 1.0
        assert index.measure_recall(k=10, sample=200, nprobe=1) < 1.0


def test_factory_sizes_follow_the_corpus():
    assert factory_for("flat", 10, 8) == "Flat"
    assert factory_for("hnsw", 10, 8) == "HNSW32,Flat"
    assert factory_for("ivf", 1_000_000, 256) == "IVF4096,Flat"
    assert factory_for("ivfpq", 1_000_000, 256) == "IVF4096,PQ32x8"
    assert factory_for("ivfpq", 3000, 32) == "IVF64,PQ4x6"       # few points: fewer lists, 6-bit codes
    assert factory_for("IVF16,Flat", 3000, 32) == "IVF16,Flat"   # a factory string is kept
    assert set(KINDS) == {"flat", "ivf", "ivfpq", "hnsw"}


def test_save_load_round_trip_and_exact_backend_opens_it(corpus, tmp_path):
    x, ids = corpus
    index = FaissRetrievalIndex.from_embeddings(x, ids, "m0", kind="hnsw", ef_search=64,
                                                model_config={"dim": 32})
    q = clustered(7, seed=9)
    s0, i0 = index.search(q, k=5)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / INDEX_FILE).read_text())
    assert meta["backend"] == "faiss" and meta["faiss"]["factory"] == "HNSW32,Flat"
    assert set(meta["files"]) == {meta["embeddings_file"], meta["faiss"]["file"]}
    loaded = FaissRetrievalIndex.load(tmp_path / "idx")
    assert loaded.ids == ids and loaded.search_params["ef_search"] == 64
    assert isinstance(loaded.embeddings, np.memmap)
    s1, i1 = loaded.search(q, k=5)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(s0, s1)
    # the same folder is an exact index too (its embeddings and ids)
    exact = RetrievalIndex.load(tmp_path / "idx", backend="exact")
    assert type(exact) is RetrievalIndex
    assert torch.equal(exact.search(q, k=5)[1], FaissRetrievalIndex.from_index(exact).search(q, k=5)[1])
    # saving again replaces the files; nothing of the old build stays
    loaded.add(clustered(3, seed=11), ["new0", "new1", "new2"])
    loaded.save(tmp_path / "idx")
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(names) == 3 and len(FaissRetrievalIndex.load(tmp_path / "idx")) == len(ids) + 3


def test_damage_is_refused_naming_the_file(corpus, tmp_path):
    x, ids = corpus
    FaissRetrievalIndex.from_embeddings(x[:500], ids[:500], "m0", kind="flat").save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / INDEX_FILE).read_text())
    faiss_file = tmp_path / "idx" / meta["faiss"]["file"]
    data = bytearray(faiss_file.read_bytes())
    data[-5] ^= 0xFF                                   # same size, one byte flipped
    faiss_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=meta["faiss"]["file"]):
        FaissRetrievalIndex.load(tmp_path / "idx")
    faiss_file.write_bytes(bytes(data[:-100]))         # truncated: caught even without hashing
    with pytest.raises(CorruptFileError, match="bytes"):
        FaissRetrievalIndex.load(tmp_path / "idx", verify=False)
    # an exact index folder is not silently opened as a FAISS one
    RetrievalIndex(x[:50], ids[:50], "m0").save(tmp_path / "exact")
    with pytest.raises(ValueError, match="not a faiss index .* says backend 'exact'"):
        FaissRetrievalIndex.load(tmp_path / "exact")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an index"):
        FaissRetrievalIndex.from_embeddings(x[:50], ids[:50], "m0").save(tmp_path / "other")


def test_bad_input_is_named(corpus):
    x, ids = corpus
    with pytest.raises(ValueError, match="ids"):
        FaissRetrievalIndex.from_embeddings(x[:10], ids[:9], "m0")
    with pytest.raises(ValueError, match="unique"):
        FaissRetrievalIndex.from_embeddings(x[:2], ["a", "a"], "m0")
    with pytest.raises(ValueError, match="kind 'IVFX'"):
        FaissRetrievalIndex.from_embeddings(x[:10], ids[:10], "m0", kind="IVFX")
    with pytest.raises(ValueError, match="IVF lists"):
        FaissRetrievalIndex.from_embeddings(x[:10], ids[:10], "m0", kind="IVF64,Flat")
    with pytest.raises(TypeError, match="unknown search parameter"):
        FaissRetrievalIndex.from_embeddings(x[:10], ids[:10], "m0", n_probe=3)
    index = FaissRetrievalIndex.from_embeddings(x[:100], ids[:100], "m0", kind="ivf")
    with pytest.raises(ValueError, match=r"queries must be \[N, 32\]"):
        index.search(np.zeros((2, 31), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="nprobe"):
        index.search(x[:1], nprobe=0)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], [ids[0]])
    # more than the corpus: k is clipped, like the exact index
    assert index.search(x[:1], k=500, nprobe=index.faiss_index.nlist)[1].shape == (1, 100)


def test_places_faiss_cannot_fill_are_marked_and_dropped(corpus):
    x, ids = corpus
    index = FaissRetrievalIndex.from_embeddings(x, ids, "m0", kind="IVF64,Flat")
    lists = faiss.extract_index_ivf(index.faiss_index).invlists
    smallest = min(range(64), key=lists.list_size)
    # one probed list that holds fewer than k rows leaves places empty
    k = lists.list_size(smallest) + 5
    centroid = index.faiss_index.quantizer.reconstruct(smallest)[None]
    scores, rows = index.search(centroid, k=k, nprobe=1)
    assert (rows[0, -5:] == -1).all() and torch.isinf(scores[0, -5:]).all()
    assert len(index._results(scores, rows)[0]) == k - 5


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", vocab_size=100, max_text_len=8)
    return Encoder(model, WordTokenizer(), batch_size=4, progress=False)


def write_photos(root, count: int, size: int = 32, seed: int = 1, prefix: str = ""):
    """`count` random RGB PNGs {prefix}{i}.png in a new folder `root`."""
    root.mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()).save(root / f"{prefix}{i}.png")
    return root


def test_build_from_images_and_search_with_the_encoder(encoder, tmp_path):
    root = write_photos(tmp_path / "photos", 6, encoder.config.img_size)
    index = FaissRetrievalIndex.build(encoder, root, directory=tmp_path / "idx", kind="flat")
    loaded = FaissRetrievalIndex.load(tmp_path / "idx", encoder=encoder)
    hits = loaded.search_image(encoder, [root / "3.png"], k=3)[0]
    assert hits[0][0] == "3.png" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    exact = RetrievalIndex.build(encoder, root)
    texts = ["a red square", "green"]
    got, want = loaded.search_text(encoder, texts, k=4), exact.search_text(encoder, texts, k=4)
    assert [[h[0] for h in row] for row in got] == [[h[0] for h in row] for row in want]
    np.testing.assert_allclose([[h[1] for h in row] for row in got],
                               [[h[1] for h in row] for row in want], atol=1e-5)
    torch.manual_seed(123)   # other weights, other fingerprint
    other = Encoder(VLMo.from_preset("tiny", vocab_size=100, max_text_len=8), WordTokenizer(), progress=False)
    with pytest.raises(IndexModelMismatchError):
        FaissRetrievalIndex.load(tmp_path / "idx", encoder=other)
    assert index.model_hash == encoder.fingerprint


# -- one API: RetrievalIndex.build / load choose the backend ---------------------------------------
def test_retrieval_index_dispatches_on_the_backend(encoder, tmp_path):
    root = write_photos(tmp_path / "photos", 5, encoder.config.img_size, seed=2)
    built = RetrievalIndex.build(encoder, root, directory=tmp_path / "idx", backend="faiss", kind="hnsw",
                                 ef_search=16, rerank=2)
    assert isinstance(built, FaissRetrievalIndex) and built.factory == "HNSW32,Flat"
    assert built.search_params == {"nprobe": 32, "ef_search": 16, "rerank": 2}
    loaded = RetrievalIndex.load(tmp_path / "idx", encoder=encoder)   # index.json says faiss
    assert type(loaded) is FaissRetrievalIndex and loaded.search_params["ef_search"] == 16
    exact = RetrievalIndex.load(tmp_path / "idx", backend="exact")
    assert type(exact) is RetrievalIndex and exact.ids == loaded.ids
    q = encoder.embed_texts(["a red square"])
    assert torch.equal(loaded.search(q, k=5)[1], exact.search(q, k=5)[1])
    # an exact rebuild in the same folder leaves no FAISS file behind; FAISS leftovers of a
    # killed first build do not make a folder "not an index"
    RetrievalIndex.build(encoder, root, directory=tmp_path / "idx")
    assert [p.name for p in (tmp_path / "idx").glob("faiss-*")] == []
    assert json.loads((tmp_path / "idx" / INDEX_FILE).read_text())["backend"] == "exact"
    assert type(RetrievalIndex.load(tmp_path / "idx")) is RetrievalIndex
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "faiss-0123456789ab.index").write_bytes(b"partial")
    RetrievalIndex.build(encoder, root, directory=tmp_path / "killed", backend="faiss")
    assert len(list((tmp_path / "killed").glob("faiss-*"))) == 1
    # bad names and options are named before any embedding
    with pytest.raises(ValueError, match=r"backend must be one of \('exact', 'faiss'\), got 'annoy'"):
        RetrievalIndex.build(encoder, root, backend="annoy")
    with pytest.raises(ValueError, match="backend must be one of"):
        RetrievalIndex.load(tmp_path / "idx", backend="FAISS")
    with pytest.raises(TypeError, match="backend='faiss'"):
        RetrievalIndex.build(encoder, root, kind="ivf")
    with pytest.raises(ValueError, match="nprobe must be an int >= 1, got 0"):
        RetrievalIndex.build(encoder, root, backend="faiss", kind="ivf", nprobe=0)
    with pytest.raises(ValueError, match="IVF lists"):
        RetrievalIndex.build(encoder, root, backend="faiss", kind="IVF64,Flat")
    meta = json.loads((tmp_path / "idx" / INDEX_FILE).read_text())
    (tmp_path / "idx" / INDEX_FILE).write_text(json.dumps(dict(meta, backend="scann")))
    with pytest.raises(CorruptFileError, match="backend 'scann'"):
        RetrievalIndex.load(tmp_path / "idx")


def test_tampered_faiss_folder_is_refused_through_retrieval_index(corpus, tmp_path):
    x, ids = corpus
    FaissRetrievalIndex.from_embeddings(x[:400], ids[:400], "m0", kind="ivf").save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / INDEX_FILE).read_text())
    faiss_file = tmp_path / "idx" / meta["faiss"]["file"]
    original = faiss_file.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x10
    faiss_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"{faiss_file.name}: SHA-256 differs"):
        RetrievalIndex.load(tmp_path / "idx")
    faiss_file.write_bytes(original)
    # a record whose FAISS file is not among the hashed files is refused before any read
    (tmp_path / "idx" / INDEX_FILE).write_text(json.dumps(
        dict(meta, files={meta["embeddings_file"]: meta["files"][meta["embeddings_file"]]})))
    with pytest.raises(CorruptFileError, match="does not record the FAISS file"):
        RetrievalIndex.load(tmp_path / "idx", verify=False)
    (tmp_path / "idx" / INDEX_FILE).write_text(json.dumps(
        dict(meta, faiss=dict(meta["faiss"], search_params={"nprobe": -1}))))
    with pytest.raises(CorruptFileError, match="faiss.search_params: nprobe"):
        RetrievalIndex.load(tmp_path / "idx")


def test_cli_faiss_index_and_search(tmp_path, capsys):
    from test_cli import exit_status
    from test_eval_runner import make_checkpoint, tiny_tokenizer

    from vlmo_fast.cli import main
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer())
    photos = write_photos(tmp_path / "photos", 8, seed=3, prefix="p")
    common = ["--checkpoint", str(ckpt), "--no-progress"]
    # 8 images: factory_for gives one IVF list, so the ivf kind is the exact answer here
    assert main(["index", *common, "--images", str(photos), "--out", str(tmp_path / "idx"),
                 "--faiss", "ivf", "--nprobe", "4", "--rerank", "2"]) == 0
    assert "FAISS IVF1,Flat" in capsys.readouterr().out
    loaded = RetrievalIndex.load(tmp_path / "idx")
    assert isinstance(loaded, FaissRetrievalIndex) and loaded.search_params["nprobe"] == 4
    assert main(["search", *common, "--index", str(tmp_path / "idx"), "--image", str(photos / "p5.png"),
                 "-k", "3", "--nprobe", "1", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert hits[0]["id"] == "p5.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 3
    assert main(["search", *common, "--index", str(tmp_path / "idx"), "--text", "a red circle"]) == 0
    assert "a red circle:" in capsys.readouterr().out

    assert exit_status(["search", *common, "--index", str(tmp_path / "idx"), "--text", "a", "--nprobe", "0"]) == 2
    assert "nprobe must be an int >= 1, got 0" in capsys.readouterr().err
    assert exit_status(["index", *common, "--images", str(photos), "--out", str(tmp_path / "x"),
                   "--nprobe", "4"]) == 2
    assert "--nprobe: search settings of a FAISS index; add --faiss KIND" in capsys.readouterr().err
    assert main(["index", *common, "--images", str(photos), "--out", str(tmp_path / "exact")]) == 0
    capsys.readouterr()
    assert exit_status(["search", *common, "--index", str(tmp_path / "exact"), "--text", "a",
                   "--ef-search", "8"]) == 2
    assert "is an exact index" in capsys.readouterr().err
    assert exit_status(["index", *common, "--images", str(photos), "--out", str(tmp_path / "y"),
                   "--faiss", "IVF99,Flat"]) == 2
    assert "99 IVF lists but the corpus only 8" in capsys.readouterr().err
