"""WordPiece tokenizer: BERT conventions, training, vocab.txt loading, atomic save/load."""
import os

import pytest
import torch

from vlmo_fast.data import WordPieceTokenizer, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("embedded", vocab_size=1000, num_documents=300)


def test_bert_conventions(tok):
    assert tok.pad_id == 0
    assert len({tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id}) == 5
    ids, mask = tok.encode_batch(["A Red circle at the TOP left", "two shapes"], max_len=12)
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (2, 12)
    assert ids[0, 0] == tok.cls_id
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == tok.sep_id and (ids[0, n0:] == tok.pad_id).all() and (mask[0, n0:] == 0).all()
    assert tok.decode(ids[0]) == "a red circle at the top left"   # lower-cased


def test_truncation_keeps_sep(tok):
    ids, mask = tok.encode_batch(["a red circle " * 20], max_len=8)
    assert mask.sum() == 8 and ids[0, -1] == tok.sep_id and ids[0, 0] == tok.cls_id


def test_word_ids_mark_words_and_not_specials(tok):
    ids, mask, words = tok.encode_batch(["a zzyzx circle"], max_len=10, return_word_ids=True)
    assert words[0, 0] == -1 and words[0, int(mask[0].sum()) - 1] == -1
    real = words[0][(words[0] >= 0)]
    assert real.min() == 0 and real.max() == 2   # three words; unknown ones may split into pieces
    assert (words[0][mask[0] == 0] == -1).all()


def test_training_is_deterministic():
    a = build_tokenizer("embedded", vocab_size=300, num_documents=100, seed=1)
    b = build_tokenizer("embedded", vocab_size=300, num_documents=100, seed=1)
    assert a.get_vocab() == b.get_vocab()


def test_save_load_roundtrip_is_atomic(tok, tmp_path):
    tok.save(tmp_path / "tok")
    names = sorted(os.listdir(tmp_path / "tok"))
    assert names == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]   # no temporaries left
    again = WordPieceTokenizer.load(tmp_path / "tok")
    assert again.get_vocab() == tok.get_vocab()
    texts = ["a small striped blue ring below a cyan cross", "unseen words here"]
    for x, y in zip(tok.encode_batch(texts, 16), again.encode_batch(texts, 16)):
        assert torch.equal(x, y)
    assert build_tokenizer(tmp_path / "tok").get_vocab() == tok.get_vocab()
    assert build_tokenizer(tmp_path / "tok" / "tokenizer.json").get_vocab() == tok.get_vocab()
    # a save killed mid-write left a temporary: the next save cleans it up
    (tmp_path / "tok" / ".vlmo-tmp-vocab.txt.123.tmp").write_text("torn")
    tok.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == names


def test_folder_mixing_two_saves_is_refused(tok, tmp_path):
    """A save killed after vocab.txt but before tokenizer_config.json leaves files of two
    generations: load names the mismatch instead of tokenizing with the wrong vocabulary."""
    from vlmo_fast.io import CorruptFileError
    other = build_tokenizer("embedded", vocab_size=300, num_documents=100, seed=3)
    tok.save(tmp_path / "old")
    other.save(tmp_path / "new")
    os.replace(tmp_path / "new" / "vocab.txt", tmp_path / "old" / "vocab.txt")
    with pytest.raises(CorruptFileError, match="vocab.txt: does not match .*mixes two saves"):
        WordPieceTokenizer.load(tmp_path / "old")


def test_load_bert_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "##s", "cir"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = build_tokenizer("embedded", vocab_file=tmp_path / "vocab.txt")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    ids, _ = tok.encode_batch(["A red circles blue"], max_len=8)
    assert ids[0].tolist() == [3, 6, 7, 8, 9, 2, 4, 0]


def test_bad_vocab_files_are_named(tmp_path):
    (tmp_path / "v1.txt").write_text("[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match=r"v1.txt.*\[PAD\]"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "v1.txt")
    (tmp_path / "v2.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\na\n")
    with pytest.raises(ValueError, match=r"v2.txt line 7: duplicate"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "v2.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(tmp_path / "nope" / "vocab.txt")
    with pytest.raises(ValueError, match="empty corpus"):
        WordPieceTokenizer.train(["", "  "])
