"""WordPiece tokenizer with BERT conventions (HF `tokenizers`): lower-case BERT normaliser,
BERT pre-tokeniser, [CLS] text [SEP], [PAD] = 0, [MASK]; loaded from a BERT `vocab.txt` or
trained on a corpus (the embedded world's by default), saved next to a run atomically.

`build_tokenizer(source)` takes a file for what it is: a vocabulary (one token per line,
with the lines [CLS], [SEP], [MASK] and [PAD], whatever the file is called) is loaded;
training a new vocabulary on a corpus is asked for explicitly, `train:corpus.txt`; any other
file is an error that says which of the two to write (a vocabulary file trained on as if it
were a corpus gives a useless ~200-token vocabulary without a word of warning).
"""
from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..io import CorruptFileError, atomic_write_json, atomic_write_text, remove_stale_temporaries

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONFIG_NAME = "tokenizer_config.json"
TRAIN_PREFIX = "train:"   # build_tokenizer("train:corpus.txt"): train a new vocabulary on a corpus
# the lines that make a one-token-per-line file a vocabulary ([UNK] is checked when loading)
VOCAB_MARKERS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")


def _build_backend(vocab: dict, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    # declared special: never split, skipped by decode(skip_special_tokens=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


class WordPieceTokenizer:
    """A BERT-style WordPiece tokenizer around a `tokenizers.Tokenizer`.

    encode_batch(texts, max_len) -> (ids, mask): LongTensor [B, max_len] each, padded with
    [PAD] (= 0) and truncated so that [SEP] always closes the text.
    """

    def __init__(self, vocab: dict, lowercase: bool = True, source: str = ""):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"WordPiece vocabulary{' ' + source if source else ''} lacks the special "
                             f"tokens {missing} (BERT conventions need {list(SPECIAL_TOKENS)})")
        if vocab["[PAD]"] != 0:
            raise ValueError(f"WordPiece vocabulary{' ' + source if source else ''}: [PAD] must have id 0 "
                             f"(BERT convention; padding masks assume it), got {vocab['[PAD]']}")
        self.lowercase = bool(lowercase)
        self._vocab = dict(vocab)
        self._backend = _build_backend(self._vocab, self.lowercase)
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        self.special_ids = tuple(sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}))

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_vocab_file(cls, path: Union[str, Path], lowercase: bool = True) -> "WordPieceTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocab file {path} does not exist (expected a BERT vocab.txt, one token a line)")
        try:
            tokens = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"vocab file {path} is not UTF-8 text ({e})") from None
        vocab = {}
        for line_no, token in enumerate(tokens, 1):
            token = token.rstrip("\r")
            if not token:
                raise ValueError(f"{path} line {line_no}: empty token (a vocab.txt has one token per line)")
            if token in vocab:
                raise ValueError(f"{path} line {line_no}: duplicate token {token!r}")
            vocab[token] = len(vocab)
        return cls(vocab, lowercase=lowercase, source=str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000, lowercase: bool = True,
              min_frequency: int = 1) -> "WordPieceTokenizer":
        """Build a WordPiece vocabulary from `texts`, deterministically.

        The vocabulary is: the special tokens, every character seen (word-initial and "##"
        continuation forms), then whole words by frequency (ties broken alphabetically) up to
        `vocab_size`; words left out are split by WordPiece's longest-match-first into known
        pieces. (The `tokenizers` WordPieceTrainer is not used because its merges depend on
        hash-map order: two runs on the same corpus gave different vocabularies, and a
        tokenizer must be reproducible from its seed.) For large real corpora, load a BERT
        vocab.txt instead.
        """
        from collections import Counter

        from tokenizers import normalizers, pre_tokenizers
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
        normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        pre = pre_tokenizers.BertPreTokenizer()
        words: Counter = Counter()
        for text in texts:
            words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(str(text))))
        if not words:
            raise ValueError("cannot train a tokenizer on an empty corpus (no words in the texts)")
        # every character seen, plus a basic alphabet, so unseen words split instead of [UNK]
        basic = set(string.ascii_lowercase + string.digits + string.punctuation)
        initial = sorted({w[0] for w in words} | basic)
        continuation = sorted({"##" + c for w in words for c in w[1:]} | {"##" + c for c in basic})
        ranked = sorted((w for w, n in words.items() if n >= min_frequency and len(w) > 1),
                        key=lambda w: (-words[w], w))
        tokens = list(SPECIAL_TOKENS) + initial + [t for t in continuation if t not in initial]
        room = max(0, vocab_size - len(tokens))
        tokens += ranked[:room]
        return cls({t: i for i, t in enumerate(tokens)}, lowercase=lowercase, source="(trained)")

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "WordPieceTokenizer":
        """Load what `save` wrote (vocab.txt + tokenizer_config.json); a bare vocab.txt works too."""
        directory = Path(directory)
        vocab_file = directory / "vocab.txt" if directory.is_dir() else directory
        lowercase = True
        config = vocab_file.parent / CONFIG_NAME
        if config.is_file():
            try:
                meta = json.loads(config.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{config}: not valid JSON ({e})") from None
            lowercase = bool(meta.get("do_lower_case", True))
            # `save` writes the config last with the vocab's hash: a save killed between its
            # files leaves a vocab.txt of one generation beside a config of another
            expected = meta.get("vocab_sha256")
            if expected is not None and vocab_file.is_file():
                actual = hashlib.sha256(vocab_file.read_bytes()).hexdigest()
                if actual != expected:
                    raise CorruptFileError(vocab_file, (
                        f"does not match {config.name} (vocab_sha256 {expected[:12]}..., file "
                        f"{actual[:12]}...): the folder mixes two saves; save the tokenizer again"))
        return cls.from_vocab_file(vocab_file, lowercase=lowercase)

    def save(self, directory: Union[str, Path]) -> Path:
        """Write vocab.txt, tokenizer.json and tokenizer_config.json, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(directory)   # what a writer killed mid-save left behind
        tokens = sorted(self._vocab, key=self._vocab.get)
        vocab_text = "\n".join(tokens) + "\n"
        atomic_write_text(directory / "vocab.txt", vocab_text)
        atomic_write_text(directory / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_json(directory / CONFIG_NAME, {   # last: it vouches for the files above
            "tokenizer_class": "BertTokenizerFast", "do_lower_case": self.lowercase,
            "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "mask_token": "[MASK]", "vocab_size": self.vocab_size,
            "vocab_sha256": hashlib.sha256(vocab_text.encode("utf-8")).hexdigest()})
        return directory

    # -- use -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict:
        return dict(self._vocab)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._vocab.get(token)

    def encode_batch(self, texts: Sequence[str], max_len: int = 40, return_word_ids: bool = False
                     ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(ids, mask) LongTensor [B, max_len]; with return_word_ids also word_ids [B, max_len]
        (index of the word each token belongs to, -1 for [CLS]/[SEP]/[PAD]) for whole-word MLM."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a list of strings, got one str")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        encodings = self._backend.encode_batch([str(t) for t in texts])
        n = len(encodings)
        ids = torch.zeros(n, max_len, dtype=torch.long)
        mask = torch.zeros(n, max_len, dtype=torch.long)
        word_ids = torch.full((n, max_len), -1, dtype=torch.long) if return_word_ids else None
        for row, enc in enumerate(encodings):
            toks = enc.ids
            words = enc.word_ids
            if len(toks) > max_len:   # keep [CLS] ... [SEP]: truncate the body
                toks = toks[:max_len - 1] + [self.sep_id]
                words = words[:max_len - 1] + [None]
            ids[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, :len(toks)] = 1
            if word_ids is not None:
                word_ids[row, :len(words)] = torch.tensor([-1 if w is None else w for w in words],
                                                          dtype=torch.long)
        if return_word_ids:
            return ids, mask, word_ids
        return ids, mask

    def encode(self, text: str) -> List[int]:
        return list(self._backend.encode(str(text)).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


def vocab_file_check(path: Union[str, Path]) -> Optional[str]:
    """None when `path` looks like a vocabulary: one token per line (no whitespace inside a
    line) and the lines [CLS], [SEP], [MASK] and [PAD]; else why it does not. Stops at the
    first line holding several words, so a large corpus costs one line."""
    path = Path(path)
    found = set()
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                token = line.rstrip("\n")
                if any(c.isspace() for c in token):
                    return f"line {line_no} is not a single token ({token[:40]!r})"
                if token in VOCAB_MARKERS:
                    found.add(token)
    except UnicodeDecodeError as e:
        raise ValueError(f"tokenizer source {path}: not UTF-8 text ({e})") from None
    missing = [t for t in VOCAB_MARKERS if t not in found]
    if missing:
        return f"it has one token per line but no line {' / '.join(missing)}"
    return None


def resolve_tokenizer_source(source: Union[str, Path]) -> Tuple[str, Optional[Path]]:
    """What `build_tokenizer(source)` will build, decided without building it (a job can
    check its --tokenizer before starting): ("embedded", None), ("train", corpus path),
    ("folder", saved tokenizer folder) or ("vocab", vocabulary file). A missing path raises
    FileNotFoundError; a file that is neither a vocabulary nor asked to be trained on raises
    ValueError saying what to write instead."""
    hint = ("expected 'embedded', a vocabulary file (one token per line), a saved tokenizer folder, "
            f"or {TRAIN_PREFIX}CORPUS to train a new vocabulary on a text corpus")
    if isinstance(source, str):
        if source == "embedded":
            return "embedded", None
        if source.startswith(TRAIN_PREFIX):
            corpus = source[len(TRAIN_PREFIX):]
            if not corpus:
                raise ValueError(f"tokenizer source {source!r} names no corpus: write {TRAIN_PREFIX}corpus.txt")
            if not Path(corpus).exists():
                raise FileNotFoundError(f"tokenizer source {source!r}: corpus {corpus} does not exist")
            return "train", Path(corpus)
    elif not isinstance(source, os.PathLike):
        raise TypeError(f"tokenizer source must be a str or a path, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source {str(source)!r}: no such file or directory ({hint})")
    if path.is_dir():
        if (path / "vocab.txt").is_file():
            return "folder", path
        raise ValueError(f"tokenizer source {path}: a folder without vocab.txt is not a saved tokenizer; "
                         f"to train a new vocabulary on the texts under it write {TRAIN_PREFIX}{path}")
    if path.name in ("tokenizer.json", CONFIG_NAME):   # a file of a saved tokenizer folder
        return "folder", path.parent
    if path.name == "vocab.txt":   # by name; from_vocab_file says what is wrong with a bad one
        return "vocab", path
    why_not = vocab_file_check(path)
    if why_not is None:
        return "vocab", path
    raise ValueError(f"tokenizer source {path} is not a vocabulary: {why_not} (a vocabulary has one token "
                     f"per line, including {' '.join(SPECIAL_TOKENS)}); to train a new vocabulary on its "
                     f"texts write {TRAIN_PREFIX}{path}")


def build_tokenizer(source: Union[str, Path] = "embedded", vocab_size: int = 1000,
                    vocab_file: Optional[Union[str, Path]] = None, *, seed: int = 0,
                    num_documents: int = 2000, lowercase: bool = True) -> WordPieceTokenizer:
    """source:
    - "embedded": train on the embedded world's captions + documents (seeded);
    - a vocabulary file (a BERT vocab.txt, whatever its name: one token per line with
      [CLS]/[SEP]/[MASK]/[PAD]) or a folder written by `save` (or one of its files): load it;
    - "train:PATH": train a new vocabulary (`vocab_size`) on the texts of PATH (a .txt
      corpus or a folder of them, a manifest, a Karpathy JSON; `formats.read_texts`).
    Any other file raises ValueError saying which to write. vocab_file=... loads that file
    whatever `source` is."""
    if vocab_file is not None:
        return WordPieceTokenizer.from_vocab_file(vocab_file, lowercase=lowercase)
    kind, path = resolve_tokenizer_source(source)
    if kind == "embedded":
        from .world import EmbeddedWorld
        texts = EmbeddedWorld(seed).corpus("train", num_documents)
        return WordPieceTokenizer.train(texts, vocab_size=vocab_size, lowercase=lowercase)
    if kind == "folder":
        return WordPieceTokenizer.load(path)
    if kind == "vocab":
        return WordPieceTokenizer.from_vocab_file(path, lowercase=lowercase)
    from .formats import read_texts
    return WordPieceTokenizer.train(read_texts(path), vocab_size=vocab_size, lowercase=lowercase)
