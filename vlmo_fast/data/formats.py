"""Readers for the dataset formats users already have. Each returns plain records (no pixels
decoded); `sources.py` turns them into Datasets. Every error names the file and the line /
row / entry it is about.

- manifests: JSONL, CSV, TSV (and a JSON list of objects, ALBEF style) with configurable
  column names (defaults "image" / "caption", optional "image_id"; open_clip's
  --csv-img-key / --csv-caption-key); relative image paths resolve against the manifest's
  folder; extra columns are ignored.
- Karpathy JSON (COCO `dataset_coco.json`, Flickr30k `dataset_flickr30k.json`): images with
  several sentences and a split ("restval" counts as "train", as in the Karpathy split).
- image folders with sidecar captions: `x.jpg` + `x.txt` (one caption per non-empty line).
- plain-text corpora: one document per line, or documents separated by blank lines.
- WebDataset-layout .tar shards (`key.jpg|png|webp` + `key.txt|json`), indexed once by a
  plain `tarfile` scan and then read by offset: random access, so the loaders' sharding and
  exact mid-epoch resume work as for any other source. The scan reads every member header
  before the first step, so it serves local datasets of a few dozen shards; many shards,
  `pipe:` commands and object-store URLs are streamed instead (`streaming.py`).
- VQAv2 questions + annotations JSON and NLVR2 JSONL (fine-tuning tasks).

Typed fields, one rule for every reader (`text_field`, `path_field`, `id_field`,
`int_field`): a caption / sentence / question and an image path must be JSON strings, an id a
string or an integer. A number, boolean, NaN, null, object or list there is a DataError
naming the file and the row when the file is read; such rows are not skipped and counted,
because a wrong type comes from how the whole file was written, not from one damaged
sample, and training on "12345" or "{'en': ...}" would be a silent wrong result. Text files
must be UTF-8 (a leading byte-order mark is accepted); other bytes are a DataError naming
the file and the line.
"""
from __future__ import annotations

import codecs
import csv
import glob
import json
import math
import pickle
import re
import reprlib
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class DataError(ValueError):
    """Bad input data; the message names the file and the row/line/entry."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file path, or (tar path, data offset, size)."""
    path: str
    offset: int = -1
    size: int = -1

    @property
    def in_tar(self) -> bool:
        return self.offset >= 0

    def read_bytes(self) -> bytes:
        if not self.in_tar:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: truncated tar member at offset {self.offset}")
        return data

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}" if self.in_tar else self.path


@dataclass
class PairRecord:
    image: ImageRef
    caption: str
    image_key: str          # identity of the image (its id column, or its path)
    origin: str             # "manifest.csv line 7": where this record came from


class StringTable:
    """Many strings in one numpy byte buffer + offsets. DataLoader workers share the parent's
    memory copy-on-write, but touching a Python object writes its reference count, so a list
    of millions of str / dataclass rows is copied into every worker over an epoch (torch
    issue 13246); numpy buffers are never written and stay shared."""

    def __init__(self, strings: Iterable[str]):
        encoded = [str(x).encode("utf-8") for x in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


class PackedList:
    """A read-only list of picklable records kept as one numpy byte buffer (see StringTable):
    for the VQA / NLVR2 record lists that task datasets hold in every worker."""

    def __init__(self, items: Iterable):
        encoded = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} records")
        i = int(i) % len(self)
        return pickle.loads(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class PairTable:
    """A read-only sequence of PairRecord stored column-wise in numpy (see StringTable)."""

    def __init__(self, pairs: Sequence[PairRecord]):
        self.image_path = StringTable(p.image.path for p in pairs)
        self.image_offset = np.asarray([p.image.offset for p in pairs], dtype=np.int64)
        self.image_size = np.asarray([p.image.size for p in pairs], dtype=np.int64)
        self.caption = StringTable(p.caption for p in pairs)
        self.image_key = StringTable(p.image_key for p in pairs)
        self.origin = StringTable(p.origin for p in pairs)

    def __len__(self) -> int:
        return len(self.caption)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        i = int(i) % len(self)
        image = ImageRef(self.image_path[i], int(self.image_offset[i]), int(self.image_size[i]))
        return PairRecord(image, self.caption[i], self.image_key[i], self.origin[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Records:
    """Image-caption pairs with integer image ids (captions of one image share the id), kept
    column-wise in numpy buffers: `pairs` (a PairTable, indexable like a list of PairRecord),
    `image_ids` int64 [N], `num_images`, `source`."""

    def __init__(self, pairs: Sequence[PairRecord], source: str):
        index: Dict[str, int] = {}
        self.image_ids = np.asarray([index.setdefault(p.image_key, len(index)) for p in pairs], dtype=np.int64)
        self.num_images = len(index)
        self.pairs = pairs if isinstance(pairs, PairTable) else PairTable(pairs)
        self.source = source

    def __len__(self) -> int:
        return len(self.pairs)


def _check_file(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


# -- text and typed fields ---------------------------------------------------------------------
def _utf8_error(where: str, data: bytes, error: UnicodeDecodeError, first_line: int = 1) -> DataError:
    start = error.start
    line = first_line + data.count(b"\n", 0, start)
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return DataError(f"{where} line {line}: not valid UTF-8 (byte 0x{data[start]:02x} at column {column}); "
                     f"save the file as UTF-8")


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 bytes -> str (a leading byte-order mark dropped); DataError naming `where` and
    the line of the first byte that is not UTF-8."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(where, data, e) from None


def read_lines(path: Path):
    """(line number, text with its line ending) of a UTF-8 text file, streamed (a leading
    byte-order mark dropped). Lines end at \\n, \\r\\n or \\r, as with open(newline="").
    A line that is not UTF-8 is a DataError naming the file and the line."""
    n = 0
    with open(path, "rb") as f:
        for chunk in f:                       # binary lines end at b"\n" only
            if n == 0 and chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[len(codecs.BOM_UTF8):]
            for raw in chunk.splitlines(keepends=True):
                n += 1
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _utf8_error(str(path), raw, e, n) from None


def _read_json(path: Path):
    """The parsed JSON of `path`, or a DataError naming the file and the line."""
    try:
        return json.loads(decode_text(path.read_bytes(), str(path)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: not valid JSON (nested too deeply)") from None


def _describe(value) -> str:
    """A value as it reads in the file, for errors: 'the number 12345', 'null', 'NaN'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return f"an object {reprlib.repr(value)}"
    if isinstance(value, list):
        return f"a list {reprlib.repr(value)}"
    if isinstance(value, str):
        return f"the string {reprlib.repr(value)}"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def text_field(value, origin: str, name: str, *, required: bool = True) -> str:
    """A text field (caption, sentence, question) of a record, stripped. It must be a string:
    anything else is a DataError naming `origin` (file and row) and the field `name`; so is
    an empty one when `required`, and one that cannot be stored as UTF-8 (a lone surrogate
    from a JSON escape such as "\\ud800")."""
    if not isinstance(value, str):
        raise DataError(f"{origin}: {name} must be a string, got {_describe(value)}")
    text = value.strip()
    if required and not text:
        raise DataError(f"{origin}: empty {name}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{origin}: {name} holds {text[e.start]!r}, which is not a character (an unpaired "
                        f"surrogate from a JSON escape)") from None
    return text


def path_field(value, origin: str, name: str) -> str:
    """An image path field: a non-empty string without NUL bytes (else DataError)."""
    path = text_field(value, origin, name)
    if "\x00" in path:
        raise DataError(f"{origin}: {name} contains a NUL byte, which no file path can hold")
    return path


def id_field(value, origin: str, name: str) -> str:
    """An identity field (image id, NLVR2 directory): a string or an integer (not a boolean,
    a float or NaN, which would silently merge or split images), returned as a string."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{origin}: {name} must be a string or an integer, got {_describe(value)}")
    return text_field(str(value), origin, name)


def int_field(value, origin: str, name: str) -> int:
    """An integer field (VQA question / image id): an integer or a string of digits."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{origin}: {name} must be an integer, got {_describe(value)}")
    return value


def _object(value, origin: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object, got {_describe(value)}")
    return value


def _resolve(base: Path, image: str) -> str:
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else base / p)


# -- manifests ------------------------------------------------------------------------------
def _manifest_rows(path: Path):
    """(origin, row dict) for JSONL / CSV / TSV / JSON-list files."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for n, line in read_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            yield f"{path} line {n}", _object(row, f"{path} line {n}")
    elif suffix in (".csv", ".tsv"):
        line_read = [0]      # the line csv last pulled (its own line_num lags on a parse error)

        def lines():
            for line_read[0], line in read_lines(path):
                yield line
        reader = csv.DictReader(lines(), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty file (expected a header row)")
            for row in reader:
                # DictReader gives None for missing trailing fields
                yield f"{path} line {reader.line_num}", {k: v for k, v in row.items()
                                                         if v is not None and k is not None}
        except csv.Error as e:
            raise DataError(f"{path} line {line_read[0]}: not valid {suffix[1:].upper()} ({e})") from None
    elif suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects (or a Karpathy JSON with 'images')")
        for n, row in enumerate(data):
            yield f"{path} entry {n}", _object(row, f"{path} entry {n}")
    else:
        raise DataError(f"{path}: unknown manifest type {suffix!r}; expected .jsonl, .csv, .tsv or .json")


def read_manifest(path: PathLike, *, image_key: str = "image", caption_key: str = "caption",
                  id_key: Optional[str] = "image_id", image_root: Optional[PathLike] = None,
                  require_caption: bool = True, check_files: bool = False) -> Records:
    """Image-caption pairs from a JSONL / CSV / TSV / JSON-list manifest.

    image_root: folder relative image paths resolve against (default: the manifest's folder).
    A caption given as a list (ALBEF JSON) becomes one record per caption. Types are checked
    (module docstring); a null caption counts as none (an error when require_caption).
    check_files: stat every image now (errors name the row) instead of when it is loaded.
    """
    path = _check_file(path, "manifest")
    base = Path(image_root) if image_root is not None else path.parent
    pairs = []
    for origin, row in _manifest_rows(path):
        if image_key not in row:
            raise DataError(f"{origin}: missing column {image_key!r} (columns: {sorted(row)}); "
                            f"set image_key= to the column holding the image path")
        image = path_field(row[image_key], origin, f"image path {image_key!r}")
        captions = row.get(caption_key)
        if captions is None:
            if require_caption:
                what = f"null caption in column {caption_key!r}" if caption_key in row else \
                    f"missing column {caption_key!r} (columns: {sorted(row)})"
                raise DataError(f"{origin}: {what}; set caption_key= to the column holding the caption")
            captions = [""]
        elif isinstance(captions, list):
            if not captions and require_caption:
                raise DataError(f"{origin}: caption {caption_key!r} is an empty list")
            captions = [text_field(c, origin, f"caption {caption_key!r}[{k}]", required=require_caption)
                        for k, c in enumerate(captions)] or [""]
        else:
            captions = [text_field(captions, origin, f"caption {caption_key!r}", required=require_caption)]
        resolved = _resolve(base, image)
        if check_files and not Path(resolved).is_file():
            raise DataError(f"{origin}: image file {resolved} does not exist")
        has_id = id_key and row.get(id_key) is not None and row.get(id_key) != ""
        key = id_field(row[id_key], origin, f"id {id_key!r}") if has_id else resolved
        for caption in captions:
            pairs.append(PairRecord(ImageRef(resolved), caption, key, origin))
    if not pairs:
        raise DataError(f"{path}: no rows")
    return Records(pairs, str(path))


# -- Karpathy JSON --------------------------------------------------------------------------
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",),
                   "restval": ("restval",), "all": ("train", "restval", "val", "test")}


def read_karpathy(path: PathLike, split: str = "train", *, image_root: Optional[PathLike] = None) -> Records:
    """COCO / Flickr30k Karpathy-split JSON: one record per sentence of each image of `split`.
    Images live at image_root / filepath / filename (COCO) or image_root / filename (Flickr);
    image_root defaults to the JSON's folder. Every entry is checked, in every split: an
    image object with string filename / filepath / split, an integer or string cocoid /
    imgid, and a list of sentences, each a string or an object with a string "raw" or a
    list of string "tokens"; a malformed entry is a DataError naming images[n]."""
    path = _check_file(path, "Karpathy JSON")
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {sorted(KARPATHY_SPLITS)} for a Karpathy JSON, got {split!r}")
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a Karpathy JSON (expected an object with an 'images' list)")
    base = Path(image_root) if image_root is not None else path.parent
    wanted = KARPATHY_SPLITS[split]
    pairs, splits = [], set()
    for n, img in enumerate(data["images"]):
        origin = f"{path} images[{n}]"
        _object(img, origin)
        for key in ("filename", "sentences", "split"):
            if key not in img:
                raise DataError(f"{origin}: missing key {key!r}")
        img_split = text_field(img["split"], origin, "'split'")
        rel = Path(text_field(img.get("filepath", ""), origin, "'filepath'", required=False)) / \
            path_field(img["filename"], origin, "'filename'")
        id_name = "cocoid" if "cocoid" in img else "imgid"
        ident = id_field(img[id_name], origin, repr(id_name)) if id_name in img else str(rel)
        sentences = img["sentences"]
        if not isinstance(sentences, list):
            raise DataError(f"{origin}: 'sentences' must be a list of sentences, got {_describe(sentences)}")
        captions = [_karpathy_sentence(sent, f"{origin} sentences[{k}]") for k, sent in enumerate(sentences)]
        splits.add(img_split)
        if img_split not in wanted:
            continue
        image = str(base / rel)
        for k, caption in enumerate(captions):
            pairs.append(PairRecord(ImageRef(image), caption, ident, f"{origin} sentences[{k}]"))
    if not pairs:
        raise DataError(f"{path}: no images in split {split!r} (splits present: {sorted(splits)})")
    return Records(pairs, str(path))


def _karpathy_sentence(sent, origin: str) -> str:
    """A Karpathy sentence: {"raw": str} (or {"tokens": [str, ...]} when raw is absent/null)
    or a bare string."""
    if not isinstance(sent, dict):
        return text_field(sent, origin, "sentence")
    if sent.get("raw") is None and "tokens" in sent:
        tokens = sent["tokens"]
        if not isinstance(tokens, list):
            raise DataError(f"{origin}: 'tokens' must be a list of strings, got {_describe(tokens)}")
        return text_field(" ".join(text_field(t, origin, f"'tokens'[{i}]") for i, t in enumerate(tokens)),
                          origin, "'tokens'")
    if "raw" not in sent:
        raise DataError(f"{origin}: a sentence object needs 'raw' (or 'tokens'), got keys {sorted(sent)}")
    return text_field(sent["raw"], origin, "'raw'")


# -- image folders ----------------------------------------------------------------------------
def list_images(directory: PathLike) -> List[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist")
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_image_folder(directory: PathLike, *, require_caption: bool = True) -> Records:
    """Images under `directory` (recursive, sorted) with sidecar captions `<stem>.txt`
    (one caption per non-empty line; several lines = several captions of that image)."""
    images = list_images(directory)
    if not images:
        raise DataError(f"{directory}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    pairs = []
    for img in images:
        sidecar = img.with_suffix(".txt")
        if not sidecar.is_file():
            if require_caption:
                raise DataError(f"{img}: no caption file {sidecar.name} beside it")
            pairs.append(PairRecord(ImageRef(str(img)), "", str(img), str(img)))
            continue
        lines = [ln.strip() for ln in decode_text(sidecar.read_bytes(), str(sidecar)).splitlines() if ln.strip()]
        if not lines and require_caption:
            raise DataError(f"{sidecar}: empty caption file")
        for n, line in enumerate(lines, 1):
            pairs.append(PairRecord(ImageRef(str(img)), line, str(img), f"{sidecar} line {n}"))
    return Records(pairs, str(directory))


# -- text corpora -----------------------------------------------------------------------------
def read_texts(path: PathLike, mode: str = "auto", *, caption_key: str = "caption") -> List[str]:
    """Documents from a plain-text corpus (a .txt file or a folder of them). mode "line": one
    document per line; "paragraph": documents separated by blank lines; "auto": paragraphs
    when the file has blank lines between text, else lines. Manifests / Karpathy JSON give
    their captions."""
    if mode not in ("auto", "line", "paragraph"):
        raise ValueError(f"mode must be 'auto', 'line' or 'paragraph', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"{path}: no .txt files")
        return [d for f in files for d in read_texts(f, mode)]
    path = _check_file(path, "text corpus")
    if path.suffix.lower() in (".jsonl", ".csv", ".tsv"):
        return [p.caption for p in read_manifest(path, caption_key=caption_key).pairs]
    if path.suffix.lower() == ".json":
        data = _read_json(path)
        recs = read_karpathy(path, "all") if isinstance(data, dict) else read_manifest(path, caption_key=caption_key)
        return [p.caption for p in recs.pairs]
    text = decode_text(path.read_bytes(), str(path))
    blocks = re.split(r"\n\s*\n", text.strip())
    if mode == "paragraph" or (mode == "auto" and len(blocks) > 1):
        docs = [" ".join(b.split()) for b in blocks]
    else:
        docs = [ln.strip() for ln in text.splitlines()]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"{path}: empty corpus (no text)")
    return docs


# -- WebDataset-layout tar shards ---------------------------------------------------------------
def expand_shards(spec: PathLike) -> List[Path]:
    """'shards/data-{000..009}.tar', a glob, a folder of .tar files, or one .tar."""
    spec = str(spec)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        paths = [Path(spec[:m.start()] + str(i).zfill(width) + spec[m.end():]) for i in range(int(lo), int(hi) + 1)]
    elif any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(spec))]
    elif Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = [Path(spec)]
    if not paths:
        raise FileNotFoundError(f"no .tar shards match {spec}")
    for p in paths:
        _check_file(p, "tar shard")
    return paths


def _split_key(name: str) -> Tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def tar_sample_caption(txt: Optional[str], json_text: Optional[str], origin: str, caption_key: str) -> str:
    """The caption of a WebDataset sample from its decoded members: the txt member, else the
    `caption_key` (or "text") field of the json member (img2dataset writes both); "" when
    there is none. A json member that is not a JSON object, or a caption field that is not a
    string, is a DataError naming `origin`."""
    caption = txt
    if caption is None and json_text is not None:
        try:
            meta = json.loads(json_text)
        except json.JSONDecodeError as e:
            raise DataError(f"{origin}: its .json member is not valid JSON ({e.msg})") from None
        _object(meta, f"{origin} .json member")
        field = caption_key if caption_key in meta else "text"
        if meta.get(field) is not None:
            caption = text_field(meta[field], origin, f"caption {field!r} of its .json member", required=False)
    return (caption or "").strip()


def read_tar_shards(spec: PathLike, *, caption_key: str = "caption", require_caption: bool = True) -> Records:
    """Samples of WebDataset-layout shards: members sharing a key form one sample; the image
    is its jpg/jpeg/png/webp member, the caption its txt member or the `caption_key` (or
    "text") field of its json member."""
    pairs = []
    for shard in expand_shards(spec):
        samples: Dict[str, dict] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    s = samples.setdefault(key, {})
                    if "." + ext in IMAGE_EXTENSIONS:
                        s["image"] = ImageRef(str(shard), member.offset_data, member.size)
                    elif ext in ("txt", "json", "cls"):
                        s[ext] = decode_text(tar.extractfile(member).read(), f"{shard} member {member.name!r}")
        except tarfile.TarError as e:
            raise DataError(f"{shard}: not a readable tar file ({e})") from None
        for key, s in samples.items():
            origin = f"{shard} sample {key!r}"
            if "image" not in s:
                raise DataError(f"{origin}: no image member (.jpg/.png/.webp)")
            caption = tar_sample_caption(s.get("txt"), s.get("json"), origin, caption_key)
            if require_caption and not caption:
                raise DataError(f"{origin}: no caption (.txt member or {caption_key!r} in .json) or an empty one")
            pairs.append(PairRecord(s["image"], caption, f"{shard}:{key}", origin))
    if not pairs:
        raise DataError(f"{spec}: no samples in the shards")
    return Records(pairs, str(spec))


# -- VQAv2 --------------------------------------------------------------------------------------
def vqa_score(count: int) -> float:
    """VQAv2 soft score of an answer given by `count` of the 10 annotators (as ViLT / VLMo)."""
    return min(1.0, 0.3 * count) if count < 3 else (0.9 if count == 3 else 1.0)


_PUNCT = re.compile(r"[?!.,;:\"']+$")


def normalize_answer(answer: str) -> str:
    """Light VQA answer normalisation: lower case, trimmed, trailing punctuation removed,
    inner whitespace collapsed (the official evaluation's further rules are not applied)."""
    return " ".join(_PUNCT.sub("", str(answer).strip().lower()).split())


@dataclass
class VQARecord:
    question_id: int
    image: ImageRef
    image_id: int
    question: str
    answer_counts: Dict[str, int]   # normalised answer -> annotators (empty for test questions)


def read_vqav2(questions: PathLike, annotations: Optional[PathLike] = None, *,
               image_root: Optional[PathLike] = None, image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg"
               ) -> List[VQARecord]:
    """VQAv2 `v2_OpenEnded_mscoco_<subtype>_questions.json` (+ `v2_mscoco_<subtype>_annotations.json`).
    Images: image_root / image_pattern (default the COCO file names; subtype from the JSON's
    data_subtype, e.g. train2014)."""
    qpath = _check_file(questions, "VQAv2 questions JSON")
    qdata = _read_json(qpath)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise DataError(f"{qpath}: expected an object with a 'questions' list (VQAv2 questions file)")
    subtype = text_field(qdata.get("data_subtype", ""), str(qpath), "'data_subtype'", required=False)
    base = Path(image_root) if image_root is not None else qpath.parent
    answers: Dict[int, Dict[str, int]] = {}
    if annotations is not None:
        apath = _check_file(annotations, "VQAv2 annotations JSON")
        adata = _read_json(apath)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise DataError(f"{apath}: expected an object with an 'annotations' list (VQAv2 annotations file)")
        for n, ann in enumerate(adata["annotations"]):
            origin = f"{apath} annotations[{n}]"
            if "question_id" not in _object(ann, origin) or not isinstance(ann.get("answers"), list):
                raise DataError(f"{origin}: needs 'question_id' and an 'answers' list")
            given = []
            for k, a in enumerate(ann["answers"]):
                where = f"{origin} answers[{k}]"
                if "answer" not in _object(a, where):
                    raise DataError(f"{where}: missing key 'answer'")
                given.append(normalize_answer(text_field(a["answer"], where, "'answer'", required=False)))
            answers[int_field(ann["question_id"], origin, "'question_id'")] = dict(Counter(given))
    out = []
    for n, q in enumerate(qdata["questions"]):
        origin = f"{qpath} questions[{n}]"
        for key in ("question_id", "image_id", "question"):
            if key not in _object(q, origin):
                raise DataError(f"{origin}: missing key {key!r}")
        qid = int_field(q["question_id"], origin, "'question_id'")
        if annotations is not None and qid not in answers:
            raise DataError(f"{origin}: question_id {qid} has no annotation in {annotations}")
        image_id = int_field(q["image_id"], origin, "'image_id'")
        image = base / image_pattern.format(subtype=subtype, image_id=image_id)
        out.append(VQARecord(qid, ImageRef(str(image)), image_id, text_field(q["question"], origin, "'question'"),
                             answers.get(qid, {})))
    return out


def build_answer_vocab(records: Iterable[VQARecord], min_count: int = 9) -> List[str]:
    """Answers given (as the most common answer of a question or by annotators) at least
    `min_count` times over the records, most frequent first (ties alphabetical)."""
    total: Counter = Counter()
    for r in records:
        total.update(r.answer_counts)
    return sorted((a for a, c in total.items() if c >= min_count), key=lambda a: (-total[a], a))


def vqa_targets(answer_counts: Dict[str, int], answer_to_id: Dict[str, int]) -> Tuple[List[int], List[float]]:
    """Answer ids and soft scores of one question (answers outside the vocabulary dropped)."""
    ids, scores = [], []
    for a, c in sorted(answer_counts.items()):
        if a in answer_to_id:
            ids.append(answer_to_id[a])
            scores.append(vqa_score(c))
    return ids, scores


# -- NLVR2 ----------------------------------------------------------------------------------------
@dataclass
class NLVR2Record:
    identifier: str
    left: ImageRef
    right: ImageRef
    sentence: str
    label: int


def read_nlvr2(path: PathLike, *, image_root: Optional[PathLike] = None) -> List[NLVR2Record]:
    """NLVR2 JSONL (`train.json` / `dev.json` / `test1.json`, one object a line): sentence,
    label "True"/"False", identifier "split-set-pair-sentence"; images at
    image_root[/directory]/<identifier without its last part>-img0.png and -img1.png (the
    train images sit in numbered subfolders given by "directory"). Rows with explicit
    "left_image" / "right_image" paths use those instead."""
    path = _check_file(path, "NLVR2 JSONL")
    base = Path(image_root) if image_root is not None else path.parent
    out = []
    for n, line in read_lines(path):
        if not line.strip():
            continue
        origin = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{origin}: not valid JSON ({e.msg})") from None
        for key in ("identifier", "sentence", "label"):
            if key not in _object(row, origin):
                raise DataError(f"{origin}: missing key {key!r}")
        identifier = id_field(row["identifier"], origin, "'identifier'")
        # JSON booleans, 0 / 1, or the strings "True" / "False" / "1" / "0" of the official files
        label = str(row["label"]).strip().lower() if isinstance(row["label"], (bool, int, str)) else ""
        if label not in ("true", "false", "1", "0"):
            raise DataError(f"{origin}: label must be True/False, got {_describe(row['label'])}")
        if "left_image" in row and "right_image" in row:
            left = _resolve(base, path_field(row["left_image"], origin, "'left_image'"))
            right = _resolve(base, path_field(row["right_image"], origin, "'right_image'"))
        else:
            prefix = identifier.rsplit("-", 1)[0]
            folder = base / id_field(row["directory"], origin, "'directory'") if "directory" in row else base
            left, right = str(folder / f"{prefix}-img0.png"), str(folder / f"{prefix}-img1.png")
        out.append(NLVR2Record(identifier, ImageRef(left), ImageRef(right),
                               text_field(row["sentence"], origin, "'sentence'"), int(label in ("true", "1"))))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def group_by_image(records: Records) -> Tuple[List[ImageRef], List[str], List[int], List[str], List[str]]:
    """(images, captions, text_to_image, image_keys, origins) for retrieval evaluation."""
    first: Dict[str, int] = {}
    images, keys, origins, captions, text_to_image = [], [], [], [], []
    for p in records.pairs:
        if p.image_key not in first:
            first[p.image_key] = len(images)
            images.append(p.image)
            keys.append(p.image_key)
            origins.append(p.origin)
        captions.append(p.caption)
        text_to_image.append(first[p.image_key])
    return images, captions, text_to_image, keys, origins
