"""Exact restore and materialisation from the fp32 master."""
import hashlib

import numpy as np
import pytest
import torch

from es_mpi.engine.es import plan_update
from es_mpi.model import weights_digest
from es_mpi.engine.noise import BLOCK, NoiseSource, blocks, member_noise
from es_mpi.engine.optim import SGD, Adam
from es_mpi.engine.weights import Weights


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def test_restore_is_bitwise_after_100_evaluations_bf16():
    model = _model()
    w = Weights(model, torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    master_before = [m.clone() for m in w.master]
    src = NoiseSource(3)
    for m in range(100):
        w.materialise(src, m // 10, member_noise(m, True), 0.01)
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        w.restore()
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.bfloat16 and torch.equal(p, b)
    for m, b in zip(w.master, master_before):
        assert torch.equal(m, b)


def test_in_place_bf16_add_subtract_would_drift():
    """The reference's scheme (w += s*eps; w -= s*eps in bf16) is not exact:
    this is the failure the master copy prevents."""
    torch.manual_seed(0)
    p = torch.randn(100_000).bfloat16()
    eps = torch.randn(100_000).bfloat16()
    q = (p + 0.001 * eps) - 0.001 * eps
    assert not torch.equal(p, q)


def test_materialise_is_cast_of_master_plus_noise():
    model = _model()
    w = Weights(model, torch.bfloat16)
    src = NoiseSource(3)
    w.materialise(src, 2, member_noise(5, True), 0.02)
    for i, (m, p) in enumerate(zip(w.master, model.parameters())):
        expect = (m - 0.02 * src.tensor(2, 2, i, m.shape)).to(torch.bfloat16)
        assert torch.equal(p, expect)


def _multi_block_model():
    """An embedding of 2 noise blocks + 4 096 elements, tied to nothing, and a small bias."""
    torch.manual_seed(0)
    rows = (2 * BLOCK + 4096) // 1024
    return torch.nn.Sequential(torch.nn.Embedding(rows, 1024), torch.nn.Linear(1024, 3))


def test_noise_blocks_are_independent_streams_that_compose_the_tensor():
    src = NoiseSource(5)
    n = BLOCK + 5000
    full = src.tensor(1, 2, 3, (n,))
    assert [(b, s, e) for b, s, e in blocks(n)] == [(0, 0, BLOCK), (1, BLOCK, n)]
    one = src.block(1, 2, 3, 1, torch.empty(n - BLOCK))
    assert torch.equal(full[BLOCK:], one)              # a block drawn alone is the tensor's slice
    a, b = full[:5000].numpy(), full[BLOCK:].numpy()
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 0.05  # blocks do not repeat one stream


def test_multi_block_materialise_update_and_scratch_size():
    model = _multi_block_model()
    w = Weights(model, torch.bfloat16)
    assert w._eps.numel() == BLOCK and w._tmp.numel() == BLOCK   # scratch is one block, not the embedding
    src = NoiseSource(9)
    w.materialise(src, 0, member_noise(3, True), 0.01)
    for i, (m, p) in enumerate(zip(w.master, model.parameters())):
        assert torch.equal(p, torch.add(m, src.tensor(0, 1, i, m.shape), alpha=-0.01).to(torch.bfloat16))
    theta0 = [m.clone() for m in w.master]
    z = np.array([1.0, -0.5])
    plan = plan_update(z, np.ones(2, bool), False, alpha=0.1, sigma=0.01, step="paper")
    w.apply_update(src, 0, plan, SGD(w.names), 0.1)
    for i, t0 in enumerate(theta0):
        acc = torch.zeros_like(t0)
        for k in range(2):   # same order as the engine: per element the same fp32 sums
            acc.add_(src.tensor(0, k, i, t0.shape), alpha=float(plan.coeffs_K[k]))
        assert torch.equal(w.master[i], t0 + acc.mul_(plan.scale))


def test_adam_by_blocks_equals_adam_on_whole_tensors():
    model = _multi_block_model()
    w = Weights(model, torch.float32)
    theta0 = [m.clone() for m in w.master]
    src = NoiseSource(9)
    opt = Adam(w.names, w.shapes, 0.9, 0.999, 1e-8)
    ref = Adam(w.names, w.shapes, 0.9, 0.999, 1e-8)
    z = np.array([1.0, -0.5])
    plan = plan_update(z, np.ones(2, bool), False, alpha=0.1, sigma=0.01, step="gradient")
    w.apply_update(src, 0, plan, opt, 0.1)
    ref.begin()
    for i, t0 in enumerate(theta0):
        acc = torch.zeros_like(t0)
        for k in range(2):
            acc.add_(src.tensor(0, k, i, t0.shape), alpha=float(plan.coeffs_K[k]))
        step = ref.step_tensor(i, t0, acc, plan.scale, plan.grad_scale, 0.1)
        assert torch.equal(w.master[i], t0 + step)
        assert torch.equal(opt.m[i], ref.m[i]) and torch.equal(opt.v[i], ref.v[i])


def test_digest_streams_without_copying_and_equals_whole_tensor_hash():
    ts = [torch.randn(5, 7), torch.randn(3), torch.randn(100)]
    h = hashlib.sha256()
    for t in ts:
        h.update(t.numpy().tobytes())
    assert weights_digest(ts) == weights_digest(ts, chunk=7) == h.hexdigest()


def test_update_reads_the_device_once_whatever_the_block_count(monkeypatch):
    """Issue 16 item 10: the finite flag and the squared norm stay on the
    device; the update copies to host once, not twice per noise block."""
    import es_mpi.engine.weights as wmod
    monkeypatch.setattr(wmod, "blocks", lambda n, size=100: [(b, s, min(n, s + size))
                                                             for b, s in enumerate(range(0, n, size))])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    w = Weights(model)
    assert sum(len(b) for b in w._blocks) > 80
    plan = plan_update(np.array([1.0, -0.5, 0.25, 2.0]), np.ones(4, bool), False, alpha=0.1, sigma=0.01, step="paper")
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: reads.append(_n) or _o(self, *a, **k))
    norm = w.apply_update(NoiseSource(1), 0, plan, SGD(w.names), 0.1)
    monkeypatch.undo()
    assert norm > 0
    assert reads.count("cpu") == 1 and len(reads) <= 4, reads


def _two_weights(dtype):
    """The same model's Weights twice: master resident, and master streamed
    through the device scratch (the path of a pinned host master, taken on
    the CPU with stream_master=True)."""
    a, b = _multi_block_model(), _multi_block_model()
    return (Weights(a, dtype), Weights(b, dtype, stream_master=True)), (a, b)


def test_a_streamed_master_gives_the_resident_masters_members_and_updates_bitwise():
    """Issue 17 (master in pinned host memory): every member and every update
    of a streamed master are the resident master's, bit for bit, with SGD and
    Adam, over generations."""
    for dtype in (torch.float32, torch.bfloat16):
        (res, st), (ma, mb) = _two_weights(dtype)
        assert st.streamed and not res.streamed and st._up.numel() == BLOCK
        src = NoiseSource(4)
        for kind in ("sgd", "adam"):
            opts = [SGD(w.names) if kind == "sgd" else Adam(w.names, w.shapes, 0.9, 0.999, 1e-8) for w in (res, st)]
            for gen in range(3):
                for w in (res, st):
                    w.materialise(src, gen, member_noise(gen + 1, True), 0.01)
                assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
                plan = plan_update(np.array([1.0, -0.5, 0.3]), np.ones(3, bool), False, alpha=0.1, sigma=0.01,
                                   step="gradient")
                norms = [w.apply_update(src, gen, plan, o, 0.1) for w, o in zip((res, st), opts)]
                assert norms[0] == norms[1] > 0
                assert all(torch.equal(x, y) for x, y in zip(res.master, st.master))
                assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
                assert res.fingerprint() == st.fingerprint() and res.digest() == st.digest()


def test_member_tensors_are_the_materialised_working_weights():
    """What a vLLM engine loads for a member (one fresh tensor per parameter,
    straight from the master) is what materialise writes into the HF model."""
    for dtype in (torch.float32, torch.bfloat16):
        (res, st), (ma, _) = _two_weights(dtype)
        src = NoiseSource(2)
        for w in (res, st):
            got = list(w.member_tensors(src, 1, member_noise(3, True), 0.02, dtype))
            assert [n for n, _ in got] == w.names
            res.materialise(src, 1, member_noise(3, True), 0.02)
            for (_, t), p in zip(got, ma.parameters()):
                assert t.dtype == dtype and torch.equal(t, p) and t.data_ptr() != p.data_ptr()
            res.restore()
            base = list(w.base_tensors(dtype))
            for (_, t), m, p in zip(base, w.master, ma.parameters()):
                assert torch.equal(t, p) and t.data_ptr() != m.data_ptr()


def test_a_meta_model_means_the_engine_holds_the_working_weights():
    with torch.device("meta"):
        skel = _multi_block_model()
    master = [p.detach().clone() for p in _multi_block_model().parameters()]
    w = Weights(skel, master=master, device="cpu")
    assert w.engine_holds_working and not w.streamed
    w.restore()   # nothing to restore: the engine takes cast(master) from the master
    try:
        w.materialise(NoiseSource(1), 0, member_noise(0, False), 0.01)
    except ValueError as e:
        assert "member_tensors" in str(e)
    else:
        raise AssertionError("materialise into a meta model must be refused")
    got = dict(w.member_tensors(NoiseSource(1), 0, member_noise(0, False), 0.01, torch.float32))
    assert set(got) == set(w.names) and all(not t.is_meta for t in got.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a pinned host master needs a CUDA device")
def test_a_pinned_host_master_on_cuda_gives_the_on_card_bits():
    """es.master: host on a GPU: blocks copied up and back in stream order, no
    host sync per block; the same members and updates as a master on the card."""
    ref = [p.detach().float() for p in _multi_block_model().parameters()]
    pairs = []
    for host in (False, True):
        model = _multi_block_model().cuda().bfloat16()
        master = [t.pin_memory() if host else t.cuda() for t in ref]
        pairs.append((Weights(model, master=master, device="cuda"), model))
    (a, ma), (b, mb) = pairs
    assert b.streamed and b.master[0].is_pinned() and not a.streamed
    src = NoiseSource(4, "cuda")
    for gen in range(2):
        for w in (a, b):
            w.materialise(src, gen, member_noise(1, True), 0.01)
        assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
        plan = plan_update(np.array([1.0, -0.5]), np.ones(2, bool), False, alpha=0.1, sigma=0.01, step="paper")
        assert a.apply_update(src, gen, plan, SGD(a.names), 0.1) == b.apply_update(src, gen, plan, SGD(b.names), 0.1)
        assert all(torch.equal(x.cpu(), y) for x, y in zip(a.master, b.master))
        assert a.fingerprint() == b.fingerprint()
