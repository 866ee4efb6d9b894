"""Retrieval metrics on hand-checked toy matrices, and the protocol on a stub and a tiny VLMo."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmo_fast.eval.retrieval import chance_recall, evaluate_retrieval, recall_at_k, rerank_scores
from vlmo_fast.model import VLMo

# 2 images, 4 captions: captions 0, 1 describe image 0; captions 2, 3 image 1
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1])
SIM = torch.tensor([[0.9, 0.1, 0.8, 0.2],
                    [0.7, 0.6, 0.5, 0.1]])


def test_recall_hand_checked():
    r = recall_at_k(SIM, SIM.T, TEXT_TO_IMAGE, ks=(1, 2, 3))
    # i2t: image 0's best caption (t0, 0.9) is first; image 1's best caption t2 (0.5) has two
    # wrong captions above it (0.7, 0.6) -> rank 2
    assert r["i2t_r1"] == 0.5 and r["i2t_r2"] == 0.5 and r["i2t_r3"] == 1.0
    # t2i: t0 -> [0.9, 0.7] right first; t1 -> [0.1, 0.6], t2 -> [0.8, 0.5],
    # t3 -> [0.2, 0.1]: the wrong image is first for these three
    assert r["t2i_r1"] == 0.25 and r["t2i_r2"] == 1.0 and r["t2i_r3"] == 1.0
    assert r["mean"] == pytest.approx((0.5 + 0.5 + 1 + 0.25 + 1 + 1) / 6)


def test_any_caption_counts_for_image_to_text():
    # image 0's first caption scores worst, its second best: still a hit at 1
    sim = torch.tensor([[0.0, 0.9, 0.5, 0.4],
                        [0.1, 0.2, 0.3, 0.8]])
    r = recall_at_k(sim, sim.T, TEXT_TO_IMAGE, ks=(1,))
    assert r["i2t_r1"] == 1.0
    # t0 -> [0.0, 0.1] wrong; t1 -> [0.9, 0.2] right; t2 -> [0.5, 0.3] wrong; t3 -> [0.4, 0.8] right
    assert r["t2i_r1"] == 0.5


def test_ties_are_pessimistic():
    const = torch.zeros(2, 4)
    r = recall_at_k(const, const.T, TEXT_TO_IMAGE, ks=(1, 2, 3))
    # i2t: 2 wrong captions tie with the best right one -> rank 2; t2i: 1 wrong image -> rank 1
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (0.0, 0.0, 1.0)
    assert (r["t2i_r1"], r["t2i_r2"]) == (0.0, 1.0)


def test_recall_bad_input():
    with pytest.raises(ValueError, match="no caption"):
        recall_at_k(SIM, SIM.T, torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"image indices in \[0, 2\)"):
        recall_at_k(SIM, SIM.T, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="one entry per text"):
        recall_at_k(SIM, SIM.T, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="scores_t2i must have shape"):
        recall_at_k(SIM, SIM, TEXT_TO_IMAGE)
    with pytest.raises(ValueError, match="at least one image"):
        recall_at_k(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        recall_at_k(SIM, SIM.T, TEXT_TO_IMAGE.float())


def test_rerank_scores_hand_checked():
    itc = torch.tensor([[0.9, 0.1, 0.8, 0.2]])
    cand = torch.tensor([[2, 0]])
    itm = torch.tensor([[3.0, -1.0]])
    out = rerank_scores(itc, cand, itm)
    # candidates: t2 = 3 + 0.8, t0 = -1 + 0.9; the rest shifted by (-0.1 - 1 - 0.9) = -2
    torch.testing.assert_close(out, torch.tensor([[-0.1, -1.9, 3.8, -1.8]]))
    assert out[0].argsort(descending=True).tolist() == [2, 0, 3, 1]


class OracleModel(nn.Module):
    """ITC from fixed feature tables; ITM knows the truth (+10 right pair, -10 wrong).
    An image's identity is its pixel [0, 0, 0]; a caption's image is its token 1."""

    def __init__(self, image_table, text_table, text_to_image):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.image_table, self.text_table = image_table, text_table
        self.text_to_image = text_to_image
        self.pairs_seen = 0

    def encode_image(self, images):
        return SimpleNamespace(features=self.image_table[images[:, 0, 0, 0].long()])

    def encode_text(self, text_ids, text_mask=None):
        return SimpleNamespace(features=self.text_table[text_ids[:, 0]])

    def encode_pair(self, text_ids, images, text_mask=None):
        self.pairs_seen += text_ids.shape[0]
        right = self.text_to_image[text_ids[:, 0]] == images[:, 0, 0, 0].long()
        return SimpleNamespace(pooled=right)

    def itm_logits(self, pair):
        pos = torch.where(pair.pooled, 10.0, -10.0)
        return torch.stack([-pos, pos], 1)


def _oracle_set(num_images=7, per_image=3, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_to_image = torch.arange(num_images).repeat_interleave(per_image)
    n_text = text_to_image.numel()
    image_table = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    text_table = F.normalize(torch.randn(n_text, dim, generator=g), dim=-1)
    images = torch.randn(num_images, 3, 4, 4, generator=g)
    images[:, 0, 0, 0] = torch.arange(num_images).float()
    text_ids = torch.stack([torch.arange(n_text), torch.randint(5, 9, (n_text,), generator=g)], 1)
    model = OracleModel(image_table, text_table, text_to_image)
    return model, images, text_ids, text_to_image, image_table @ text_table.T


@pytest.mark.parametrize("k", [1, 3, 30])
def test_evaluate_retrieval_oracle(k):
    model, images, text_ids, t2i, sim = _oracle_set()
    res = evaluate_retrieval(model, images, text_ids, None, t2i, batch_size=4, rerank_k=k,
                             ks=(1, 2, 3, 5))
    assert res.itc == recall_at_k(sim, sim.T, t2i, ks=(1, 2, 3, 5))
    # with a perfect ITM, re-ranked R@1 = share of queries with a right item in the ITC top k
    ref = recall_at_k(sim, sim.T, t2i, ks=(1, 2, 3, 5, k))
    assert res.rerank["i2t_r1"] == ref[f"i2t_r{k}"]
    assert res.rerank["t2i_r1"] == ref[f"t2i_r{k}"]
    n_img, n_txt = images.shape[0], text_ids.shape[0]
    assert model.pairs_seen == n_img * min(k, n_txt) + n_txt * min(k, n_img)
    assert res.itc_seconds >= 0 and res.rerank_seconds >= 0
    assert res.to_dict()["rerank_k"] == k


def test_evaluate_retrieval_tiny_vlmo_batch_invariant():
    model = VLMo.from_preset("tiny")
    model.train()
    c = model.config
    images = torch.randn(5, 3, c.img_size, c.img_size)
    text_ids = torch.randint(5, c.vocab_size, (10, c.max_text_len))
    text_mask = torch.ones_like(text_ids)
    text_mask[::2, 9:] = 0
    t2i = torch.arange(5).repeat_interleave(2)
    a = evaluate_retrieval(model, images, text_ids, text_mask, t2i, batch_size=3, rerank_k=4)
    b = evaluate_retrieval(model, images, text_ids, text_mask, t2i, batch_size=64, rerank_k=4,
                           itm_score="log_prob")
    assert model.training, "the model's training mode must be restored"
    assert a.itc == b.itc
    assert set(a.rerank) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean"}
    assert all(0.0 <= v <= 1.0 for v in a.rerank.values())
    assert a.itc["i2t_r10"] == 1.0  # only 10 captions
    assert "ITC+ITM" in a.summary()
    # a model cast to bf16 gets its inputs in bf16 too
    half = evaluate_retrieval(VLMo.from_preset("tiny").to(torch.bfloat16), images, text_ids, text_mask,
                              t2i, batch_size=4, rerank_k=2)
    assert all(0.0 <= v <= 1.0 for v in half.rerank.values())
    with pytest.raises(ValueError, match="itm_score"):
        evaluate_retrieval(model, images, text_ids, text_mask, t2i, itm_score="prob")
    with pytest.raises(ValueError, match="text_mask"):
        evaluate_retrieval(model, images, text_ids, text_mask[:, :3], t2i)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_retrieval(model, images[:0], text_ids[:0], None, t2i[:0])


def test_chance_recall_hand_checked():
    # 2 images x 2 captions: i2t@1 = 2/4, i2t@2 = 1 - (2/4)(1/3) = 5/6; t2i@1 = 1/2
    c = chance_recall(TEXT_TO_IMAGE, 2, ks=(1, 2, 5))
    assert c["i2t_r1"] == pytest.approx(0.5) and c["i2t_r2"] == pytest.approx(5 / 6)
    assert c["i2t_r5"] == 1.0 and c["t2i_r1"] == 0.5 and c["t2i_r2"] == 1.0
    # matches the mean recall of many random score matrices
    g = torch.Generator().manual_seed(0)
    t2i = torch.tensor([0, 0, 0, 1, 2, 2])
    runs = [recall_at_k(s, s.T, t2i, ks=(1, 2)) for s in torch.rand(2000, 3, 6, generator=g)]
    exact = chance_recall(t2i, 3, ks=(1, 2))
    for key in ("i2t_r1", "i2t_r2", "t2i_r1"):
        assert sum(r[key] for r in runs) / len(runs) == pytest.approx(exact[key], abs=0.03)
