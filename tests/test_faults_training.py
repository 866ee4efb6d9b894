"""Training checkpoints under faults (issue 20, items 1-4), with real DeepSpeed engines on a
tiny module (a world of one, CPU, gloo): JSON + tensors client state, weights-only loads,
integrity manifests (bit flips, truncation, empty and missing files), a missing or damaged
`latest`, pruning by lineage, append-only metrics, changed arguments on resume, and a kill
loop that SIGKILLs a training job at random moments, inside DeepSpeed's save too.

The kill loop (`kill_loop`) is a driver parametrised by how a run is started: `ForkServer`
(this file run as a script: imports torch and DeepSpeed once, forks a child per run of
`run_tiny_job`) or `CommandRunner` (any command line, e.g. `train/pretrain.py ...`). It checks
after every kill that the folder resumes from exactly the checkpoint the kill allows, and at
the end that the interrupted run equals an uninterrupted one bitwise (metrics and weights).
VLMO_FAULT_TRAINING_KILLS=N sets the number of random kills (default 12).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch
from torch import nn

from vlmo_fast.io import write_manifest
from vlmo_fast.training import faults
from vlmo_fast.training.checkpoint import (CheckpointError, ResumeWarning, decode_state, encode_state,
                                           find_resume_checkpoint, load_checkpoint, new_lineage,
                                           read_client_state, rng_state, save_checkpoint, set_rng_state,
                                           write_client_state)
from vlmo_fast.training.logs import MetricsLogger, read_metrics
from vlmo_fast.training.optim import lr_lambda
from vlmo_fast.training.resume import (OVERRIDABLE, ResumeArgsError, check_resume_args, initial_schedule,
                                       parse_overrides, plan_resume, record_run_args, resume_schedule,
                                       schedule_lambda, schedule_spec)

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- a tiny job
class TinyStep(nn.Module):
    """A step module in the training loop's protocol: dropout draws from the global RNG."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(8, 16), nn.Linear(16, 1), nn.Dropout(0.25)

    def external_parameters(self):
        return []

    def forward(self, x):
        out = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return {"loss": (out ** 2).mean(), "metrics": {"mean_out": out.mean().detach()}}


class TinyData:
    """Batches that are a function of their index; state_dict() is the position."""

    def __init__(self, seed: int = 0):
        self.seed, self.index = seed, 0

    def next(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.index)
        self.index += 1
        return torch.randn(4, 8, generator=g)

    def state_dict(self) -> Dict:
        return {"index": self.index, "seed": self.seed, "history": (self.index, "pos")}

    def load_state_dict(self, state: Dict) -> None:
        assert state["seed"] == self.seed and state["history"] == (state["index"], "pos")
        self.index = state["index"]


def tiny_args(**changes) -> argparse.Namespace:
    values = dict(steps=8, batch_size=4, grad_accum=1, lr=0.05, weight_decay=0.1, betas=(0.9, 0.98),
                  warmup_steps=2, schedule="linear", min_lr_ratio=0.0, clip=1.0, seed=0, save_every=2,
                  keep_last=2, log_every=1, zero=0, resume="auto", override_on_resume="", local_rank=0)
    values.update(changes)
    return argparse.Namespace(**values)


def tiny_engine(args: argparse.Namespace):
    from vlmo_fast.training.engine import build_ds_config, build_engine
    torch.manual_seed(args.seed)
    ds = build_ds_config({"zero_optimization": {"stage": args.zero}}, micro_batch=args.batch_size,
                         grad_accum=args.grad_accum, clip=args.clip, bf16=False)
    spec = schedule_spec(args, args.steps)
    return build_engine(TinyStep(), ds, lr=args.lr, weight_decay=args.weight_decay, betas=args.betas,
                        total_steps=spec["total"], warmup_steps=spec["warmup"], schedule=args.schedule,
                        min_lr_ratio=args.min_lr_ratio)


def run_tiny_job(out, stop_after: Optional[int] = None, **changes) -> Dict:
    """The training job of these tests (and of the kill loop's server): resume, train, save
    with the fault hooks, export final.safetensors. stop_after=k returns after step k as if
    the process had died there (after that step's save, if any)."""
    from safetensors.torch import save_file
    from vlmo_fast.training.engine import init_distributed
    out = Path(out)
    args = tiny_args(**changes)
    rank, world, _ = init_distributed()
    engine = tiny_engine(args)
    gen = torch.Generator().manual_seed(args.seed + 7)
    data = TinyData(args.seed)
    ckpt = out / "checkpoints"
    run_args = record_run_args(args, world_size=world)
    spec = schedule_spec(args, args.steps)
    schedule, lineage, step, resumed_from, messages = initial_schedule(spec), new_lineage(), 0, None, []
    point = find_resume_checkpoint(ckpt, args.resume)
    if point is not None:
        plan = plan_resume(point, run_args, args.override_on_resume, spec)
        client = load_checkpoint(engine, point, rank, plan=plan)
        step = client["step"]
        data.load_state_dict(client["data"])
        set_rng_state(client["rng"], {"noise": gen})
        lineage, schedule, resumed_from, messages = point.lineage, plan.schedule, str(point.path), plan.messages
    logger = MetricsLogger(out, "tiny", resume_step=step, resumed_from=resumed_from)
    hook = faults.checkpoint_hook(rank)
    while step < args.steps:
        lr = engine.lr_scheduler.get_last_lr()[0]
        x = data.next() + 0.1 * torch.randn(4, 8, generator=gen)
        o = engine(x)
        engine.backward(o["loss"])
        engine.step()
        step += 1
        logger.log([{"step": step, "loss": float(o["loss"].detach()), "mean_out": float(o["metrics"]["mean_out"]),
                     "lr": lr}])
        if step % args.save_every == 0 or step == args.steps:
            client = {"step": step, "data": data.state_dict(), "rng": lambda: rng_state({"noise": gen})}
            save_checkpoint(engine, ckpt, step, client, rank, args.keep_last, hook, lineage=lineage,
                            run_args=run_args, schedule=schedule)
        faults.maybe_kill("kill_after_step", step, rank)
        if stop_after is not None and step >= stop_after:   # as kill_after_step, in this process
            logger.close()
            return {"step": step, "messages": messages, "engine": engine}
    logger.close()
    save_file({k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()},
              str(out / "final.safetensors"))
    return {"step": step, "messages": messages, "engine": engine}


@pytest.fixture(scope="module")
def world():
    """A world of one in this process (gloo), as the in-process jobs make it. It is left up
    after the module, as those jobs leave it: DeepSpeed caches its groups, so a destroyed and
    re-created world would break the next in-process engine ("Group ... is not registered")."""
    saved = {k: os.environ.pop(k, None) for k in DIST_ENV}
    from vlmo_fast.training.engine import init_distributed
    try:
        yield init_distributed()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def pristine(world, tmp_path_factory):
    """Checkpoints at steps 2 and 4 of a tiny run (ZeRO-0)."""
    out = tmp_path_factory.mktemp("pristine")
    run_tiny_job(out, steps=4, keep_last=3)
    return out / "checkpoints"


def fresh_copy(pristine: Path, tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints"
    shutil.copytree(pristine, d)
    return d


def flip(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def weights(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


# ----------------------------------------------------------------------------- item 1: no pickle
def test_client_state_is_json_and_tensors_and_round_trips(tmp_path):
    import numpy as np
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = {"step": 7, "skipped": 0, "data": {"epoch": 1, "bad": ["a.png"], "pair": (1, "x"), "none": None},
             "scalar": np.int64(3), "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
             "rng": rng_state({"noise": gen})}
    write_client_state(tmp_path, 0, state)
    assert sorted(os.listdir(tmp_path)) == ["client_rank0.json", "client_rank0.safetensors"]
    json.loads((tmp_path / "client_rank0.json").read_text())   # plain JSON, no pickle anywhere
    expected = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen))
    back = read_client_state(tmp_path, 0)
    assert back["data"] == state["data"] and back["step"] == 7
    assert back["scalar"] == 3 and back["scalar"].dtype == np.int64
    assert back["array"].dtype == np.uint32 and (back["array"] == state["array"]).all()
    set_rng_state(back["rng"], {"noise": gen})
    again = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2]) and torch.equal(expected[3], again[3])
    with pytest.raises(TypeError, match=r"client state state.data.fn: cannot store a builtin_function_or_method"):
        encode_state({"data": {"fn": len}})
    with pytest.raises(TypeError, match="reserved"):
        encode_state({"__tensor__": 1})
    encoded, tensors = encode_state({"t": torch.ones(2)})
    with pytest.raises(ValueError, match="does not hold"):
        decode_state(encoded, {})


class Evil:
    """Unpickling it creates a file: the proof that a pickle ran code."""
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_client_state_is_refused_unless_trusted(world, pristine, tmp_path):
    d = fresh_copy(pristine, tmp_path)
    legacy = d / "step_000004"
    for name in ("checkpoint.json", "manifest.json", "client_rank0.json", "client_rank0.safetensors"):
        (legacy / name).unlink()   # the layout of an older vlmo_fast: DeepSpeed's files + a pickle
    shutil.rmtree(d / "step_000002")
    marker = tmp_path / "ran"
    Evil.marker = marker
    torch.save({"step": 4, "data": {"index": 4, "seed": 0, "history": (4, "pos")}, "evil": Evil()},
               legacy / "client_rank0.pt")
    with pytest.raises(CheckpointError, match=r"step_000004.*pickle.*--trust-pickle"):
        find_resume_checkpoint(d)
    engine = tiny_engine(tiny_args(steps=4))
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(engine, d, 0)
    assert not marker.exists()
    # opted in: DeepSpeed's files still load weights-only; our old pickle is unpickled
    with pytest.warns(ResumeWarning, match="older vlmo_fast"):
        point = find_resume_checkpoint(d, trust_pickle=True)
    client = load_checkpoint(engine, point, 0, trust_pickle=True)
    assert client["step"] == 4 and marker.exists()


def test_deepspeed_files_are_loaded_weights_only(world, pristine, tmp_path):
    """A model-states file that carries a code-running pickle, with a manifest that matches it
    (as an attacker who can write the folder would leave it): refused, nothing runs."""
    d = fresh_copy(pristine, tmp_path)
    folder = d / "step_000004"
    states = folder / "mp_rank_00_model_states.pt"
    sd = torch.load(states, weights_only=True)
    marker = tmp_path / "ran"
    Evil.marker = marker
    torch.save({**sd, "extra": Evil()}, states)
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, files=sorted(manifest["files"]), extra={"step": 4})
    engine = tiny_engine(tiny_args(steps=4))
    with pytest.raises(CheckpointError, match=r"step 4.*mp_rank_00_model_states.pt holds Python objects.*io.open"):
        load_checkpoint(engine, find_resume_checkpoint(d), 0)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None   # restored after the load


# ----------------------------------------------------------------------------- item 3: integrity
DAMAGE = {
    "bit flip in DeepSpeed's model states": ("mp_rank_00_model_states.pt", "flip", "SHA-256 differs"),
    "bit flip in the client tensors": ("client_rank0.safetensors", "flip", "SHA-256 differs"),
    "bit flip in checkpoint.json": ("checkpoint.json", "flip", "SHA-256 differs"),
    "truncated model states": ("mp_rank_00_model_states.pt", "half", "bytes, manifest.json records"),
    "empty model states": ("mp_rank_00_model_states.pt", "empty", "has 0 bytes"),
    "missing model states": ("mp_rank_00_model_states.pt", "delete", "missing"),
    "missing client state": ("client_rank0.json", "delete", "missing"),
    "manifest not JSON": ("manifest.json", "garbage", "not valid JSON"),
    "manifest missing, `latest` names it": ("manifest.json", "delete", "is missing, but"),
}


def damage(path: Path, how: str, rng: random.Random) -> None:
    if how == "flip":
        flip(path, rng.randrange(path.stat().st_size), rng.randrange(8))
    elif how == "half":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "empty":
        os.truncate(path, 0)
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00garbage")


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_named_then_auto_falls_back_and_strict_refuses(world, pristine, tmp_path, case):
    name, how, message = DAMAGE[case]
    rng = random.Random(case)
    for attempt in range(3 if how == "flip" else 1):   # bit flips at three random places
        d = fresh_copy(pristine, tmp_path / str(attempt))
        damage(d / "step_000004" / name, how, rng)
        with pytest.raises(CheckpointError, match=rf"step_000004 \(step 4\).*{name}.*{message}.*--resume strict"):
            find_resume_checkpoint(d, "strict")
        with pytest.warns(ResumeWarning, match=rf"step 2.*step_000004.*{name}.*{message}"):
            point = find_resume_checkpoint(d, "auto")
        assert point.step == 2 and len(point.skipped) == 1
    # and the fallback really loads (DeepSpeed + client state of step 2)
    client = load_checkpoint(tiny_engine(tiny_args(steps=4)), point, 0)
    assert client["step"] == 2 and client["data"]["index"] == 2


def test_unreadable_files_name_the_file_and_step_even_when_the_manifest_matches(world, pristine, tmp_path):
    """Damage that happened before the manifest was written (e.g. a bad disk during the save):
    DeepSpeed's read fails, and the error names the file and the step, not a zip-reader error."""
    for name, cut in (("mp_rank_00_model_states.pt", 0.5), ("mp_rank_00_model_states.pt", 0.0),
                      ("client_rank0.safetensors", 0.5)):
        d = fresh_copy(pristine, tmp_path / f"{name}-{cut}")
        folder = d / "step_000004"
        os.truncate(folder / name, int((folder / name).stat().st_size * cut))
        manifest = json.loads((folder / "manifest.json").read_text())
        write_manifest(folder, files=sorted(manifest["files"]), extra={"step": 4})
        with pytest.raises(CheckpointError, match=rf"{name}.*unreadable") as err:
            load_checkpoint(tiny_engine(tiny_args(steps=4)), find_resume_checkpoint(d), 0)
        assert "step_000004" in str(err.value)


def test_changed_world_size_is_named_before_deepspeed_reads(world, pristine, tmp_path):
    d = fresh_copy(pristine, tmp_path)
    folder = d / "step_000004"
    meta = json.loads((folder / "checkpoint.json").read_text())
    (folder / "checkpoint.json").write_text(json.dumps({**meta, "world_size": 2}))
    (folder / "mp_rank_00_model_states.pt").unlink()   # DeepSpeed would fail on it: it must not get there
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, files=sorted(set(manifest["files"]) - {"mp_rank_00_model_states.pt"}),
                   extra={"step": 4})
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\); this run has 1"):
        load_checkpoint(tiny_engine(tiny_args(steps=4)), find_resume_checkpoint(d), 0)


# ----------------------------------------------------------------------------- item 2: `latest`, pruning
def test_a_removed_latest_resumes_from_the_newest_complete_checkpoint(world, tmp_path):
    """The issue's reproduction: rm latest, rerun. Before: restart at step 0, metrics emptied,
    the first save pruned the earlier run's checkpoints."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_tiny_job(full, steps=6)
    run_tiny_job(cut, steps=6, stop_after=4)   # saved 2 and 4, then died at step 4's end
    (cut / "checkpoints" / "latest").unlink()
    before = read_metrics(cut / "metrics.jsonl", raw=True)
    with pytest.warns(ResumeWarning, match=r"latest is missing"):
        run_tiny_job(cut, steps=6)
    raw = read_metrics(cut / "metrics.jsonl", raw=True)
    assert raw[:len(before)] == before   # every earlier line kept
    assert raw[len(before)]["event"] == "restart" and raw[len(before)]["at_step"] == 4
    assert read_metrics(cut / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")
    a, b = weights(full / "final.safetensors"), weights(cut / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pointer", ["garbage\x00", "step_000009", "step_000002"])
def test_a_damaged_or_stale_latest_is_only_a_hint(world, pristine, tmp_path, pointer):
    d = fresh_copy(pristine, tmp_path)
    (d / "latest").write_text(pointer)
    with pytest.warns(ResumeWarning, match="latest"):
        assert find_resume_checkpoint(d).step == 4


def test_no_complete_checkpoint_is_refused_and_interrupted_saves_restart(world, pristine, tmp_path):
    d = fresh_copy(pristine, tmp_path)
    os.truncate(d / "step_000004" / "mp_rank_00_model_states.pt", 10)
    flip(d / "step_000002" / "client_rank0.safetensors", 100)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*step 4.*step 2.*Nothing was deleted"):
        find_resume_checkpoint(d)
    assert sorted(p for p in os.listdir(d) if p.startswith("step_")) == ["step_000002", "step_000004"]
    # only an interrupted first save (no manifest, never pointed at): a fresh start, announced
    out = tmp_path / "first"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    (out / "checkpoints" / "step_000002" / "checkpoint.json").write_text("{}")
    with pytest.warns(ResumeWarning, match="only interrupted saves.*starting from step 0"):
        assert run_tiny_job(out, steps=2)["step"] == 2
    assert find_resume_checkpoint(out / "checkpoints").step == 2   # the save replaced it


def _save(engine, d, step, lineage, keep_last=2):
    client = {"step": step, "data": {"index": step}, "rng": lambda: rng_state({})}
    return save_checkpoint(engine, d, step, client, 0, keep_last, lineage=lineage)


def test_pruning_deletes_only_older_checkpoints_of_the_same_lineage(world, tmp_path):
    d = tmp_path / "checkpoints"
    engine = tiny_engine(tiny_args())
    other, mine = "a" * 32, "b" * 32
    for step in (10, 15):
        _save(engine, d, step, other)
    shutil.copytree(d / "step_000010", d / "step_000003")
    for name in ("checkpoint.json", "manifest.json", "client_rank0.json", "client_rank0.safetensors"):
        (d / "step_000003" / name).unlink()
    torch.save({"step": 3}, d / "step_000003" / "client_rank0.pt")          # an older vlmo_fast's
    for step, lineage in ((1, mine), (8, mine)):                             # interrupted saves
        (d / f"step_{step:06d}").mkdir()
        (d / f"step_{step:06d}" / "checkpoint.json").write_text(json.dumps(
            {"format": "vlmo_fast.training_checkpoint", "version": 1, "step": step, "lineage": lineage}))
    for step in (2, 4, 6):
        _save(engine, d, step, mine)
    # deleted: this lineage's older complete beyond keep-last (2) and older interrupted save (1);
    # kept: its newer interrupted save (8), the other lineage's (10, 15), an older version's (3)
    assert sorted(p for p in os.listdir(d) if p.startswith("step_")) == [
        "step_000003", "step_000004", "step_000006", "step_000008", "step_000010", "step_000015"]
    # a save over another run's complete checkpoint stops, and leaves it as it was
    with pytest.raises(CheckpointError, match=r"step_000010 is a checkpoint of another run"):
        _save(engine, d, 10, mine)
    with pytest.warns(ResumeWarning, match="names step_000006"):
        assert find_resume_checkpoint(d).lineage == other   # step 15 (other) is the newest complete
    # a fresh run (--resume never) refuses a folder that holds checkpoints
    with pytest.raises(CheckpointError, match="--resume never.*never deletes them"):
        find_resume_checkpoint(d, "never")
    assert find_resume_checkpoint(tmp_path / "empty", "never") is None


# ----------------------------------------------------------------------------- metrics
def test_metrics_are_appended_never_truncated(tmp_path):
    logger = MetricsLogger(tmp_path, "s")
    logger.log([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)])
    logger.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "lo')   # killed mid-append
    logger = MetricsLogger(tmp_path, "s", resume_step=2, resumed_from="ckpt/step_000002")
    logger.log([{"step": s, "loss": 10.0 + s} for s in (3, 4, 5)])
    logger.close()
    raw = read_metrics(tmp_path / "metrics.jsonl", raw=True)
    assert [r.get("step", r.get("event")) for r in raw] == [1, 2, 3, 4, "restart", 3, 4, 5]
    assert raw[4]["from"] == "ckpt/step_000002"
    assert [(r["step"], r["loss"]) for r in logger.read()] == [(1, 1.0), (2, 0.5), (3, 13.0), (4, 14.0), (5, 15.0)]
    MetricsLogger(tmp_path, "s", resume_step=0).close()   # a restart from scratch supersedes everything
    assert logger.read() == [] and len(logger.read(raw=True)) == 9


# ----------------------------------------------------------------------------- item 4: changed arguments
SAVED = record_run_args(tiny_args(), world_size=1, ds_config={"zero_optimization": {"stage": 1},
                                                              "steps_per_print": 10, "gradient_clipping": 1.0})


def test_changed_arguments_are_classified():
    def now(**changes):
        ds = {"zero_optimization": {"stage": 1}, "steps_per_print": 10, "gradient_clipping": 1.0}
        ds.update(changes.pop("ds", {}))
        return record_run_args(tiny_args(**changes), world_size=1, ds_config=ds)
    assert check_resume_args(SAVED, now()).messages() == []
    free = check_resume_args(SAVED, now(log_every=5, save_every=3, ds={"steps_per_print": 1}))
    assert set(free.free) == {"log_every", "save_every", "ds_config.steps_per_print"}
    with pytest.raises(ResumeArgsError, match=r"--lr: 0.05 -> 0.01 \(to apply it from the resume step, add "
                                              r"--override-on-resume lr"):
        check_resume_args(SAVED, now(lr=0.01))
    ok = check_resume_args(SAVED, now(lr=0.01, weight_decay=0.5, clip=0.5, ds={"gradient_clipping": 0.5}),
                           "lr,weight_decay,clip")
    assert ok.overrides == {"lr": (0.05, 0.01), "weight_decay": (0.1, 0.5), "clip": (1.0, 0.5)}
    assert set(check_resume_args(SAVED, now(steps=12, warmup_steps=3)).schedule) == {"steps", "warmup_steps"}
    changed = now(batch_size=8, seed=1, foo=1, ds={"zero_optimization": {"stage": 2}})
    changed["world_size"] = 2
    with pytest.raises(ResumeArgsError) as err:
        check_resume_args(SAVED, changed, "lr")
    text = str(err.value)
    for part in ("--batch-size: 4 -> 8", "--seed: 0 -> 1", "--world-size: 1 -> 2",
                 "DeepSpeed config zero_optimization.stage: 1 -> 2", "Rerun with the recorded values"):
        assert part in text, part
    assert "--foo" not in text   # not recorded by the checkpoint: reported, not refused
    assert "not recorded" in " ".join(check_resume_args(SAVED, now(foo=1)).messages())
    with pytest.raises(ResumeArgsError, match="--mystery: 1 -> 2 .*not known to be safe"):
        check_resume_args({"mystery": 1}, {"mystery": 2})
    with pytest.raises(ValueError, match="batch_size cannot be overridden"):
        parse_overrides("lr,batch-size")


def test_overridable_names_match_the_command_line():
    from vlmo_fast.training.args import OVERRIDABLE_ON_RESUME
    assert set(OVERRIDABLE_ON_RESUME) == set(OVERRIDABLE)


def test_overrides_reach_the_optimizer_the_scheduler_and_clipping(world, tmp_path):
    """ZeRO-1: DeepSpeed's load restores the recorded lr, weight decay, betas and clipping;
    without the plan a changed --lr / --weight-decay / --clip is silently ignored."""
    out = tmp_path / "run"
    run_tiny_job(out, zero=1, stop_after=3)   # checkpoint at step 2
    point = find_resume_checkpoint(out / "checkpoints")
    new = tiny_args(zero=1, lr=0.2, weight_decay=0.3, betas=(0.8, 0.9), clip=0.5)
    ignored = tiny_engine(new)
    load_checkpoint(ignored, point, 0)
    assert ignored.optimizer.param_groups[0]["weight_decay"] == 0.1 and ignored.optimizer.clip_grad == 1.0
    engine = tiny_engine(new)
    plan = plan_resume(point, record_run_args(new, world_size=1), "lr,weight_decay,betas,clip", schedule_spec(new, 8))
    load_checkpoint(engine, point, 0, plan=plan)
    groups = engine.optimizer.param_groups
    fn = schedule_lambda(plan.schedule)
    assert engine.lr_scheduler.base_lrs == [0.2, 0.2] and engine.lr_scheduler.last_epoch == 2
    assert [g["initial_lr"] for g in groups] == [0.2, 0.2] and [g["lr"] for g in groups] == [0.2 * fn(2)] * 2
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0] and all(g["betas"] == (0.8, 0.9) for g in groups)
    assert engine.optimizer.clip_grad == 0.5 and engine.lr_scheduler.get_last_lr() == [0.2 * fn(2)] * 2
    with pytest.raises(ResumeArgsError, match="--lr: 0.05 -> 0.2"):
        plan_resume(point, record_run_args(new, world_size=1), "", schedule_spec(new, 8))


def test_a_longer_schedule_continues_without_a_jump_and_reproducibly(world, tmp_path):
    out = tmp_path / "run"
    run_tiny_job(out, steps=8, stop_after=5)    # checkpoint at 4; linear decay to 0 at step 8
    old = schedule_lambda(initial_schedule(schedule_spec(tiny_args(steps=8), 8)))
    result = run_tiny_job(out, steps=12)
    assert any("lr schedule rebuilt at step 4" in m for m in result["messages"])
    lrs = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl")}
    assert lrs[5] == pytest.approx(0.05 * old(4), rel=1e-12)      # the step after the resume: no jump
    assert all(lrs[s + 1] < lrs[s] for s in range(5, 12))         # decays on to the new end
    # resuming again with the same arguments rebuilds the same function from the record
    point = find_resume_checkpoint(out / "checkpoints")
    assert len(point.schedule) == 2
    again = plan_resume(point, record_run_args(tiny_args(steps=12), world_size=1), "", schedule_spec(tiny_args(steps=12), 12))
    assert not again.rebuilt and again.schedule == point.schedule


def test_schedule_rebuild_rule():
    spec = {"total": 20, "warmup": 10, "schedule": "linear", "min_ratio": 0.1}
    first = initial_schedule(spec)
    orig = schedule_lambda(first)
    assert [orig(s) for s in range(20)] == [lr_lambda(20, 10, "linear", 0.1)(s) for s in range(20)]
    # still warming up at step 3, new warmup 6: rises from where it was to 1 at step 5, then decays
    segs, note = resume_schedule(first, {**spec, "warmup": 6, "total": 30}, 3)
    fn = schedule_lambda(segs)
    assert fn(3) == orig(3) and fn(5) == 1.0 and fn(30) == pytest.approx(0.1) and note
    assert all(fn(s) < fn(s + 1) for s in range(3, 5)) and all(fn(s) > fn(s + 1) for s in range(5, 30))
    # past the warmup, cosine to 40: continues from the value reached
    segs2, _ = resume_schedule(segs, {**spec, "warmup": 6, "total": 40, "schedule": "cosine"}, 12)
    fn2 = schedule_lambda(segs2)
    assert fn2(12) == fn(12) and fn2(40) == pytest.approx(0.1) and [fn2(s) for s in range(12)] == [fn(s) for s in range(12)]
    # a second change at the same step replaces the segment instead of stacking two
    segs3, _ = resume_schedule(segs2, {**spec, "total": 50, "schedule": "constant"}, 12)
    assert len(segs3) == len(segs2) and schedule_lambda(segs3)(30) == fn(12)
    assert resume_schedule(segs3, {**spec, "total": 50, "schedule": "constant"}, 20) == (segs3, None)
    with pytest.raises(ResumeArgsError, match="past the new end"):
        resume_schedule(first, {**spec, "total": 12}, 12)


# ----------------------------------------------------------------------------- fault specs
def test_fault_specs():
    for text in ("kill_after_step:3", "kill_in_save:4:2", "kill_in_save:4:1:torn:0.25", "kill_in_checkpoint:2",
                 "kill_after_manifest:2", "kill_after_latest:6@1", "kill_in_save_after:4:0.01",
                 "nan_inputs_at_step:5"):
        spec = faults.parse_fault_spec(text)
        assert faults.parse_fault_spec(str(spec)) == spec, text
    assert faults.parse_fault_spec("kill_in_save:4:1:torn").torn_fraction == 0.5
    for text, why in (("kill_now:3", "unknown fault"), ("kill_in_save:4", "N:K"), ("kill_after_step:x", "integers"),
                      ("kill_in_save:4:0", "K must be >= 1"), ("kill_in_save:4:1:torn:2", "F in"),
                      ("kill_after_step", "no step"), ("kill_after_step:3:4", "only a step")):
        with pytest.raises(ValueError, match=rf"VLMO_FAST_FAULT=.*{why}.*expected"):
            faults.parse_fault_spec(text)
    rng = random.Random(0)
    for _ in range(200):
        spec = faults.parse_fault_spec(faults.draw_fault(rng, after_step=4, total_steps=12, save_steps=[2, 4, 6, 8, 10, 12],
                                                         deepspeed_files=2, save_seconds=0.1))
        assert 4 < spec.step <= 12 and (spec.file_index or 1) <= 2


# ----------------------------------------------------------------------------- several ranks
def _two_rank_worker(rank: int, init_file: str, folder: str, result_dir: str) -> None:
    import torch.distributed as dist
    from vlmo_fast.training import checkpoint as ck
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    out = {}
    names = sorted(os.listdir(folder))
    out["hashes"] = ck._hash_files(Path(folder), names)
    manifest = {"files": {n: {"bytes": b, "sha256": h} for n, (b, h) in zip(names, out["hashes"])}}
    if rank == 0:
        flip(Path(folder) / "c.bin", 3)
    dist.barrier()
    out["verify"] = str(ck._verify_files(Path(folder), manifest, True))
    out["agree"] = ck._agree("rank 1 saw it" if rank == 1 else None)

    def fail():
        raise OSError("disk full")
    try:
        ck._run_on_rank0(fail)
    except Exception as e:
        out["rank0_error"] = f"{type(e).__name__}: {e}"
    Path(result_dir, f"{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_split_the_hashing_and_agree(tmp_path):
    import torch.multiprocessing as mp
    from vlmo_fast.io import file_sha256
    folder = tmp_path / "files"
    folder.mkdir()
    for i, name in enumerate(("a.bin", "b.bin", "c.bin", "d.bin")):
        (folder / name).write_bytes(os.urandom(1000 * (i + 1)))
    expected = [((folder / n).stat().st_size, file_sha256(folder / n)) for n in sorted(os.listdir(folder))]
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(folder), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert [tuple(x) for x in r["hashes"]] == expected
        assert "c.bin: SHA-256 differs" in r["verify"]
        assert r["agree"] == "rank 1 saw it"
    assert results[0]["rank0_error"] == "OSError: disk full"
    assert results[1]["rank0_error"] == "CheckpointError: rank 0: disk full"


# ----------------------------------------------------------------------------- the kill loop
class ForkServer:
    """This file run as a script: imports torch + DeepSpeed once, then runs `run_tiny_job` in
    a forked child per request; `__call__(fault)` -> the child's exit code (-9: SIGKILL)."""

    def __init__(self, out: Path, **job):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(out.parent),  # killed runs' stores
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        for k in DIST_ENV + (faults.FAULT_ENV,):
            env.pop(k, None)
        self.out, self.job = out, job
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)

    def __call__(self, fault: Optional[str], out: Optional[Path] = None) -> int:
        cmd = {"out": str(out or self.out), "fault": fault, "job": self.job}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise RuntimeError(f"the fork server did not answer {cmd} (exit code {self.proc.poll()})")
        return json.loads(line)["rc"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _serve() -> None:
    import importlib
    replies = os.fdopen(os.dup(1), "w")   # the protocol's channel; anything else printed goes
    os.dup2(2, 1)                         # to stderr (DeepSpeed logs to stdout)
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    # what every engine build imports (torch.optim imports dynamo): once, here, not per child
    for module in ("torch._dynamo", "deepspeed", "deepspeed.runtime.zero.stage_1_and_2",
                   "deepspeed.runtime.zero.muon.muon_optimizer", "torch.utils.tensorboard"):
        importlib.import_module(module)
    for line in sys.stdin:
        cmd = json.loads(line)
        log = open(Path(cmd["out"]).parent / f"{Path(cmd['out']).name}.log", "a")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                if cmd["fault"]:
                    os.environ[faults.FAULT_ENV] = cmd["fault"]
                print(f"--- run, fault {cmd['fault']}", flush=True)
                run_tiny_job(Path(cmd["out"]), **cmd["job"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        log.close()
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class CommandRunner:
    """Runs a command line (e.g. [python, train/pretrain.py, ...]) with VLMO_FAST_FAULT set."""

    def __init__(self, cmd: Sequence[str], cwd=REPO, env: Optional[Dict] = None, timeout: float = 900):
        self.cmd, self.cwd, self.timeout = list(cmd), cwd, timeout
        self.env = dict(env if env is not None else os.environ)

    def __call__(self, fault: Optional[str]) -> int:
        env = {k: v for k, v in self.env.items() if k != faults.FAULT_ENV}
        if fault:
            env[faults.FAULT_ENV] = fault
        return subprocess.run(self.cmd, cwd=self.cwd, env=env, capture_output=True, timeout=self.timeout).returncode


def deepspeed_files_of_rank0(checkpoint_folder: Path) -> int:
    """How many files DeepSpeed writes on rank 0 per save (from a complete checkpoint's manifest)."""
    names = json.loads((checkpoint_folder / "manifest.json").read_text())["files"]
    return sum(1 for n in names if n.endswith(".pt") and ("zero_pp_rank_0_" in n or n.startswith("mp_rank_")))


def save_seconds(checkpoint_folder: Path) -> float:
    """About how long a save took: checkpoint.json is written first, manifest.json last."""
    return max(1e-3, (checkpoint_folder / "manifest.json").stat().st_mtime
               - (checkpoint_folder / "checkpoint.json").stat().st_mtime)


def expected_resume_step(spec: faults.FaultSpec, save_steps: Sequence[int]) -> range:
    """The steps the newest complete checkpoint may be at after a kill by `spec`."""
    before = max([0] + [s for s in save_steps if s < spec.step])
    if spec.kind == "kill_after_step":
        at = max([0] + [s for s in save_steps if s <= spec.step])
        return range(at, at + 1)
    if spec.kind in ("kill_after_manifest", "kill_after_latest"):
        return range(spec.step, spec.step + 1)
    if spec.kind == "kill_in_save_after":   # the timer may fire after later saves
        return range(before, max(save_steps) + 1)
    return range(before, before + 1)        # inside the save, before its manifest


def kill_loop(run: Callable[[Optional[str]], int], checkpoint_dir: Path, *, kills: int, seed: int,
              total_steps: int, save_steps: Sequence[int], deepspeed_files: int, seconds_per_save: float,
              fixed: Sequence[str] = (), horizon: Optional[int] = 6) -> Dict:
    """SIGKILL a training job `kills` times (first the `fixed` specs, then random ones from
    `faults.draw_fault`), each time rerunning the same command; after every kill the folder
    must resume (auto and strict) from exactly the checkpoint the kill allows. Ends with a run
    without faults, which must finish (rc 0). Returns counts per kind."""
    rng = random.Random(seed)
    stats: Dict[str, int] = {"kills": 0, "completed_early": 0}
    done = 0
    while done < kills:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResumeWarning)
            point = find_resume_checkpoint(checkpoint_dir)
        after = point.step if point is not None else 0
        if after >= total_steps:
            break
        text = fixed[done] if done < len(fixed) else faults.draw_fault(
            rng, after_step=after, total_steps=total_steps, save_steps=save_steps,
            deepspeed_files=deepspeed_files, save_seconds=seconds_per_save, horizon=horizon)
        spec = faults.parse_fault_spec(text)
        rc = run(text)
        done += 1
        if rc == 0:   # a timed kill that fired only after the run ended
            assert spec.kind == "kill_in_save_after", f"{text}: the run was not killed"
            stats["completed_early"] += 1
            break
        assert rc == -9, f"{text}: exit code {rc}, expected a SIGKILL"
        stats["kills"] += 1
        stats[spec.kind] = stats.get(spec.kind, 0) + 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResumeWarning)
            strict = find_resume_checkpoint(checkpoint_dir, "strict")   # no kill leaves damage
            point = find_resume_checkpoint(checkpoint_dir, "auto")
        got = point.step if point is not None else 0
        assert (strict.step if strict else 0) == got
        allowed = expected_resume_step(spec, [s for s in save_steps if s <= total_steps])
        assert got in allowed, f"after {text}: resumes at step {got}, expected {list(allowed)}"
    assert run(None) == 0, "the final run without faults failed"
    return stats


@pytest.mark.slow
def test_kill_loop_inside_and_between_deepspeed_saves(tmp_path):
    kills = int(os.environ.get("VLMO_FAULT_TRAINING_KILLS", "12"))
    steps = 6 * kills + 4   # a kill lands at most 6 steps after the resume point (horizon)
    job = dict(steps=steps, save_every=2, keep_last=2, zero=1)
    server = ForkServer(tmp_path / "cut", **job)
    try:
        assert server(None, out=tmp_path / "full") == 0
        reference = tmp_path / "full" / "checkpoints" / f"step_{steps:06d}"
        fixed = ["kill_in_save:2:1", "kill_in_save:2:2:torn:0.5", "kill_in_checkpoint:2", "kill_after_manifest:2",
                 "kill_in_save:4:1:torn:0.0", "kill_after_latest:4", "kill_after_step:5"]
        stats = kill_loop(server, tmp_path / "cut" / "checkpoints", kills=max(kills, len(fixed)), seed=1234,
                          total_steps=steps, save_steps=list(range(2, steps + 1, 2)),
                          deepspeed_files=deepspeed_files_of_rank0(reference),
                          seconds_per_save=save_seconds(reference), fixed=fixed)
    finally:
        server.close()
    print(f"\nkill loop: {stats}")
    assert stats["kills"] >= min(kills, 10)
    assert read_metrics(tmp_path / "cut" / "metrics.jsonl") == read_metrics(tmp_path / "full" / "metrics.jsonl")
    a, b = weights(tmp_path / "full" / "final.safetensors"), weights(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loop_uses_checkpoint_api() -> bool:
    loop = REPO / "vlmo_fast" / "training" / "loop.py"
    return loop.is_file() and "checkpoint_hook" in loop.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not _loop_uses_checkpoint_api(), reason="needs loop wiring (TrainLoop passing "
                    "faults.checkpoint_hook to save_checkpoint)")
def test_kill_loop_through_the_pretraining_job(tmp_path):
    """The same loop through `train/pretrain.py` (one process, vision stage)."""
    from vlmo_fast.data import build_tokenizer
    tok = tmp_path / "tok"
    build_tokenizer(source="embedded", vocab_size=1000).save(tok)
    kills = int(os.environ.get("VLMO_FAULT_TRAINING_KILLS", "10"))
    steps = 2 * kills + 4   # a kill lands at most one save (2 steps) after the resume point

    def command(out):
        return [sys.executable, "train/pretrain.py", "--output-dir", str(out), "--tokenizer", str(tok),
                "--stage", "vision", "--steps", str(steps), "--save-every", "2", "--batch-size", "4",
                "--log-every", "1", "--no-progress", "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in DIST_ENV:
        env.pop(k, None)
    assert CommandRunner(command(tmp_path / "full"), env=env)(None) == 0
    reference = tmp_path / "full" / "vision" / "checkpoints" / f"step_{steps:06d}"
    stats = kill_loop(CommandRunner(command(tmp_path / "cut"), env=env), tmp_path / "cut" / "vision" / "checkpoints",
                      kills=kills, seed=99, total_steps=steps, save_steps=list(range(2, steps + 1, 2)),
                      deepspeed_files=deepspeed_files_of_rank0(reference), seconds_per_save=save_seconds(reference),
                      horizon=2)
    print(f"\nkill loop through train/pretrain.py: {stats}")
    assert stats["kills"] >= min(kills, 10)
    strip = ("samples_per_s", "peak_memory_mb")
    rows = [read_metrics(tmp_path / run / "vision" / "metrics.jsonl") for run in ("full", "cut")]
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in rows[1]]
    a, b = (weights(tmp_path / run / "vision" / "final" / "model.safetensors") for run in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    _serve()
