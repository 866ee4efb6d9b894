"""Every ```python block of README.md runs as written (each on its own, as a user would
paste it)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(pytest.param(match.group(1), id=f"README.md:{line}"))
    return blocks


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("code", python_blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # a block that writes files writes them here
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_ddp_block_trains_two_steps_under_ddp(tmp_path, monkeypatch):
    """The StepModule block, as written, under a 1-process gloo DDP: DDP stops at the second
    step's forward when a parameter got no gradient in the first, so two steps prove that
    the step uses every parameter."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    (code,) = [block.values[0] for block in python_blocks() if "StepModule(" in block.values[0]]
    monkeypatch.chdir(tmp_path)
    # an in-process training job earlier in the session may have left its world of one up: use it
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        scope = {"__name__": "__readme__"}
        exec(compile(code, str(README), "exec"), scope)
    finally:
        if own_group:
            dist.destroy_process_group()
    assert isinstance(scope["step"], DistributedDataParallel)
    model, optimizer = scope["model"], scope["optimizer"]
    assert all(p.grad is not None for p in model.parameters())
    assert all(int(optimizer.state[p]["step"]) == 2 for p in model.parameters())
