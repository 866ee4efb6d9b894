"""Streaming WebDataset / img2dataset shards (issue 23 part 1, vlmo_fast/data/streaming.py):
paths, brace patterns, globs, folders, file:// URLs and pipe: commands; sharding over ranks x
workers; exact mid-epoch resume; bad shards and samples skipped and counted; img2dataset
counts; which reader a source gets. Every shard is written here (tiny JPEGs)."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")

from vlmo_fast.data import build_pretrain_loader, build_tokenizer  # noqa: E402
from vlmo_fast.data.formats import DataError  # noqa: E402
from vlmo_fast.data.loader import Loader, TooManyBadSamples  # noqa: E402
from vlmo_fast.data.sources import check_data_source, open_records, pretrain_reader  # noqa: E402
from vlmo_fast.data.streaming import (KEY_SHARD_STRIDE, StreamingLoader, expand_shard_urls,  # noqa: E402
                                      img2dataset_count)
from vlmo_fast.training.common import Batches  # noqa: E402

OPTS = dict(img_size=16, max_text_len=12)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("embedded", num_documents=100)


def _image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), (37 * i % 256, 90, 200 - 11 * i % 200)).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, i: int, *, image="jpg", txt=True, json_caption=False):
    """img2dataset's members of one sample: image, .txt caption, .json metadata."""
    out = []
    if image:
        out.append((f"{key}.{image}", _image_bytes(i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image])))
    if txt:
        out.append((f"{key}.txt", f"caption of sample {key}".encode()))
    meta = {"key": key, "url": f"http://example/{key}.jpg"}
    if json_caption:
        meta["caption"] = f"caption of sample {key}"
    out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def write_shards(folder, n_shards: int, per_shard, stats: bool = False):
    """n_shards shards {000..}.tar of per_shard samples (an int or one per shard), keys
    SSSIIII; the second sample of each shard has its caption only in the .json, the third is
    a PNG, the fourth a WebP. Returns {caption: (shard, index)} of every sample."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for s in range(n_shards):
        count = per_shard if isinstance(per_shard, int) else per_shard[s]
        members = []
        for i in range(count):
            key = f"{s:03d}{i:04d}"
            image = {2: "png", 3: "webp"}.get(i, "jpg")
            members += _sample(key, s * 100 + i, image=image, txt=i != 1, json_caption=i == 1)
            expected[f"caption of sample {key}"] = (s, i)
        _write_tar(folder / f"{s:03d}.tar", members)
        if stats:
            (folder / f"{s:03d}_stats.json").write_text(json.dumps({"count": count + 2, "successes": count}))
    return expected


def _captions(tok, batches):
    return [tok.decode(ids[mask.bool()].tolist()) for b in batches for ids, mask in zip(b["text_ids"], b["text_mask"])]


def _ids(batches):
    return [int(i) for b in batches for i in b["image_ids"]]


# -- sources --------------------------------------------------------------------------------------
def test_every_spelling_of_a_shard_set_reads_each_sample_once(tmp_path, tok):
    expected = write_shards(tmp_path / "d", 4, 5)
    d = tmp_path / "d"
    all_ids = sorted(s * KEY_SHARD_STRIDE + i for s, i in expected.values())
    specs = [str(d / "{000..003}.tar"), str(d / "*.tar"), str(d), f"file://{d}/{{000..003}}.tar",
             f"pipe:cat {d}/{{000..003}}.tar", f"{d}/{{000..001}}.tar::{d}/{{002..003}}.tar"]
    for spec in specs:
        loader = build_pretrain_loader(spec, tok, "vl", 3, stream=True, **OPTS)
        assert isinstance(loader, StreamingLoader), spec
        batches = list(loader)
        assert sorted(_ids(batches)) == all_ids, spec
        assert loader.num_skipped == 0
    # captions from .txt, or from the .json when there is no .txt; PNG and WebP decode like JPEG
    loader = build_pretrain_loader(str(d / "{000..003}.tar"), tok, "vl", 20, stream=True, shuffle=False, **OPTS)
    items = [(kind, item) for kind, item, _ in loader.source.read_shard(0, 1, 0)]
    assert [kind for kind, _ in items] == ["item"] * 5
    assert [item["text"] for _, item in items] == [f"caption of sample 001{i:04d}" for i in range(5)]
    assert all(item["image"].shape == (3, 16, 16) and abs(item["image"]).max() <= 1 for _, item in items)
    assert [item["image_id"] for _, item in items] == [KEY_SHARD_STRIDE + i for i in range(5)]


def test_vision_and_text_stages_stream_too(tmp_path, tok):
    write_shards(tmp_path, 2, 4)
    vision = list(build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vision", 3, stream=True, **OPTS,
                                        patch_size=4))
    assert sum(len(b["images"]) for b in vision) == 8 and "patch_mask" in vision[0]
    text = list(build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "text", 3, stream=True, **OPTS))
    assert sum(len(b["text_ids"]) for b in text) == 8 and "images" not in text[0]


# -- sharding ---------------------------------------------------------------------------------------
def _epoch_ids(spec, tok, world, workers=0, epoch=0, batch_size=2, **kw):
    per_rank = []
    for rank in range(world):
        loader = build_pretrain_loader(spec, tok, "vl", batch_size, rank=rank, world=world, num_workers=workers,
                                       stream=True, **OPTS, **kw)
        loader.set_epoch(epoch)
        per_rank.append(_ids(list(loader)))
    return per_rank


def test_shards_split_over_ranks_and_workers_without_overlap(tmp_path, tok):
    sizes = [3, 4, 2, 5, 3, 4, 1, 2, 3, 4, 2, 3]
    expected = write_shards(tmp_path, 12, sizes)
    spec = str(tmp_path / "{000..011}.tar")
    everything = sorted(s * KEY_SHARD_STRIDE + i for s, i in expected.values())
    for world, workers in ((3, 0), (2, 2)):            # 3 and 4 streams: 12 shards divide evenly
        per_rank = _epoch_ids(spec, tok, world, workers)
        assert sorted(sum(per_rank, [])) == everything                       # every sample once
        shards = [{i // KEY_SHARD_STRIDE for i in ids} for ids in per_rank]
        assert all(not (a & b) for k, a in enumerate(shards) for b in shards[k + 1:])   # no shard on two ranks
    # 12 shards over 5 streams (uneven): every sample still once per epoch
    per_rank = _epoch_ids(spec, tok, 5)
    assert sorted(sum(per_rank, [])) == everything
    assert sorted(len({i // KEY_SHARD_STRIDE for i in ids}) for ids in per_rank) == [2, 2, 2, 3, 3]
    # drop_last: each stream reads 12 // 5 = 2 shards; the 2 left out change with the epoch (batches
    # of 1, so that no shard's samples all sit in a dropped last batch)
    left_out = []
    for epoch in (0, 1, 2):
        per_rank = _epoch_ids(spec, tok, 5, epoch=epoch, drop_last=True, batch_size=1)
        read = [{i // KEY_SHARD_STRIDE for i in ids} for ids in per_rank]
        assert [len(r) for r in read] == [2] * 5
        left_out.append(set(range(12)) - set().union(*read))
    assert all(len(x) == 2 for x in left_out) and len({frozenset(x) for x in left_out}) > 1


def test_epochs_reshuffle_shards_and_samples(tmp_path, tok):
    write_shards(tmp_path, 4, 6)
    loader = build_pretrain_loader(str(tmp_path / "{000..003}.tar"), tok, "vl", 4, stream=True, shuffle_block=4,
                                   **OPTS)
    first, second = _ids(list(loader)), _ids(list(loader))               # iterating again: the next epoch
    assert loader.epoch == 1 and sorted(first) == sorted(second) and first != second
    unshuffled = build_pretrain_loader(str(tmp_path / "{000..003}.tar"), tok, "vl", 4, stream=True, shuffle=False,
                                       **OPTS)
    assert _ids(list(unshuffled)) == sorted(first)                       # file order


# -- exact resume -----------------------------------------------------------------------------------
def _same_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_same_batches(tmp_path, tok, workers):
    # shards of 7 in blocks of 3: cuts fall inside blocks, on block and shard boundaries
    write_shards(tmp_path, 6, [7, 5, 7, 6, 7, 4])
    spec = str(tmp_path / "{000..005}.tar")

    def make():
        return build_pretrain_loader(spec, tok, "vl", 3, num_workers=workers, stream=True, shuffle_block=3,
                                     seed=5, **OPTS)
    reference = Batches(make())
    expected = [reference.next() for _ in range(40)]                     # ~3 epochs
    assert reference.loader.epoch >= 2
    for cut in ((1, 4, 7, 13, 17) if workers == 0 else (4, 13)):      # worker processes start per epoch: fewer
        loader = make()
        batches = Batches(loader)
        taken = [batches.next() for _ in range(cut)]
        for got, want in zip(taken, expected):
            _same_batches(got, want)
        state = json.loads(json.dumps(loader.state_dict()))              # as a checkpoint stores it
        resumed = make()
        resumed.load_state_dict(state)
        again = Batches(resumed)
        for k in range(cut, cut + 14):
            _same_batches(again.next(), expected[k])


def test_resume_refuses_a_state_from_other_settings(tmp_path, tok):
    write_shards(tmp_path, 4, 3)
    spec = str(tmp_path / "{000..003}.tar")
    loader = build_pretrain_loader(spec, tok, "vl", 2, stream=True, **OPTS)
    next(iter(loader))
    state = loader.state_dict()
    other_rank = build_pretrain_loader(spec, tok, "vl", 2, stream=True, rank=1, world=2, **OPTS)
    with pytest.raises(ValueError, match="rank=0 in the state, 1 here .each rank resumes from its own state"):
        other_rank.load_state_dict(state)
    more_workers = build_pretrain_loader(spec, tok, "vl", 2, stream=True, num_workers=2, **OPTS)
    with pytest.raises(ValueError, match="streams_per_rank=1 in the state.*same number of workers"):
        more_workers.load_state_dict(state)
    other_shards = build_pretrain_loader(str(tmp_path / "{000..002}.tar"), tok, "vl", 2, stream=True, **OPTS)
    with pytest.raises(ValueError, match="num_shards=4"):
        other_shards.load_state_dict(state)
    indexed = build_pretrain_loader(spec, tok, "vl", 2, stream=False, **OPTS)
    assert isinstance(indexed, Loader)
    with pytest.raises(ValueError, match="position of a 'stream' loader"):
        indexed.load_state_dict(state)
    with pytest.raises(ValueError, match="position of an indexed loader"):
        loader.load_state_dict(indexed.state_dict())


# -- bad shards and samples -----------------------------------------------------------------------------
def test_bad_shards_and_samples_are_skipped_and_counted(tmp_path, tok, caplog):
    d = tmp_path
    expected = write_shards(d, 3, 6)                                     # 000-002: good
    good = {s * KEY_SHARD_STRIDE + i for s, i in expected.values()}
    # 003: one corrupt JPEG, one sample without its image, one without a caption
    members = _sample("0030000", 1) + [("0030001.jpg", b"\xff\xd8 not a jpeg"), ("0030001.txt", b"corrupt")]
    members += [("0030002.txt", b"no image"), ("0030003.jpg", _image_bytes(3)), ("0030003.json", b"{}")]
    members += _sample("0030004", 4)
    _write_tar(d / "003.tar", members)
    good |= {3 * KEY_SHARD_STRIDE + 0, 3 * KEY_SHARD_STRIDE + 4}
    # 004: truncated in its 4th sample; img2dataset's stats say it had 6
    whole = _write_tar(d / "full.tar", sum((_sample(f"004{i:04d}", i) for i in range(6)), []))
    data = whole.read_bytes()
    cut = data.index(b"0040003.txt") + 600                               # inside that sample's members
    (d / "004.tar").write_bytes(data[:cut])
    whole.unlink()
    (d / "004_stats.json").write_text(json.dumps({"successes": 6, "count": 8}))
    good |= {4 * KEY_SHARD_STRIDE + i for i in range(3)}
    # 005: missing (no stats: its loss is estimated from the mean shard size)
    spec = str(d / "{000..005}.tar")
    loader = build_pretrain_loader(spec, tok, "vl", 4, stream=True, shuffle=False, max_bad_fraction=0.5, **OPTS)
    with caplog.at_level("WARNING", logger="vlmo_fast.data.streaming"):
        batches = list(loader)
    assert sorted(_ids(batches)) == sorted(good)                          # every readable sample, once
    # 3 bad samples + 3 lost in 004 (6 counted - 3 read) + 005 ~ the mean size of the shards read whole
    mean = round((6 * 3 + 5) / 4)
    assert loader.num_skipped == loader.epoch_skipped == 3 + 3 + mean == sum(int(b["num_skipped"]) for b in batches)
    listed = "\n".join(loader.epoch_bad_samples)
    assert "003.tar member 0030001.jpg is corrupt" in listed
    assert "003.tar sample '0030002': no image member" in listed
    assert "003.tar sample '0030003': no caption" in listed
    assert "004.tar: shard unreadable after 3 samples" in listed and "img2dataset counted 6" in listed
    assert "005.tar: shard unreadable after 0 samples (FileNotFoundError" in listed
    assert f"{mean} samples lost (estimated from the mean shard size" in listed
    assert any("skipping the rest of a shard" in r.getMessage() for r in caplog.records)
    # the same data under the default limit (1 %) stops, naming the files
    strict = build_pretrain_loader(spec, tok, "vl", 4, stream=True, shuffle=False, **OPTS)
    with pytest.raises(TooManyBadSamples, match=r"samples were unreadable and skipped in epoch 0") as e:
        list(strict)
    assert "003.tar" in str(e.value) and "estimated" in str(e.value)
    # skip_bad=False: the first bad sample is a one-line DataError
    with pytest.raises(DataError, match=r"003.tar member 0030001.jpg is corrupt"):
        list(build_pretrain_loader(spec, tok, "vl", 4, stream=True, shuffle=False, skip_bad=False, **OPTS))


def test_a_failing_pipe_command_is_a_broken_shard(tmp_path, tok):
    write_shards(tmp_path, 3, 4)
    spec = f"pipe:cat {tmp_path}/{{000..002}}.tar::pipe:cat {tmp_path}/missing.tar"
    loader = build_pretrain_loader(spec, tok, "vl", 5, stream=True, shuffle=False, max_bad_fraction=0.5, **OPTS)
    assert len(_ids(list(loader))) == 12
    assert loader.num_skipped == 4                                       # the mean shard size
    assert "missing.tar: shard unreadable after 0 samples (the command exited with status 1)" in \
        loader.epoch_bad_samples[0]


def test_nothing_readable_is_an_error_not_an_endless_loop(tmp_path, tok):
    (tmp_path / "000.tar").write_bytes(b"not a tar file at all" * 40)
    (tmp_path / "001.tar").write_bytes(b"")
    loader = build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, stream=True,
                                   max_bad_fraction=1.0, **OPTS)
    with pytest.raises(DataError, match=r"no readable sample in this rank's shards in epoch 0"):
        list(loader)


def test_img2dataset_counts_are_read_when_present(tmp_path):
    write_shards(tmp_path, 2, 3, stats=True)
    assert img2dataset_count(str(tmp_path / "000.tar")) == 3
    assert img2dataset_count(f"file://{tmp_path}/001.tar") == 3
    assert img2dataset_count(str(tmp_path / "nothing.tar")) is None      # never required
    assert img2dataset_count(f"pipe:cat {tmp_path}/000.tar") is None
    (tmp_path / "000_stats.json").write_text("{not json")
    assert img2dataset_count(str(tmp_path / "000.tar")) is None


def test_img2dataset_parquet_counts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["a", "b", "c"], "status": ["success", "failed_to_download", "success"]}),
                   tmp_path / "000.parquet")
    assert img2dataset_count(str(tmp_path / "000.tar")) == 2


# -- choosing and checking the source ---------------------------------------------------------------
def test_which_reader_a_source_gets(tmp_path, tok):
    write_shards(tmp_path, 2, 3)
    assert pretrain_reader(f"pipe:cat {tmp_path}/000.tar") == "stream"
    assert pretrain_reader(f"file://{tmp_path}/000.tar") == "stream"
    assert pretrain_reader("s3://bucket/{0000..0009}.tar") == "stream"
    assert pretrain_reader(str(tmp_path / "{000..001}.tar")) == "tar"          # few local shards: indexed
    assert pretrain_reader(str(tmp_path / "{000..001}.tar"), stream=True) == "stream"
    assert pretrain_reader(str(tmp_path / "x{0000..0999}.tar")) == "stream"    # many: streamed (not opened)
    with pytest.raises(ValueError, match="can only be streamed"):
        pretrain_reader(f"pipe:cat {tmp_path}/000.tar", stream=False)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "c"}) + "\n")
    with pytest.raises(ValueError, match="stream=True needs WebDataset .tar shards"):
        pretrain_reader(tmp_path / "m.jsonl", stream=True)
    with pytest.raises(DataError, match="streamed shards serve pretraining only"):
        open_records(f"file://{tmp_path}/000.tar")
    # the pretraining job's own call (vlmo_fast/training/pretrain.py, no reader options) streams a URL, and
    # a folder of more than 16 shards (a path its --data check accepts)
    write_shards(tmp_path / "many", 17, 1)
    for source, n in ((f"file://{tmp_path}/{{000..001}}.tar", 6), (str(tmp_path / "many"), 17)):
        loader = build_pretrain_loader(source=source, tokenizer=tok, stage="vl", batch_size=2, rank=0, world=1,
                                       seed=1, world_seed=0, img_size=16, patch_size=4, max_text_len=12,
                                       split="train", num_workers=0, mlm_probability=0.15, mask_ratio=0.4)
        assert isinstance(loader, StreamingLoader) and len(_ids(list(loader))) == n


def test_startup_errors_are_clear_and_cost_no_shard_reads(tmp_path, tok):
    write_shards(tmp_path, 2, 3)
    with pytest.raises(FileNotFoundError, match=r"shard .*/099.tar \(the first of"):
        build_pretrain_loader(str(tmp_path / "{099..100}.tar"), tok, "vl", 2, stream=True, **OPTS)
    with pytest.raises(ImportError, match=r"nosuchproto://b/\{0..3\}.tar: cannot read nosuchproto:// URLs"):
        build_pretrain_loader("nosuchproto://b/{0..3}.tar", tok, "vl", 2, **OPTS)
    with pytest.raises(ValueError, match=r"2 shards cannot feed 1 ranks x 3 streams"):
        build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, stream=True, num_workers=3, **OPTS)
    with pytest.raises(ValueError, match="num_samples does not apply to streaming shards"):
        build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, stream=True, num_samples=3, **OPTS)
    with pytest.raises(TypeError, match=r"\['image_root'\] do not apply to streaming shards"):
        build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, stream=True, image_root=".", **OPTS)
    with pytest.raises(ValueError, match="shuffle_block must be"):
        build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, stream=True, shuffle_block=0, **OPTS)
    loader = build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, stream=True, **OPTS)
    with pytest.raises(TypeError, match="a streaming loader has no length"):
        len(loader)
    with pytest.raises(ValueError, match="glob patterns work for local paths only"):
        expand_shard_urls("s3://bucket/*.tar")
    # the job-side check of --data: patterns and URLs pass, typos fail without reading a shard
    check_data_source(str(tmp_path / "{000..001}.tar"))
    check_data_source(f"pipe:cat {tmp_path}/000.tar")
    with pytest.raises(FileNotFoundError, match="099.tar"):
        check_data_source(str(tmp_path / "{099..100}.tar"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        check_data_source(str(tmp_path / "nothing.jsonl"))


def test_missing_webdataset_names_the_extra(tmp_path, tok, monkeypatch):
    write_shards(tmp_path, 2, 3)
    modules = __import__("sys").modules
    for name in [m for m in modules if m == "webdataset" or m.startswith("webdataset.")] + ["webdataset"]:
        monkeypatch.setitem(modules, name, None)                         # as if not installed
    with pytest.raises(ImportError, match=r"webdataset package .*vlmo_fast\[train\]"):
        build_pretrain_loader(f"file://{tmp_path}/{{000..001}}.tar", tok, "vl", 2, **OPTS)
    # a small local set still reads through the indexed reader without it
    assert pretrain_reader(str(tmp_path / "{000..001}.tar")) == "tar"
    assert len(_ids(list(build_pretrain_loader(str(tmp_path / "{000..001}.tar"), tok, "vl", 2, **OPTS)))) == 6
