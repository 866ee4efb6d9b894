"""Multi-node DeepSpeed, proven on one host: the pretraining job launched as 2 "nodes" x 2
processes (two separate `deepspeed --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1`
launches, gloo) trains bitwise like 1 node x 4 processes of the same seed, also across the loss
of a whole node and a resume of both.

Per ZeRO stage (2 and 3), one test:
- reference: `deepspeed --num_gpus 4` (one node, 4 processes), 4 steps, checkpoints at 2 and 4;
- 2 x 2 with a node lost after step 3: VLMO_FAST_FAULT=kill_after_step:3@2 SIGKILLs rank 2
  (node 1's first process) right after step 3, so no rank can finish step 4; the test then
  SIGKILLs node 1's whole process group (runner, launch.py, rank 3), as a machine that dies.
  Node 0's processes must end by themselves (gloo sees the peers' sockets close), not hang in
  step 4's collectives until the process-group timeout;
- both nodes relaunched with the same command: resume from step_000002, redo steps 3 and 4;
- every logged step (metrics.jsonl via read_metrics) and the exported weights equal the
  reference BITWISE.

DeepSpeed's own launcher does it: `deepspeed --no_ssh --node_rank R` starts one node of a
multi-node world without ssh/pdsh (the hostfile only names the nodes and their slots; its names
are labels here), so no torchrun is needed (torchrun --nnodes 2 gives the same bits; by hand,
train/README.md). 4 processes share this machine's cores: a launch takes ~30-120 s with load.

Also here: init_distributed's timeout (DEEPSPEED_TIMEOUT) and its refusal of a launch that
gives a world size but no RANK.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
LAUNCH_TIMEOUT = 600   # a guard against a hung launch, far above a normal run
# How long node 0 may take to end after node 1 died. The property checked is "ends instead of
# blocking in a collective until the process-group timeout" (DEEPSPEED_TIMEOUT, pinned to 30
# minutes in env_for): gloo fails the pending collective as soon as the dead peers' sockets close.
NODE_EXIT_GUARD = 300
STEPS, SAVE_EVERY, KILL_AFTER = 4, 2, 3
COMPARED = ("loss", "itc", "itc_vl", "itm", "mlm", "grad_norm", "lr")
# fixed ports below the kernel's ephemeral range (32768+), so no other process's outgoing
# connection takes one while the launchers start (the launcher tests use 29611-29615)
PORTS = {"zero2": (29631, 29632, 29633), "zero3": (29634, 29635, 29636)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from vlmo_fast.data import build_tokenizer
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(source="embedded", vocab_size=1000).save(d)
    return str(d)


def job_args(config, tokenizer_dir, out):
    return ["train/pretrain.py", "--deepspeed_config", f"train/configs/{config}.json", "--tokenizer", tokenizer_dir,
            "--stage", "vl", "--from-scratch", "--preset", "tiny", "--model-overrides", '{"img_size": 32}',
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "2", "--log-every", "1",
            "--no-progress", "--no-eval", "--output-dir", str(out)]


def env_for(fault=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DEEPSPEED_TIMEOUT="30")
    env.pop("VLMO_FAST_FAULT", None)
    if fault:
        env["VLMO_FAST_FAULT"] = fault
    return env


def one_node(args, port):
    """1 node x 4 processes; returns the finished process."""
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "4", "--master_port", str(port), *args], cwd=ROOT,
                          env=env_for(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


class TwoNodes:
    """2 nodes x 2 processes: one `deepspeed --no_ssh --node_rank R` launch per node, each in its
    own session (so a node's launcher, launch.py and workers form one process group to kill)."""

    def __init__(self, tmp_path, args, name, port, faults=(None, None)):
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
        self.logs = [tmp_path / f"{name}_node{r}.log" for r in (0, 1)]
        self.procs = []
        for node_rank in (0, 1):
            cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
            with open(self.logs[node_rank], "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_for(faults[node_rank]), stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))

    def log(self, node_rank) -> str:
        return self.logs[node_rank].read_text(errors="replace")

    def kill_node(self, node_rank) -> None:
        try:
            os.killpg(self.procs[node_rank].pid, signal.SIGKILL)
        except ProcessLookupError:   # the launcher already took its processes down
            pass

    def wait(self, node_rank, timeout=LAUNCH_TIMEOUT) -> int:
        try:
            return self.procs[node_rank].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {node_rank} still running after {timeout} s:\n{self.log(node_rank)[-4000:]}")

    def close(self) -> None:
        """Never leave processes behind (a failed assertion, a hung node)."""
        for r, p in enumerate(self.procs):
            if p.poll() is None:
                self.kill_node(r)
                p.wait()

    def ok(self) -> None:
        for r in (0, 1):
            code = self.wait(r)
            assert code == 0, f"node {r} exited {code}:\n{self.log(r)[-4000:]}"


def wait_for_step(metrics_path, step, nodes, timeout=LAUNCH_TIMEOUT):
    """Block until rank 0 (on node 0) has logged `step`; fail if node 0 ends without it. Node 1
    may end first: its rank 2 is killed right after that step, maybe before rank 0 logs it."""
    from vlmo_fast.training.logs import read_metrics
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node0_ended = nodes.procs[0].poll() is not None   # before reading: its last rows are in
        if any(r.get("step") == step for r in read_metrics(metrics_path, raw=True)):
            return
        if node0_ended:
            pytest.fail(f"node 0 exited {nodes.procs[0].returncode} before logging step {step}:\n"
                        f"{nodes.log(0)[-4000:]}\nnode 1:\n{nodes.log(1)[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"step {step} not logged after {timeout} s:\n{nodes.log(0)[-4000:]}")


def weights(directory):
    from safetensors.torch import load_file
    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_two_nodes_equal_one_node_bitwise_across_node_loss_and_resume(tmp_path, tokenizer_dir, config):
    from vlmo_fast.training.logs import read_metrics
    ref, multi = tmp_path / "one_node", tmp_path / "two_nodes"
    one_port, killed_port, resumed_port = PORTS[config]
    one_node(job_args(config, tokenizer_dir, ref), one_port)

    nodes = TwoNodes(tmp_path, job_args(config, tokenizer_dir, multi), "killed", killed_port,
                     faults=(None, f"kill_after_step:{KILL_AFTER}@2"))
    try:
        wait_for_step(multi / "vl" / "metrics.jsonl", KILL_AFTER, nodes)
        nodes.kill_node(1)
        assert nodes.wait(1) != 0
        node0 = nodes.wait(0, timeout=NODE_EXIT_GUARD)   # must end on its own, not hang
        assert node0 != 0, nodes.log(0)[-4000:]
    finally:
        nodes.close()
    ckpts = multi / "vl" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert not (multi / "vl" / "final").exists()

    resumed = TwoNodes(tmp_path, job_args(config, tokenizer_dir, multi), "resumed", resumed_port)
    try:
        resumed.ok()
    finally:
        resumed.close()
    assert "resumed from" in resumed.log(0) and "step_000002" in resumed.log(0)

    a, b = read_metrics(ref / "vl" / "metrics.jsonl"), read_metrics(multi / "vl" / "metrics.jsonl")
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for k in COMPARED:
            assert x[k] == y[k], (config, x["step"], k, x[k], y[k])
    # the killed run's step 3 was logged, then redone after the resume: both equal the reference
    raw = [r for r in read_metrics(multi / "vl" / "metrics.jsonl", raw=True) if r.get("step") == KILL_AFTER]
    assert len(raw) == 2 and raw[0]["loss"] == raw[1]["loss"] == a[KILL_AFTER - 1]["loss"]
    wa, wb = weights(ref / "vl" / "final"), weights(multi / "vl" / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{config}: {k} differs between 1 x 4 and 2 x 2 (resumed)"


# --------------------------------------------------------------------------- init_distributed
def test_deepspeed_timeout_reaches_the_process_group(tmp_path):
    """DEEPSPEED_TIMEOUT (DeepSpeed's variable, minutes) sets the job's collective timeout; the
    job used to pass a fixed 30 minutes over it."""
    probe = ("import torch, torch.distributed as dist\n"
             "from vlmo_fast.training.engine import init_distributed\n"
             "init_distributed()\n"
             "pg = dist.distributed_c10d._get_default_group()\n"
             "print('timeout_s', pg._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    env = env_for()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)
    env["DEEPSPEED_TIMEOUT"] = "7"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "timeout_s 420.0" in proc.stdout, proc.stdout


def test_bad_timeout_and_a_rankless_multi_process_launch_are_refused(monkeypatch):
    from vlmo_fast.training import engine
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "DEEPSPEED_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert engine.distributed_timeout_minutes() == 30
    for bad in ("abc", "0", "-3", "1.5"):
        monkeypatch.setenv("DEEPSPEED_TIMEOUT", bad)
        with pytest.raises(ValueError, match="DEEPSPEED_TIMEOUT"):
            engine.init_distributed()
    monkeypatch.delenv("DEEPSPEED_TIMEOUT")
    # e.g. DeepSpeed's --launcher openmpi starts every rank with mpirun and no RANK: each
    # process would otherwise train alone as a world of one into the same output folder
    for name in ("OMPI_COMM_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.setenv(name, "4")
        with pytest.raises(ValueError, match=f"{name}=4 but RANK is not set"):
            engine.init_distributed()
        monkeypatch.delenv(name)
    assert "RANK" not in os.environ   # refused before anything was set up
