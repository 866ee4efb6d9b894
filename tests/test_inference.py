"""Encoder: embeddings equal the model's ITC features, batching, file inputs, bad input."""
import warnings

import pytest
import torch
from PIL import Image

from vlmo_fast.inference import Encoder, load_image, model_fingerprint
from vlmo_fast.model import VLMo


class WordTokenizer:
    """Stand-in tokenizer: [CLS] word ids [SEP], padded with 0; mask 1 = real token."""

    def __init__(self, vocab_size=100):
        self.vocab_size = vocab_size

    def encode_batch(self, texts, max_len):
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [2] + [5 + sum(map(ord, w)) % (self.vocab_size - 5) for w in t.split()]
            toks = toks[:max_len - 1] + [3]
            ids[i, :len(toks)] = torch.tensor(toks)
        return ids, (ids != 0).long()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", vocab_size=100, max_text_len=8)
    return Encoder(model, WordTokenizer(), batch_size=3, progress=False)


def test_embeddings_match_model(encoder):
    c = encoder.config
    images = torch.rand(5, 3, c.img_size, c.img_size) * 2 - 1
    emb = encoder.embed_images(images)
    texts = ["a red square", "blue dot", "green", "a b c", "x"]
    temb = encoder.embed_texts(texts)
    with torch.no_grad():
        ref = encoder.model.encode_image(images).features
        ids, mask = encoder.tokenizer.encode_batch(texts, c.max_text_len)
        tref = encoder.model.encode_text(ids, mask).features
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(temb, tref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    assert emb.dtype == torch.float32 and emb.shape == (5, encoder.embed_dim)


def test_image_files_and_pil(encoder, tmp_path):
    size = encoder.config.img_size
    pil = Image.fromarray((torch.rand(size + 10, size + 30, 3) * 255).byte().numpy())
    pil.save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", size)
    assert x.shape == (3, size, size) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(load_image(pil, size), x)
    emb = encoder.embed_images([str(tmp_path / "a.png"), pil])
    torch.testing.assert_close(emb[0], emb[1])
    torch.testing.assert_close(emb[:1], encoder.embed_images(x[None]))
    with pytest.raises(ValueError, match="missing.png"):
        encoder.embed_images([tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        encoder.embed_images([tmp_path / "bad.png"])


def test_itm_score(encoder):
    c = encoder.config
    images = torch.rand(3, 3, c.img_size, c.img_size) * 2 - 1
    texts = ["a red square", "blue dot", "green"]
    p = encoder.itm_score(images, texts)
    logit = encoder.itm_score(images, texts, kind="logit")
    with torch.no_grad():
        ids, mask = encoder.tokenizer.encode_batch(texts, c.max_text_len)
        ref = encoder.model.itm_logits(encoder.model.encode_pair(ids, images, mask))
    torch.testing.assert_close(p, ref.softmax(-1)[:, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logit, ref[:, 1], atol=1e-5, rtol=1e-4)
    one = encoder.itm_score(images[:1], texts)  # one image broadcast over three texts
    assert one.shape == (3,)
    torch.testing.assert_close(one[0], p[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="3 images and 2 texts"):
        encoder.itm_score(images, texts[:2])


def test_long_texts_truncate_with_warning(encoder):
    long = "w " * 30
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than the model's max_text_len=8"):
        emb = encoder.embed_texts([long, "short"])
    cut = " ".join(long.split()[:6])  # 8 slots = [CLS] + 6 words + [SEP]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(emb[:1], encoder.embed_texts([cut]))
    strict = Encoder(encoder.model, encoder.tokenizer, on_long_text="error", progress=False)
    with pytest.raises(ValueError, match="longer than the model's max_text_len"):
        strict.embed_texts([long])


def test_bad_inputs(encoder):
    c = encoder.config
    with pytest.raises(ValueError, match="texts is empty"):
        encoder.embed_texts([])
    with pytest.raises(TypeError, match="single string"):
        encoder.embed_texts("a cat")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string"):
        encoder.embed_texts(["a", 3])
    with pytest.raises(ValueError, match="images is empty"):
        encoder.embed_images([])
    with pytest.raises(ValueError, match="images is empty"):
        encoder.embed_images(torch.zeros(0, 3, c.img_size, c.img_size))
    with pytest.raises(ValueError, match=f"must be {c.img_size}x{c.img_size}"):
        encoder.embed_images(torch.zeros(1, 3, c.img_size + 16, c.img_size + 16))
    with pytest.raises(TypeError, match="floating point"):
        encoder.embed_images(torch.zeros(1, 3, c.img_size, c.img_size, dtype=torch.uint8))
    with pytest.raises(TypeError, match="single path"):
        encoder.embed_images("cat.png")
    with pytest.raises(TypeError, match="path or a PIL image"):
        encoder.embed_images([3])
    with pytest.warns(UserWarning, match=r"normalised to \[-1, 1\]"):
        encoder.embed_images(torch.full((1, 3, c.img_size, c.img_size), 200.0))
    with pytest.raises(ValueError, match="do not belong together"):
        Encoder(encoder.model, WordTokenizer(vocab_size=500), progress=False)
    with pytest.raises(RuntimeError, match="no tokenizer"):
        Encoder(encoder.model, None, progress=False).embed_texts(["a"])


def test_from_pretrained_roundtrip_and_fingerprint(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "ckpt")
    loaded = Encoder.from_pretrained(tmp_path / "ckpt", progress=False)
    assert loaded.tokenizer is None  # no tokenizer files in the folder
    assert loaded.fingerprint == encoder.fingerprint
    other = VLMo.from_preset("tiny", vocab_size=100, max_text_len=8)
    assert model_fingerprint(other) != encoder.fingerprint
    c = encoder.config
    images = torch.rand(2, 3, c.img_size, c.img_size) * 2 - 1
    torch.testing.assert_close(loaded.embed_images(images), encoder.embed_images(images))
