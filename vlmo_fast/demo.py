"""`python -m vlmo_fast.demo`: a short, real run of the model and its kernels on CPU or GPU.

It trains a tiny VLMo from scratch for a few hundred steps on a synthetic image-text set
(coloured shapes with captions such as "a red square at the top left"), with the three
vision-language objectives of VLMo's third stage: image-text contrast (ITC), image-text
matching with hard negatives drawn from the ITC similarities (ITM) and masked language
modelling (MLM). It prints the backends that ran, the losses, and image->text retrieval
accuracy on held-out pairs before and after training.
"""
from __future__ import annotations

import argparse
import logging
import random
import time

import torch
import torch.nn.functional as F

from . import backends
from .config import VLMoConfig
from .hard_negatives import sample_global_hard_negatives
from .losses import contrastive_loss
from .model import VLMo

COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0),
           "yellow": (1.0, 1.0, -0.6), "white": (1.0, 1.0, 1.0), "purple": (0.6, -0.6, 1.0)}
SHAPES = ("square", "bar", "column", "dot")
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}


def draw(colour: str, shape: str, place: str, size: int, rng: random.Random) -> torch.Tensor:
    """A size x size image in [-1, 1] (VLMo normalisation) with one shape in one quadrant."""
    # a grey background with texture: images must differ in more than a few pixels, or an
    # untrained encoder maps them all to nearly the same feature and contrastive learning stalls
    img = 0.3 * torch.randn(3, size, size)
    half = size // 2
    r0, c0 = PLACES[place][0] * half, PLACES[place][1] * half
    jitter = max(1, half // 8)
    r0 += rng.randint(0, jitter)
    c0 += rng.randint(0, jitter)
    h, w = {"square": (half * 7 // 8,) * 2, "bar": (half // 3, half * 7 // 8),
            "column": (half * 7 // 8, half // 3), "dot": (half // 2, half // 2)}[shape]
    img[:, r0:r0 + h, c0:c0 + w] = torch.tensor(COLOURS[colour])[:, None, None]
    return img.clamp(-1, 1)


def make_pairs(n: int, size: int, seed: int):
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(n):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        images.append(draw(colour, shape, place, size, rng))
        captions.append(f"a {colour} {shape} at the {place}")
    return torch.stack(images), captions


def build_tokenizer(texts):
    """A WordPiece tokenizer (HF tokenizers) trained on the captions, BERT special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


def encode_texts(tok, texts, max_len: int):
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=max_len)
    tok.enable_truncation(max_len)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    return ids, mask


def mask_tokens(ids, mask, tok, prob: float, gen: torch.Generator):
    """BERT masking (80% [MASK], 10% random, 10% kept) on real, non-special tokens."""
    special = torch.tensor([tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")])
    can = mask.bool() & ~torch.isin(ids, special)
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & can
    chosen[:, 1] |= can[:, 1] & ~chosen.any(1)  # at least one target per caption
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    masked = ids.clone()
    masked[chosen & (r < 0.8)] = tok.token_to_id("[MASK]")
    rand_sel = chosen & (r >= 0.8) & (r < 0.9)
    masked[rand_sel] = torch.randint(5, tok.get_vocab_size(), (int(rand_sel.sum()),), generator=gen)
    return masked, labels




@torch.no_grad()
def retrieval_accuracy(model, images, ids, mask) -> float:
    model.eval()
    img = model.encode_image(images).features
    txt = model.encode_text(ids, mask).features
    sims = img @ txt.T
    # a caption describes several images equally well: count a hit when the best caption is identical
    hit = (ids[sims.argmax(1)] == ids).all(1)
    model.train()
    return hit.float().mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="outputs/demo", help="folder for losses.png and history.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    img_size = VLMoConfig.preset("tiny").img_size
    train_images, train_caps = make_pairs(1024, img_size, args.seed)
    test_images, test_caps = make_pairs(128, img_size, args.seed + 1)
    tok = build_tokenizer(train_caps)
    # the demo's own WordPiece vocabulary is small: size the MLM head to it
    config = VLMoConfig.preset("tiny", drop_path_rate=0.0, vocab_size=tok.get_vocab_size())
    train_ids, train_mask = encode_texts(tok, train_caps, config.max_text_len)
    test_ids, test_mask = encode_texts(tok, test_caps, config.max_text_len)

    model = VLMo(config).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vlmo_fast demo: tiny VLMo ({n_params / 1e6:.1f}M parameters) on {device}")
    print("backends:", {op: v.get("auto") for op, v in backends.backend_report(device).items()})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    before = retrieval_accuracy(model, test_images.to(device), test_ids.to(device), test_mask.to(device))
    t0 = time.perf_counter()
    history = []
    for step in range(1, args.steps + 1):
        idx = torch.randperm(len(train_caps), generator=gen)[:args.batch_size]
        images, ids, mask = train_images[idx].to(device), train_ids[idx].to(device), train_mask[idx].to(device)
        img = model.encode_image(images)
        txt = model.encode_text(ids, mask)
        loss_itc = contrastive_loss(img.features, txt.features, model.itc.logit_scale)
        with torch.no_grad():
            logits = torch.exp(model.itc.logit_scale) * img.features @ txt.features.T
        # ITM: positives plus one hard negative text per image and one hard negative image per text
        # (single process: rank 0 of a world of 1; positives on the diagonal)
        neg_txt, neg_img = sample_global_hard_negatives(logits, rank=0, generator=gen)
        pair_ids = torch.cat([ids, ids[neg_txt], ids])
        pair_mask = torch.cat([mask, mask[neg_txt], mask])
        pair_images = torch.cat([images, images, images[neg_img]])
        itm_labels = torch.cat([torch.ones(len(idx)), torch.zeros(2 * len(idx))]).long().to(device)
        loss_itm = F.cross_entropy(model.itm_logits(model.encode_pair(pair_ids, pair_images, pair_mask)), itm_labels)
        masked, labels = mask_tokens(ids.cpu(), mask.cpu(), tok, 0.15, gen)
        mlm_out = model.encode_pair(masked.to(device), images, mask)
        loss_mlm = F.cross_entropy(model.mlm_logits(mlm_out).flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)
        loss = loss_itc + loss_itm + loss_mlm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append((loss_itc.item(), loss_itm.item(), loss_mlm.item()))
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  itc {loss_itc.item():.3f}  itm {loss_itm.item():.3f}  "
                  f"mlm {loss_mlm.item():.3f}  ({time.perf_counter() - t0:.1f}s)")
    after = retrieval_accuracy(model, test_images.to(device), test_ids.to(device), test_mask.to(device))
    print(f"held-out image->text retrieval accuracy: {before:.1%} before, {after:.1%} after {args.steps} steps")
    print("backends that ran:", backends.last_used())
    result = {"before": before, "after": after, "history": history}
    save_curves(result, args.out)
    return result


def save_curves(result: dict, out_dir: str) -> None:
    """history.json and a PNG of the three loss curves."""
    import json
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out / 'history.json'} (matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, name in enumerate(("ITC", "ITM", "MLM")):
        ax.plot([h[k] for h in result["history"]], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"tiny VLMo demo: retrieval {result['before']:.0%} -> {result['after']:.0%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out / 'losses.png'} and {out / 'history.json'}")


if __name__ == "__main__":
    main()
