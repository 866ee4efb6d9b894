"""Masking collators: whole-word MLM statistics and BEiT blockwise patch masks."""
import numpy as np
import pytest
import torch

from vlmo_fast.data import blockwise_patch_mask, build_tokenizer, whole_word_mask


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("embedded", num_documents=200)


def _texts(n, rng):
    words = ["red", "circle", "striped", "outlined", "cyan", "diamonds", "bigger", "zebra", "qwxv", "the"]
    return [" ".join(rng.choice(words, size=rng.integers(3, 25))) for _ in range(n)]


def test_whole_word_mlm_statistics(tok):
    rng = np.random.default_rng(0)
    texts = _texts(600, rng)
    ids, mask, word_ids = tok.encode_batch(texts, max_len=32, return_word_ids=True)
    gen = torch.Generator().manual_seed(1)
    out = whole_word_mask(ids, word_ids, vocab_size=tok.vocab_size, mask_id=tok.mask_id,
                          special_ids=tok.special_ids, probability=0.15, generator=gen)
    labels, mlm_ids = out["mlm_labels"], out["mlm_ids"]
    target = labels != -100
    # labels are the original ids at targets
    assert torch.equal(labels[target], ids[target])
    # never [CLS] / [SEP] / [PAD]
    for special in (tok.cls_id, tok.sep_id, tok.pad_id):
        assert not target[ids == special].any()
    # whole words: all tokens of a word share the decision
    for row in range(len(texts)):
        for w in word_ids[row].unique().tolist():
            if w < 0:
                continue
            sel = target[row][word_ids[row] == w]
            assert sel.all() or not sel.any()
    # 15 % of words (each row: round(0.15 * words), at least one)
    n_words = (word_ids.max(1).values + 1)
    picked = torch.tensor([word_ids[r][target[r]].unique().numel() for r in range(len(texts))])
    expected = (n_words.float() * 0.15).round().clamp(min=1)
    assert torch.equal(picked.float(), expected)
    assert abs(picked.sum().item() / n_words.sum().item() - 0.15) < 0.04
    # 80/10/10 over targets
    tgt_in, tgt_orig = mlm_ids[target], ids[target]
    frac_mask = (tgt_in == tok.mask_id).float().mean().item()
    frac_keep = (tgt_in == tgt_orig).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.06 and 0.04 < frac_keep < 0.18
    random_tokens = tgt_in[(tgt_in != tok.mask_id) & (tgt_in != tgt_orig)]
    assert not torch.isin(random_tokens, torch.tensor(tok.special_ids)).any()
    # non-targets unchanged; positions are the flat indices of the targets
    assert torch.equal(mlm_ids[~target], ids[~target])
    assert torch.equal(out["mlm_positions"], target.flatten().nonzero().flatten())


def test_mlm_is_seeded(tok):
    ids, mask, word_ids = tok.encode_batch(["a red circle above a blue ring"] * 4, 16, return_word_ids=True)
    kw = dict(vocab_size=tok.vocab_size, mask_id=tok.mask_id, special_ids=tok.special_ids)
    a = whole_word_mask(ids, word_ids, generator=torch.Generator().manual_seed(5), **kw)
    b = whole_word_mask(ids, word_ids, generator=torch.Generator().manual_seed(5), **kw)
    c = whole_word_mask(ids, word_ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a["mlm_ids"], b["mlm_ids"]) and torch.equal(a["mlm_labels"], b["mlm_labels"])
    assert not torch.equal(a["mlm_labels"], c["mlm_labels"])
    with pytest.raises(ValueError, match="probability"):
        whole_word_mask(ids, word_ids, probability=1.5, **kw)


def _components(mask2d):
    """Connected components (4-neighbour) of a 2-D bool mask, as sizes."""
    seen = np.zeros_like(mask2d)
    sizes = []
    for r, c in zip(*np.nonzero(mask2d)):
        if seen[r, c]:
            continue
        stack, n = [(r, c)], 0
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask2d.shape[0] and 0 <= xx < mask2d.shape[1] and mask2d[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        sizes.append(n)
    return sizes


def test_blockwise_mask_ratio_and_blocks():
    gen = torch.Generator().manual_seed(0)
    m = blockwise_patch_mask(256, 14, mask_ratio=0.4, generator=gen)
    assert m.shape == (256, 196) and m.dtype == torch.bool
    counts = m.sum(1)
    assert (counts <= round(0.4 * 196)).all()
    assert counts.float().mean() > 0.95 * round(0.4 * 196)
    # blocks: the masked area is made of rectangles of >= 16 patches (merged components are larger)
    assert min(s for row in m.view(256, 14, 14).numpy() for s in _components(row)) >= 16
    # not the same mask for every image
    assert len({tuple(r.tolist()) for r in m}) > 250


def test_blockwise_mask_aspect_and_tiny_grid():
    gen = torch.Generator().manual_seed(1)
    m = blockwise_patch_mask(64, 2, mask_ratio=0.4, generator=gen)     # tiny preset: 2 x 2 patches
    assert m.shape == (64, 4) and (m.sum(1) == 2).all()
    m = blockwise_patch_mask(8, 14, mask_ratio=0.0, generator=gen)
    assert not m.any()
    with pytest.raises(ValueError, match="mask_ratio"):
        blockwise_patch_mask(2, 14, mask_ratio=1.0)
