"""vlmo_fast.backends stores the implementations: one plug-in API for every op, and
`unregister` puts back what a registration replaced."""
import math

import pytest
import torch

from vlmo_fast import backends, contrastive_loss, sample_global_hard_negatives, sample_hard_negatives
from vlmo_fast.hard_negatives import STREAM_IMAGE_TO_TEXT, STREAM_TEXT_TO_IMAGE, SampleRequest


def _features(n=6, dim=8):
    img = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(n, dim), dim=1)
    return img, txt, torch.tensor(math.log(10.0))


# --------------------------------------------------------------------------- a toy op

@pytest.fixture
def toy_op():
    """An op of this test only; unregistering its last implementation forgets it."""
    yield "toy_test_op"
    left = backends._OPS.pop("toy_test_op", None)
    assert left is None, "the test left implementations registered (or the op was not forgotten)"


def test_register_stores_the_function_and_unregister_undoes_each_registration(toy_op):
    def first(x):
        return x + 1

    def second(x):
        return x + 2

    def replacement(x):
        return x + 3
    backends.register(toy_op, "first", first, preference={"cpu": ["first"]})
    backends.register(toy_op, "second", second, preference={"cpu": ["second", "first"]})
    assert backends.implementation(toy_op, backends.resolve(toy_op, None, "cpu")) is second
    backends.register(toy_op, "first", replacement)
    assert backends.implementation(toy_op, "first") is replacement
    backends.unregister(toy_op, "first")            # the replaced function comes back
    assert backends.implementation(toy_op, "first") is first
    backends.unregister(toy_op, "second")           # and the order "second" replaced
    assert backends.preference_order(toy_op, "cpu") == ["first"]
    assert backends.resolve(toy_op, None, "cpu") == "first"
    with pytest.raises(ValueError, match="unknown toy_test_op backend 'second'"):
        backends.implementation(toy_op, "second")
    backends.unregister(toy_op, "first")


def test_an_order_replaced_again_is_left_to_the_later_registration(toy_op):
    backends.register(toy_op, "a", abs, preference={"cpu": ["a"]})
    backends.register(toy_op, "b", abs, preference={"cpu": ["b", "a"]})
    backends.register(toy_op, "c", abs, preference={"cpu": ["c", "a"]})
    backends.unregister(toy_op, "b")                # "c" owns the cpu order now
    assert backends.preference_order(toy_op, "cpu") == ["c", "a"]
    backends.unregister(toy_op, "c")                # back to what "c" replaced
    assert backends.preference_order(toy_op, "cpu") == ["b", "a"]
    assert backends.resolve(toy_op, None, "cpu") == "a"     # "b" is gone: skipped
    backends.unregister(toy_op, "a")


def test_register_without_fn_updates_an_existing_backend_only(toy_op):
    def cpu_only(device):
        return None if device.type == "cpu" else "cpu only"
    backends.register(toy_op, "a", abs, available=cpu_only)
    backends.register(toy_op, "a", preference={"cpu": ["a"]})     # keeps fn and checks
    assert backends.implementation(toy_op, "a") is abs
    assert backends.rejection_reason(toy_op, "a", "meta") == "cpu only"
    with pytest.raises(ValueError, match="register it with its function"):
        backends.register(toy_op, "new")
    with pytest.raises(TypeError, match="fn must be callable"):
        backends.register(toy_op, "new", "not a function")
    with pytest.raises(TypeError, match="accepts must be callable"):
        backends.register(toy_op, "new", abs, accepts=3)
    backends.unregister(toy_op, "a")
    backends.unregister(toy_op, "a")


# --------------------------------------------------------------------------- contrastive

def test_user_contrastive_backend_is_called_and_unregister_restores():
    calls = []
    reference = backends.implementation("contrastive", "reference")

    def mine(img, txt, logit_scale, group, want_stats):
        calls.append((img.shape, group, want_stats))
        return reference(img, txt, logit_scale, group, want_stats)
    before = backends.preference_order("contrastive", "cpu", n=6, n_global=6)
    img, txt, ls = _features()
    want = contrastive_loss(img, txt, ls, backend="reference")
    backends.register("contrastive", "mine", mine, preference={"cpu": ["mine", "reference"]})
    try:
        loss, stats = contrastive_loss(img, txt, ls, return_stats=True)   # automatic choice
        assert stats.backend == "mine" and backends.last_used()["contrastive@cpu"] == "mine"
        assert calls == [(img.shape, None, True)]
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
    finally:
        backends.unregister("contrastive", "mine")
    assert backends.preference_order("contrastive", "cpu", n=6, n_global=6) == before
    with pytest.raises(ValueError, match="backend 'mine'"):
        contrastive_loss(img, txt, ls, backend="mine")


def test_replacing_a_builtin_contrastive_backend_and_unregistering_it():
    reference = backends.implementation("contrastive", "reference")
    seen = []

    def spy(*args):
        seen.append(len(args))
        return reference(*args)
    img, txt, ls = _features()
    backends.register("contrastive", "reference", spy)
    try:
        contrastive_loss(img, txt, ls, backend="reference")
    finally:
        backends.unregister("contrastive", "reference")
    assert seen == [5]
    assert backends.implementation("contrastive", "reference") is reference
    contrastive_loss(img, txt, ls, backend="reference")
    assert seen == [5]


def test_contrastive_backend_with_a_wrong_result_is_named():
    backends.register("contrastive", "broken", lambda *args: args[0].sum())
    try:
        with pytest.raises(TypeError, match="contrastive backend 'broken' returned Tensor"):
            contrastive_loss(*_features(), backend="broken")
    finally:
        backends.unregister("contrastive", "broken")


# --------------------------------------------------------------------------- hard negatives

def _hardest(calls):
    """A deterministic sampler: the highest allowed logit of each row."""
    def hardest(requests, generator, seed, row_offset):
        calls.append(([r.stream for r in requests], row_offset, generator, seed))
        out = []
        for r in requests:
            logits = r.logits.float().clone()
            if r.exclude_mask is not None:
                logits[r.exclude_mask] = float("-inf")
            logits[torch.arange(logits.shape[0]), r.positive] = float("-inf")
            out.append(logits.argmax(1))
        return out
    return hardest


def test_user_hard_negative_backend_is_called_and_unregister_restores():
    calls = []
    before = backends.preference_order("hard_negatives", "cpu")
    backends.register("hard_negatives", "hardest", _hardest(calls),
                      preference={"cpu": ["hardest", "ext", "torch"]})
    try:
        local, rank = 3, 1
        sim_i2t, sim_t2i = torch.randn(local, 6), torch.randn(local, 6)
        exclude = torch.zeros(local, 6, dtype=torch.bool)
        exclude[0, sim_i2t[0].argmax()] = True      # never the row's own maximum
        neg_txt, neg_img = sample_global_hard_negatives(sim_i2t, sim_t2i, rank=rank, seed=7,
                                                        exclude_i2t=exclude)
        assert calls == [([STREAM_IMAGE_TO_TEXT, STREAM_TEXT_TO_IMAGE], rank * local, None, 7)]
        positive = torch.arange(local) + rank * local
        for sim, got, mask in ((sim_i2t, neg_txt, exclude), (sim_t2i, neg_img, None)):
            want = sim.clone()
            if mask is not None:
                want[mask] = float("-inf")
            want[torch.arange(local), positive] = float("-inf")
            assert torch.equal(got, want.argmax(1))
        gen = torch.Generator().manual_seed(0)
        one = sample_hard_negatives(sim_i2t, positive, generator=gen, row_offset=5,
                                    stream=STREAM_TEXT_TO_IMAGE)
        assert calls[-1] == ([STREAM_TEXT_TO_IMAGE], 5, gen, None)
        assert backends.last_used()["hard_negatives@cpu"] == "hardest"
        assert one.shape == (local,)
    finally:
        backends.unregister("hard_negatives", "hardest")
    assert backends.preference_order("hard_negatives", "cpu") == before
    with pytest.raises(ValueError, match="backend 'hardest'"):
        sample_hard_negatives(sim_i2t, positive, backend="hardest")


def test_builtin_hard_negative_backends_take_requests():
    """The built-in functions are reachable through the registry with the plug-in signature."""
    logits = torch.randn(4, 9)
    positive = torch.arange(4)
    torch_backend = backends.implementation("hard_negatives", "torch")
    request = SampleRequest(logits, positive, None, STREAM_IMAGE_TO_TEXT)
    got, = torch_backend([request], None, 3, 0)
    want = sample_hard_negatives(logits, positive, seed=3, backend="torch")
    assert torch.equal(got, want)


def test_hard_negative_backend_with_a_wrong_result_is_named():
    backends.register("hard_negatives", "broken", lambda requests, *rest: requests[0].positive)
    try:
        with pytest.raises(TypeError, match="hard_negatives backend 'broken' must return one"):
            sample_hard_negatives(torch.randn(2, 5), torch.arange(2), backend="broken")
    finally:
        backends.unregister("hard_negatives", "broken")
