"""Writer process for tests/test_faults.py: imports torch once, then serves commands (one JSON
object per stdin line, one JSON reply per stdout line) so that a loop of kills costs a fork
each, not an interpreter start and a torch import each.

Generation g of the checkpoint is unmistakable by content: every parameter equals g,
config.name is "gen-g", and odd generations have a classifier head (num_classes=3), even
ones none, so a mix of two generations cannot load as either.

Commands:
  {"op": "save", "dir": D, "gen": g}                save in this process; reply {"seconds": t}
  {"op": "kill", "dir": D, "gen": g, "delay": s}    fork a child that says "about to write"
      through a pipe and saves; SIGKILL it `s` seconds after that (None: never); reply
      {"killed": bool, "seconds": from "about to write" to the child's end}
  {"op": "crash", "dir": D, "gen": g, "at": k}      fork a child whose k-th file-system call
      (rename/replace/fsync/unlink/rmtree/link/mkdir) exits the process before it happens;
      reply {"crashed": bool}
  {"op": "quit"}
"""
import json
import os
import shutil
import signal
import sys
import time
import traceback

import torch

torch.set_num_threads(1)

from vlmo_fast import VLMo, VLMoConfig  # noqa: E402
from vlmo_fast.checkpoint import save_pretrained  # noqa: E402

MODELS = {parity: VLMo(VLMoConfig.preset("tiny", num_classes=3 * parity)) for parity in (0, 1)}


def generation(g: int) -> VLMo:
    model = MODELS[g % 2]
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(g)
    model.config.name = f"gen-{g}"
    return model


def crash_at(k: int) -> None:
    """Make the k-th call of the file-system operations a checkpoint save makes end the process."""
    calls = [0]

    def wrap(fn):
        def wrapper(*args, **kwargs):
            if calls[0] == k:
                os._exit(99)
            calls[0] += 1
            return fn(*args, **kwargs)
        return wrapper
    for name in ("rename", "replace", "fsync", "unlink", "link", "mkdir"):
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)


def fork_and_save(directory: str, g: int, before_save) -> int:
    """Fork a child that calls before_save(), then saves generation g. Returns (pid, ready fd)."""
    model = generation(g)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            before_save()
            os.write(write_fd, b"w")  # about to write
            save_pretrained(model, directory)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    os.close(write_fd)
    return pid, read_fd


def main() -> None:
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "save":
            start = time.perf_counter()
            save_pretrained(generation(cmd["gen"]), cmd["dir"])
            reply = {"seconds": time.perf_counter() - start}
        elif op == "kill":
            pid, ready = fork_and_save(cmd["dir"], cmd["gen"], lambda: None)
            os.read(ready, 1)
            os.close(ready)
            start = time.perf_counter()
            if cmd["delay"] is not None:  # None: let it finish (measures a forked save)
                time.sleep(cmd["delay"])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _, status = os.waitpid(pid, 0)
            elapsed = time.perf_counter() - start
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
                raise RuntimeError(f"the writer child failed (exit status {os.WEXITSTATUS(status)})")
            reply = {"killed": os.WIFSIGNALED(status), "seconds": elapsed}
        elif op == "crash":
            pid, ready = fork_and_save(cmd["dir"], cmd["gen"], lambda: crash_at(cmd["at"]))
            os.read(ready, 1)
            os.close(ready)
            _, status = os.waitpid(pid, 0)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            if code not in (0, 99):
                raise RuntimeError(f"the writer child failed (status {status})")
            reply = {"crashed": code == 99}
        else:
            raise ValueError(f"unknown op {op!r}")
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
