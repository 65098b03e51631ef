"""Exact restore and materialisation from the fp32 master."""
import torch

from es_mpi.noise import NoiseSource, member_noise
from es_mpi.weights import Weights


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
