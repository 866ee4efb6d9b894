"""Fault injection: writers killed at random moments and at every file-system step of a save,
corrupted and truncated files, interrupted directory swaps.

The writer is tests/fault_writer.py, started once (one torch import) and forking a child per
save; a kill is a real SIGKILL of that child after it signalled "about to write". After every
kill the checkpoint directory must load (with verification) as exactly one complete
generation, the old or the new one, and the next save must leave no temporaries.

VLMO_FAULT_KILLS=N sets the number of random kills of the slow loop (default 30).
"""
import contextlib
import json
import os
import random
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmo_fast import VLMo, VLMoConfig
from vlmo_fast.io import (OLD_PREFIX, TMP_PREFIX, CorruptFileError, atomic_directory, atomic_write_text,
                          read_manifest, recover_directory, resolve_directory, verify_manifest,
                          write_manifest)

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("fault_writer.py")
CHECKPOINT_FILES = {"config.json", "model.safetensors", "manifest.json"}


class Writer:
    """The long-lived writer process (see tests/fault_writer.py)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(HELPER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def __call__(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"the writer process did not answer {cmd} (exit code {self.proc.poll()})")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def writer():
    w = Writer()
    yield w
    w.close()


def loaded_generation(directory: Path) -> int:
    """Load with full verification; the content must be exactly one generation (see fault_writer)."""
    model = VLMo.from_pretrained(directory)
    g = int(model.config.name.removeprefix("gen-"))
    assert model.config.num_classes == 3 * (g % 2), "weights and config of different generations"
    for name, value in model.state_dict().items():
        assert bool((value == g).all()), f"{name} is not generation {g}"
    return g


def assert_clean(directory: Path) -> None:
    """Only the checkpoint directory beside it, only the checkpoint's files in it."""
    assert sorted(os.listdir(directory.parent)) == [directory.name]
    assert set(os.listdir(directory)) == CHECKPOINT_FILES


@pytest.mark.slow
def test_a_crash_at_every_file_system_step_leaves_old_or_new(writer, tmp_path):
    """Deterministic: the k-th rename/replace/fsync/unlink/rmtree/link/mkdir of a save over an
    existing checkpoint ends the process, for every k; then the next save cleans up."""
    d = tmp_path / "ckpt"
    writer(op="save", dir=str(d), gen=1)
    last, seen = 1, {"old": 0, "new": 0, "served_from_old_copy": 0}
    for k in range(200):
        g = last + 1
        reply = writer(op="crash", dir=str(d), gen=g, at=k)
        if not d.exists():
            seen["served_from_old_copy"] += 1  # killed between the two renames of the swap
        got = loaded_generation(d)
        assert got in (last, g), f"crash at step {k}: generation {got}, expected {last} or {g}"
        if not reply["crashed"]:  # k is past the last step: the save completed
            assert got == g
            assert_clean(d)
            break
        seen["old" if got == last else "new"] += 1
        writer(op="save", dir=str(d), gen=g + 1)  # the next save recovers and cleans up
        assert_clean(d)
        last = g + 1  # (the next iteration's load checks it)
    else:
        pytest.fail("the save never completed")
    # every kind of interrupted state was produced: before the swap, between its renames,
    # and after it (deleting the old copy)
    assert seen["old"] > 0 and seen["new"] > 0 and seen["served_from_old_copy"] > 0, seen
    print(f"\ncrash points: {k} steps, {seen}")


@pytest.mark.slow
def test_random_sigkills_during_save_pretrained(writer, tmp_path):
    kills = int(os.environ.get("VLMO_FAULT_KILLS", "30"))
    rng = random.Random(1234)
    d = tmp_path / "ckpt"
    # how long a forked save takes here, from "about to write" to its end
    durations = sorted(writer(op="kill", dir=str(d), gen=g, delay=None)["seconds"] for g in (1, 2, 3))
    span = 1.25 * durations[1]  # about one kill in five lands after the save has finished
    delays = [span * (i + rng.random()) / kills for i in range(kills)]  # stratified over the save
    rng.shuffle(delays)
    last, g = 3, 3
    stats = {"kills": 0, "killed_mid_save": 0, "loaded_old": 0, "loaded_new": 0,
             "served_from_old_copy": 0, "clean_saves": 0}
    for i, delay in enumerate(delays):
        g += 1
        reply = writer(op="kill", dir=str(d), gen=g, delay=delay)
        stats["kills"] += 1
        stats["killed_mid_save"] += reply["killed"]
        if not d.exists():
            stats["served_from_old_copy"] += 1
        got = loaded_generation(d)
        assert got in (last, g), f"kill {i}: generation {got}, expected {last} or {g}"
        if not reply["killed"]:
            assert got == g, "a save that completed must be visible"
        stats["loaded_new" if got == g else "loaded_old"] += 1
        last = got
        if i % 3 == 2:  # the next save recovers and leaves no temporaries
            g += 1
            writer(op="save", dir=str(d), gen=g)
            assert_clean(d)
            last = g  # (the next iteration's load checks it)
            stats["clean_saves"] += 1
    print(f"\nrandom kills: {stats}")
    assert stats["killed_mid_save"] > 0, stats  # (which states a kill hits is timing; the
    # deterministic crash test above covers every step)


# --- corruption ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("corrupt") / "ckpt"
    VLMo(VLMoConfig.preset("tiny")).save_pretrained(d)
    return d


def _flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _safetensors_header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_every_flipped_bit_is_detected_and_names_the_file(checkpoint):
    """60 random single-bit flips: 20 in the safetensors header, 20 in its tensor data, 10 in
    config.json, 10 in manifest.json. verify=True (the default) catches every one."""
    rng = random.Random(7)
    weights = checkpoint / "model.safetensors"
    header_end = _safetensors_header_end(weights)
    config, manifest = checkpoint / "config.json", checkpoint / "manifest.json"
    places = ([(weights, rng.randrange(0, header_end)) for _ in range(20)]
              + [(weights, rng.randrange(header_end, weights.stat().st_size)) for _ in range(20)]
              + [(config, rng.randrange(config.stat().st_size)) for _ in range(10)]
              + [(manifest, rng.randrange(manifest.stat().st_size)) for _ in range(10)])
    detected = 0
    for path, offset in places:
        bit = rng.randrange(8)
        _flip(path, offset, bit)
        try:
            with pytest.raises(CorruptFileError) as err:
                VLMo.from_pretrained(checkpoint)
            assert err.value.path.name in CHECKPOINT_FILES and str(err.value.path) in str(err.value)
            if path.name != "manifest.json":  # a flipped hash/size in the manifest names that file's entry
                assert err.value.path == path, (path, offset, str(err.value))
            detected += 1
        finally:
            _flip(path, offset, bit)
    assert detected == len(places)
    VLMo.from_pretrained(checkpoint)  # restored: loads again


def test_nan_written_into_the_weights_is_detected(checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint, d)
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = _safetensors_header_end(weights) + 64
    data[start:start + 4] = bytes.fromhex("0000c07f")  # a float32 NaN
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model.safetensors: SHA-256 differs"):
        VLMo.from_pretrained(d)
    loaded = VLMo.from_pretrained(d, verify=False)  # what verify=False means: no hash check
    assert any(torch.isnan(v).any() for v in loaded.state_dict().values())


@pytest.mark.filterwarnings("ignore:.*has no manifest.json")
@pytest.mark.parametrize("with_manifest", [True, False])
def test_truncation_and_header_damage_name_the_file_even_without_verification(checkpoint, tmp_path, with_manifest):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint, d)
    if not with_manifest:  # a checkpoint from before manifests: safetensors' own checks, wrapped
        (d / "manifest.json").unlink()
    weights = d / "model.safetensors"
    original = weights.read_bytes()
    header_end = _safetensors_header_end(weights)
    cases = {f"truncated to {n} bytes": original[:n]
             for n in (0, 5, 8, header_end - 1, header_end + 100, len(original) - 1)}
    cases["header length says 2^60"] = (2 ** 60).to_bytes(8, "little") + original[8:]
    cases["header is not JSON"] = original[:8] + b"#" + original[9:]
    cases["header names a dtype that does not exist"] = original.replace(b'"F32"', b'"F99"', 1)
    for what, data in cases.items():
        weights.write_bytes(data)
        with contextlib.nullcontext() if with_manifest else pytest.warns(UserWarning, match="no manifest"):
            with pytest.raises(CorruptFileError, match=rf"{weights}: ") as err:
                VLMo.from_pretrained(d, verify=False)
        assert err.value.path == weights, what
    weights.write_bytes(original)
    config = d / "config.json"
    text = config.read_text()
    for what, data in {"truncated config": text[: len(text) // 2],
                       "config with a wrong type": text.replace('"dim": 64', '"dim": "64"')}.items():
        config.write_text(data)
        with pytest.raises((CorruptFileError, TypeError, ValueError), match=str(config)):
            VLMo.from_pretrained(d, verify=False)
    config.write_text(text)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        VLMo.from_pretrained(d)


# --- the io building blocks ----------------------------------------------------------------
def test_an_error_inside_atomic_directory_leaves_the_old_directory(tmp_path):
    d = tmp_path / "out"
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(d) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (d / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]
    with atomic_directory(d) as tmp:  # by default nothing is carried over
        (tmp / "b.txt").write_text("b")
    assert sorted(os.listdir(d)) == ["b.txt"]


def test_interrupted_swaps_are_read_and_recovered(tmp_path):
    d = tmp_path / "out"
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("old")
    # killed between the renames: the old copy is aside, a complete new one is still a temporary
    os.rename(d, tmp_path / f"{OLD_PREFIX}out")
    (tmp_path / f"{TMP_PREFIX}out.x1y2z3_4").mkdir()
    (tmp_path / f"{TMP_PREFIX}out.x1y2z3_4" / "a.txt").write_text("new")
    (tmp_path / f"{TMP_PREFIX}out.v2.abcdefgh").mkdir()  # another writer's, for "out.v2"
    assert resolve_directory(d) == tmp_path / f"{OLD_PREFIX}out"  # readers see the old one
    assert len(os.listdir(tmp_path)) == 3  # and change nothing
    recover_directory(d)
    assert (d / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == [f"{TMP_PREFIX}out.v2.abcdefgh", "out"]
    os.rmdir(tmp_path / f"{TMP_PREFIX}out.v2.abcdefgh")
    # killed while deleting the old copy: the new one is in place, the leftover goes
    (tmp_path / f"{OLD_PREFIX}out").mkdir()
    (d / f"{TMP_PREFIX}a.txt.123.tmp").write_text("torn")  # a killed atomic_write inside
    with atomic_directory(d, keep=lambda name: True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(d)) == ["a.txt", "b.txt"]  # a.txt carried over, the torn file gone


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "latest"
    atomic_write_text(p, "step-1")

    def fail(tmp):
        Path(tmp).write_text("step-2 (partial")
        raise OSError("disk full")
    from vlmo_fast.io import atomic_write
    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, fail)
    assert p.read_text() == "step-1" and sorted(os.listdir(tmp_path)) == ["latest"]


def test_manifests(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.txt").write_text("hello")
    write_manifest(tmp_path, extra={"step": 7})
    manifest = verify_manifest(tmp_path)
    assert sorted(manifest["files"]) == ["a.bin", "b.txt"] and manifest["step"] == 7
    assert manifest["files"]["a.bin"]["bytes"] == 3
    (tmp_path / "a.bin").write_bytes(b"abd")
    verify_manifest(tmp_path, verify_hashes=False)  # same size: only the hash tells
    with pytest.raises(CorruptFileError, match=r"a.bin: SHA-256 differs"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"ab")
    with pytest.raises(CorruptFileError, match=r"a.bin: has 2 bytes, manifest.json records 3"):
        verify_manifest(tmp_path, verify_hashes=False)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(CorruptFileError, match=r"a.bin: missing"):
        verify_manifest(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    for bad, message in [({**data, "version": 2}, "manifest version 2"),
                         ({**data, "format": "x"}, "not a vlmo_fast.manifest file"),
                         ({**data, "files": {"a.bin": {"bytes": "3", "sha256": "0" * 64}}}, "malformed entry")]:
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(CorruptFileError, match=message):
            read_manifest(tmp_path)


def test_jsonl_logs_survive_a_torn_last_line(tmp_path):
    from vlmo_fast.io import append_jsonl, read_jsonl
    log = tmp_path / "logs" / "train.jsonl"
    for step in range(3):
        append_jsonl(log, {"step": step, "loss": 1.0 / (step + 1), "note": "a\nb"})
    with open(log, "ab") as f:  # a writer killed in the middle of a line
        f.write(b'{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(log)] == [0, 1, 2]
    append_jsonl(log, {"step": 3}, fsync=False)  # the torn tail is cut before appending
    assert [r["step"] for r in read_jsonl(log)] == [0, 1, 2, 3]
    assert read_jsonl(log)[0]["note"] == "a\nb"
    (tmp_path / "torn_only.jsonl").write_bytes(b'{"st')
    append_jsonl(tmp_path / "torn_only.jsonl", {"step": 0})
    assert read_jsonl(tmp_path / "torn_only.jsonl") == [{"step": 0}]
    log.write_bytes(log.read_bytes().replace(b'{"loss": 1.0', b'{"loss": 1.#', 1))
    with pytest.raises(CorruptFileError, match=r"train.jsonl: line 1 is not valid JSON"):
        read_jsonl(log)


def test_a_failed_swap_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    import errno
    d = tmp_path / "out"
    with atomic_directory(d) as tmp:
        (tmp / "a.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(TMP_PREFIX):  # the new directory cannot move into place
            raise OSError(errno.EXDEV, "cross-device link")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        with atomic_directory(d) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (d / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]
