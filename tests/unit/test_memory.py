"""Memory that fits an 80 GB card (issue 16 item 8): where Adam's moments
go, with the arithmetic, and the streamed moments give Adam's exact steps."""
from __future__ import annotations

import pytest
import torch

from es_mpi.engine.optim import Adam
from es_mpi.memory import Budget, adam_state_device

QWEN_7B = 7_615_616_512
H100 = 80 * 10**9


def test_7b_adam_goes_to_host_on_an_80gb_card_and_device_is_refused():
    b = Budget(QWEN_7B, 2, adam=True)
    where, why = adam_state_device("auto", "cuda:0", b, H100)
    assert where == "cpu" and "pinned host memory" in why and "Adam moments 60.9 GB" in why
    with pytest.raises(ValueError, match=r"es.adam_state: device does not fit: master 30.5 GB \+ working 15.2 GB"):
        adam_state_device("device", "cuda:0", b, H100)


def test_small_model_keeps_adam_on_the_card_and_cpu_is_unchanged():
    b = Budget(1_500_000_000, 2, adam=True)
    assert adam_state_device("auto", "cuda:0", b, H100)[0] == "cuda:0"
    assert adam_state_device("host", "cuda:0", b, H100)[0] == "cpu"
    assert adam_state_device("auto", "cpu", Budget(QWEN_7B, 2, True), None)[0] == "cpu"


def test_sgd_7b_fits_an_80gb_card():
    b = Budget(QWEN_7B, 2, adam=False)
    assert b.master + b.working < 0.75 * H100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streamed moments need a CUDA device")
def test_streamed_adam_steps_are_bitwise_the_on_card_steps():
    shapes = [(1000,), (30, 40)]
    a_dev = Adam(["a", "b"], shapes, 0.9, 0.999, 1e-8, "cuda")
    a_host = Adam(["a", "b"], shapes, 0.9, 0.999, 1e-8, "cuda", state_device="cpu")
    assert a_host.streamed and a_host.m[0].is_pinned()
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in range(3):
        for o in (a_dev, a_host):
            o.begin()
        for i, s in enumerate(shapes):
            acc = torch.randn(s, generator=g, device="cuda").view(-1)
            d1 = a_dev.step_tensor(i, None, acc.clone(), 1.0, 0.5, 0.01)
            d2 = a_host.step_tensor(i, None, acc.clone(), 1.0, 0.5, 0.01)
            assert torch.equal(d1, d2)
    torch.cuda.synchronize()
    assert all(torch.equal(m.cpu(), h) for m, h in zip(a_dev.m, a_host.m))


def test_adam_with_state_device_equal_to_device_is_unchanged_on_cpu():
    """On CPU the 'host' placement is the same memory: steps are those of the plain Adam."""
    shapes = [(257,)]
    a, b = Adam(["a"], shapes, 0.9, 0.999, 1e-8), Adam(["a"], shapes, 0.9, 0.999, 1e-8, "cpu", "cpu")
    assert not b.streamed
    acc = torch.randn(257)
    a.begin(), b.begin()
    assert torch.equal(a.step_tensor(0, None, acc.clone(), 1.0, 1.0, 0.1), b.step_tensor(0, None, acc.clone(), 1.0, 1.0, 0.1))


A100_40 = 40 * 10**9


def test_master_placement_7b_stays_on_an_80gb_card_and_goes_to_host_on_40gb():
    """Issue 17: the master in pinned host memory when the card cannot hold
    master + working (the vLLM engine's copy is the only working copy)."""
    from es_mpi.memory import master_device

    b = Budget(QWEN_7B, 2, adam=False)
    where, why = master_device("auto", "cuda:0", b, H100)
    assert where == "cuda:0" and "master 30.5 GB + working 15.2 GB = 45.7 GB vs 75% of 80 GB" in why
    where, why = master_device("auto", "cuda:0", b, A100_40)
    assert where == "cpu" and "pinned host memory" in why
    assert master_device("host", "cuda:0", Budget(1_000_000, 2, False), H100)[0] == "cpu"
    assert master_device("auto", "cpu", b, None)[0] == "cpu"
    with pytest.raises(ValueError, match=r"es.master: device does not fit: master 30.5 GB \+ working 15.2 GB"):
        master_device("device", "cuda:0", b, A100_40)


def test_a_host_master_leaves_room_for_adam_on_the_card():
    """Adam is placed after the master: with the master on the host, only
    working + moments count against the card."""
    b = Budget(2_500_000_000, 2, adam=True, master_on_card=False)
    assert b.resident == (2 + 8) * 2_500_000_000
    assert adam_state_device("auto", "cuda:0", b, A100_40)[0] == "cuda:0"
    assert adam_state_device("auto", "cuda:0", Budget(2_500_000_000, 2, adam=True), A100_40)[0] == "cpu"
