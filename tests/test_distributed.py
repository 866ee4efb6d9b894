"""vlmo_fast.distributed: the collectives in a 2-process gloo group against their single-process
equivalents (values and gradients), and the single-process identities."""
import os
import tempfile

import pytest
import torch

from vlmo_fast import distributed

WORLD = 2
ROWS = 3   # per rank
DIM = 4


def _inputs():
    """Every rank's inputs, built identically in the workers and in the test."""
    gen = torch.Generator().manual_seed(11)
    x = [torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64) for _ in range(WORLD)]
    # per-rank upstream weights of the gathered [WORLD * ROWS, DIM] result
    weight = [torch.randn(WORLD * ROWS, DIM, generator=gen, dtype=torch.float64)
              for _ in range(WORLD)]
    scatter_in = [torch.randn(WORLD * ROWS, DIM, generator=gen) for _ in range(WORLD)]
    # per-rank terms of a log-sum-exp over 5 entries; entry 3 is -inf on rank 0 only and
    # entry 4 is -inf on every rank
    terms = [torch.randn(ROWS, 5, generator=gen) * 20 for _ in range(WORLD)]
    terms[0][:, 3] = float("-inf")
    for t in terms:
        t[:, 4] = float("-inf")
    return x, weight, scatter_in, terms


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        x, weight, scatter_in, terms = _inputs()
        res = {"world_and_rank": distributed.world_and_rank(),
               "group_info": tuple(distributed.group_info())}

        leaf = x[rank].clone().requires_grad_()
        plain = distributed.all_gather_rows(leaf)
        res["gather"], res["gather_requires_grad"] = plain, plain.requires_grad
        gathered = distributed.all_gather_rows_with_grad(leaf)
        (gathered * weight[rank]).sum().backward()
        res["gather_with_grad"], res["gather_grad"] = gathered.detach(), leaf.grad

        subgroup = dist.new_group([0, 1])
        res["gather_subgroup"] = distributed.all_gather_rows(x[rank], group=subgroup)
        res["subgroup_world_and_rank"] = distributed.world_and_rank(subgroup)

        before = scatter_in[rank].clone()
        res["scatter"] = distributed.reduce_scatter_rows(scatter_in[rank])
        res["scatter_input_unchanged"] = torch.equal(before, scatter_in[rank])

        lse = torch.logsumexp(terms[rank], dim=0)
        res["lse"] = distributed.all_reduce_logsumexp(lse)
        for op in distributed.REDUCE_OPS:
            t = x[rank].clone()
            out = distributed.all_reduce(t, op)
            res[f"reduce_{op}"], res[f"reduce_{op}_in_place"] = out, out is t

        distributed.check_same_row_count(x[rank])   # equal counts: passes
        for name, call in (
                ("unequal_rows", lambda: distributed.check_same_row_count(
                    torch.zeros(rank + 1, 2), what="pairs")),
                ("indivisible_scatter", lambda: distributed.reduce_scatter_rows(torch.zeros(3, 2)))):
            try:
                call()
                res[name] = None
            except ValueError as exc:
                res[name] = str(exc)
        distributed.barrier()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def test_world_and_rank_in_a_group(per_rank):
    for rank, res in enumerate(per_rank):
        assert res["world_and_rank"] == (WORLD, rank)
        assert res["group_info"] == (None, WORLD, rank)
        assert res["subgroup_world_and_rank"] == (WORLD, rank)


def test_all_gather_rows_matches_concatenation(per_rank):
    x, weight, _, _ = _inputs()
    whole = torch.cat(x)
    for res in per_rank:
        torch.testing.assert_close(res["gather"], whole, rtol=0, atol=0)
        assert not res["gather_requires_grad"]
        torch.testing.assert_close(res["gather_subgroup"], whole, rtol=0, atol=0)


def test_all_gather_rows_with_grad_sums_gradients_onto_owners(per_rank):
    x, weight, _, _ = _inputs()
    # single process: the concatenated batch, every rank's loss term summed
    leaves = [t.clone().requires_grad_() for t in x]
    whole = torch.cat(leaves)
    sum((whole * w).sum() for w in weight).backward()
    for rank, res in enumerate(per_rank):
        torch.testing.assert_close(res["gather_with_grad"], whole.detach(), rtol=0, atol=0)
        torch.testing.assert_close(res["gather_grad"], leaves[rank].grad, rtol=0, atol=1e-12)


def test_reduce_scatter_rows_returns_own_slice_of_sum(per_rank):
    _, _, scatter_in, _ = _inputs()
    total = scatter_in[0] + scatter_in[1]
    for rank, res in enumerate(per_rank):
        torch.testing.assert_close(res["scatter"], total[rank * ROWS:(rank + 1) * ROWS])
        assert res["scatter_input_unchanged"]


def test_all_reduce_logsumexp_equals_logsumexp_of_all_terms(per_rank):
    _, _, _, terms = _inputs()
    want = torch.logsumexp(torch.cat(terms), dim=0)
    assert want[4] == float("-inf")
    for res in per_rank:
        # entry 4 is -inf everywhere: -inf, not NaN (inf - inf)
        torch.testing.assert_close(res["lse"], want, rtol=1e-6, atol=1e-5)


def test_all_reduce_ops(per_rank):
    x, _, _, _ = _inputs()
    stacked = torch.stack(x)
    want = {"sum": stacked.sum(0), "max": stacked.amax(0), "min": stacked.amin(0)}
    for res in per_rank:
        for op, value in want.items():
            torch.testing.assert_close(res[f"reduce_{op}"], value, rtol=0, atol=1e-12)
            assert res[f"reduce_{op}_in_place"]


def test_bad_row_counts_raise_on_every_rank(per_rank):
    for rank, res in enumerate(per_rank):
        assert res["unequal_rows"] is not None
        assert "same number of pairs" in res["unequal_rows"]
        assert f"has {rank + 1}" in res["unequal_rows"] and "from 1 to 2" in res["unequal_rows"]
        assert "divisible by the world size 2" in res["indivisible_scatter"]


def test_single_process_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.world_and_rank() == (1, 0)
    assert distributed.group_info() is None
    gathered = distributed.all_gather_rows(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert distributed.all_gather_rows_with_grad(x) is x
    assert distributed.reduce_scatter_rows(x) is x
    assert distributed.all_reduce_logsumexp(x) is x
    assert distributed.all_reduce(x, "max") is x
    distributed.check_same_row_count(x)
    distributed.barrier()
    with pytest.raises(ValueError, match="op must be one of"):
        distributed.all_reduce(x, "mean")

