"""VQA soft accuracy, NLVR2 accuracy/consistency, zero-shot classification: hand-checked toys."""
import pytest
import torch

from vlmo_fast.eval import (NLVR2Model, answer_score, class_embeddings_from_prompts,
                            class_prompts, evaluate_nlvr2, evaluate_vqa, evaluate_zeroshot,
                            nlvr2_accuracy, nlvr2_consistency, normalize_answer, vqa_accuracy,
                            vqa_soft_accuracy, vqa_soft_scores, zeroshot_accuracy)
from vlmo_fast.model import VLMo

VOCAB = {"yes": 0, "no": 1, "red": 2, "blue": 3}
HUMANS = [["yes"] * 2 + ["no"] * 8,
          ["Red", "red ", "blue", "blue.", "green"]]


def test_answer_score_is_the_leave_one_out_average():
    # official VQAv2: min(#matching humans / 3, 1) averaged over the 10 subsets of 9 annotators
    for n, expected in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        humans = [1] * n + [0] * (10 - n)
        loo = sum(min(sum(humans[:i] + humans[i + 1:]) / 3, 1.0) for i in range(10)) / 10
        assert answer_score(n) == pytest.approx(loo) == pytest.approx(expected)


def test_vqa_soft_scores_hand_checked():
    t = vqa_soft_scores(HUMANS, VOCAB)
    # q0: yes x2 -> 0.6, no x8 -> 1; q1: red x2, blue x2 -> 0.6 each, green is not in the vocab
    torch.testing.assert_close(t, torch.tensor([[0.6, 1.0, 0, 0], [0, 0, 0.6, 0.6]]))
    assert vqa_soft_accuracy(torch.tensor([0, 3]), t) == pytest.approx(0.6)
    assert vqa_soft_accuracy(torch.tensor([1, 2]), t) == pytest.approx(0.8)
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.0, 9.0]])   # argmax: no, blue
    assert vqa_soft_accuracy(logits, t) == pytest.approx((1 + 0.6) / 2)
    # string predictions: "green" is outside the vocabulary but still earns its 0.3
    assert vqa_accuracy(["no", "green"], HUMANS) == pytest.approx((1 + 0.3) / 2)
    assert vqa_accuracy(["YES", "red."], HUMANS) == pytest.approx(0.6)
    assert normalize_answer("  Two  Dogs. ") == "two dogs"


def test_vqa_bad_input():
    t = vqa_soft_scores(HUMANS, VOCAB)
    with pytest.raises(ValueError, match="unknown answer label"):
        vqa_soft_accuracy(torch.tensor([0, 4]), t)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        vqa_accuracy(["a", "b"], HUMANS + [["c"]])
    with pytest.raises(TypeError, match="list of answers"):
        vqa_soft_scores(["yes"], VOCAB)
    with pytest.raises(ValueError, match="empty"):
        vqa_soft_scores(HUMANS, {})


def test_evaluate_vqa_tiny_model():
    model = VLMo.from_preset("tiny", num_classes=4)
    c = model.config
    images = torch.randn(3, 3, c.img_size, c.img_size)
    ids = torch.randint(5, c.vocab_size, (3, 8))
    targets = vqa_soft_scores(HUMANS + [["blue"] * 3], VOCAB)
    out = evaluate_vqa(model, images, ids, None, targets, batch_size=2)
    model.eval()
    with torch.no_grad():
        pred = model.classify(model.encode_pair(ids, images)).argmax(1)
    assert out["vqa_score"] == pytest.approx(float(targets[torch.arange(3), pred].mean()))
    # best reachable: q0 "no" 1, q1 "red"/"blue" 0.6, q2 "blue" (3 annotators) 0.9
    assert out["upper_bound"] == pytest.approx(2.5 / 3) and out["num_questions"] == 3
    with pytest.raises(ValueError, match="classifies over 4 answers"):
        evaluate_vqa(model, images, ids, None, targets[:, :3])


def test_nlvr2_hand_checked():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # -> 0, 1, 0, 1
    labels = torch.tensor([0, 1, 1, 1])
    assert nlvr2_accuracy(logits, labels) == 0.75
    assert nlvr2_accuracy(torch.tensor([True, True, False, True]), labels.bool()) == 0.5
    # statement "a" has both right, "b" one wrong
    assert nlvr2_consistency(logits, labels, ["a", "a", "b", "b"]) == 0.5
    with pytest.raises(ValueError, match="unknown label"):
        nlvr2_accuracy(logits, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        nlvr2_accuracy(torch.zeros(4, 3), labels)


def test_nlvr2_model_matches_separate_passes():
    backbone = VLMo.from_preset("tiny")
    model = NLVR2Model(backbone).eval()
    c = backbone.config
    ids = torch.randint(5, c.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    left, right = torch.randn(2, 3, 3, c.img_size, c.img_size)
    with torch.no_grad():
        logits = model(ids, left, right, mask)
        ref = model.head(backbone.encode_pair(ids, left, mask).pooled,
                         backbone.encode_pair(ids, right, mask).pooled)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    labels = torch.tensor([1, 0, 1])
    out = evaluate_nlvr2(model, ids, mask, left, right, labels, statement_ids=[0, 0, 1], batch_size=2)
    assert out["accuracy"] == nlvr2_accuracy(ref, labels)
    assert out["consistency"] == nlvr2_consistency(ref, labels, [0, 0, 1])


def test_zeroshot_hand_checked():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0 right; image 1 (label 0) closer to class 1; image 2 ties -> counted wrong
    r = zeroshot_accuracy(feats, classes, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert r["top1"] == pytest.approx(1 / 3) and r["top2"] == 1.0
    # 2 classes x 2 templates, class-major: class 0 prompts point along x and y -> diagonal
    prompt_feats = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 1.0], [0.0, 2.0]])
    emb = class_embeddings_from_prompts(prompt_feats, 2)
    torch.testing.assert_close(emb, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5], [0.0, 1.0]]))
    assert class_prompts(["cat", "dog"], ["a {}", "{}!"]) == ["a cat", "cat!", "a dog", "dog!"]
    with pytest.raises(ValueError, match="placeholder"):
        class_prompts(["cat"], ["a photo"])
    with pytest.raises(ValueError, match="unknown class label"):
        zeroshot_accuracy(feats, classes, torch.tensor([0, 2, 1]))


class WordTokenizer:
    """Stand-in for the data layer's tokenizer: one id per word (hash), CLS first, padded."""

    def encode_batch(self, texts, max_len):
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [2] + [5 + hash(w) % 90 for w in t.split()][:max_len - 1]
            ids[i, :len(toks)] = torch.tensor(toks)
        return ids, (ids != 0).long()


def test_evaluate_zeroshot_tiny_model():
    model = VLMo.from_preset("tiny", vocab_size=100)
    c = model.config
    images = torch.randn(4, 3, c.img_size, c.img_size)
    labels = torch.tensor([0, 1, 2, 1])
    out = evaluate_zeroshot(model, WordTokenizer(), images, labels, ["red", "green", "blue"],
                            ["a {} shape", "{}"], batch_size=3)
    model.eval()
    tok = WordTokenizer()
    with torch.no_grad():
        ids, mask = tok.encode_batch(class_prompts(["red", "green", "blue"], ["a {} shape", "{}"]), c.max_text_len)
        classes = class_embeddings_from_prompts(model.encode_text(ids, mask).features, 3)
        ref = zeroshot_accuracy(model.encode_image(images).features, classes, labels)
    assert out["top1"] == ref["top1"] and out["num_classes"] == 3 and out["chance"] == pytest.approx(1 / 3)
