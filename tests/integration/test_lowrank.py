"""Low-rank noise (engine.lowrank): rows of several members in one batch see
exactly their member's perturbed weights, the base is never written, and the
update is the sum of the members' low-rank terms.  On the tiny Llama (untied
head, no biases) and a tiny Qwen2 shape (tied embedding, q/k/v biases)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from es_mpi.decode import decode_batch
from es_mpi.engine.es import UpdatePlan
from es_mpi.engine.lowrank import FROZEN, FULL, LOWRANK, LowRank
from es_mpi.engine.noise import NoiseSource, member_noise
from es_mpi.engine.optim import SGD
from es_mpi.engine.weights import Weights
from es_mpi.model import load_model, load_tokenizer, prepare

SIGMA = 0.02


def es_cfg(scope="layers", rank=1, antithetic=True):
    return SimpleNamespace(sigma=SIGMA, rank=rank, antithetic=antithetic, lowrank_scope=scope, noise="lowrank")


@pytest.fixture(scope="module", params=["builtin:tiny", "builtin:qwen2.5-tiny-random"])
def model_path(request, cache_dir):
    return prepare(request.param, cache_dir=str(cache_dir))


def build(folder, scope, rank=1, antithetic=True):
    model, master = load_model(folder, "fp32", "cpu")
    w = Weights(model, master=master)
    noise = NoiseSource(5)
    return model, w, noise, LowRank(model, w, noise, es_cfg(scope, rank, antithetic))


def materialised(folder, w, lr, noise, gen, member, rank):
    """A separate model holding member's weights explicitly: W + s sigma A B^T / sqrt(r), 1-D: + s sigma eps."""
    ref, _ = load_model(folder, "fp32", "cpu")
    mn = member_noise(member, lr.antithetic)
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            if lr.kinds[i] == LOWRANK:
                a = noise.factor(gen, mn.index, i, 0, p.shape[0], rank)
                b = noise.factor(gen, mn.index, i, 1, p.shape[1], rank)
                p.add_(a @ b.t(), alpha=mn.sign * SIGMA / math.sqrt(rank))
            elif lr.kinds[i] == FULL:
                p.add_(noise.tensor(gen, mn.index, i, p.shape), alpha=mn.sign * SIGMA)
    return ref


@pytest.mark.parametrize("scope,rank", [("layers", 1), ("all", 4)])
def test_rows_of_mixed_members_see_their_members_weights(model_path, scope, rank):
    model, w, noise, lr = build(model_path, scope, rank)
    if scope == "all":
        assert FROZEN not in lr.kinds          # embeddings, head, norms, biases all perturbed
    else:
        assert {lr.kinds[i] for i, n in enumerate(w.names) if ".layers." not in f".{n}"} == {FROZEN}
    tok = load_tokenizer(model_path)
    members = [0, 1, 2, 3, 2, 0]               # antithetic pairs (0, 1), (2, 3); rows out of member order
    lr.begin(3, sorted(set(members)))
    rows = lr.tile(members)
    ids = torch.tensor([tok("the answer is 42 and", add_special_tokens=False)["input_ids"]] * len(members))
    rows.set(torch.arange(len(members)))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    lr.end()
    for j, m in enumerate(members):
        with torch.no_grad():
            want = materialised(model_path, w, lr, noise, 3, m, rank)(input_ids=ids[j:j + 1]).logits[0]
        assert torch.allclose(got[j], want, atol=2e-5, rtol=1e-4), (m, (got[j] - want).abs().max())
    with torch.no_grad():                        # disarmed: the base model, bit for bit
        assert torch.equal(model(input_ids=ids).logits, load_model(model_path, "fp32", "cpu")[0](input_ids=ids).logits)


def test_restore_is_exact_after_100_evaluations_since_the_base_is_never_written(model_path):
    model, w, noise, lr = build(model_path, "all")
    tok = load_tokenizer(model_path)
    before = [p.detach().clone() for p in model.parameters()]
    texts = ["the answer is", "what seven times eight", "the sky is blue"]
    base = decode_batch(model, tok, texts, 6)
    outs = set()
    for e in range(100):
        lr.begin(e // 10, [2 * (e % 4), 2 * (e % 4) + 1])
        c = decode_batch(model, tok, texts, 6, rows=lr.tile([2 * (e % 4), 2 * (e % 4) + 1, 2 * (e % 4)]))
        outs.add(tuple(x.text for x in c))
        lr.end()
    assert len(outs) > 1                         # the members really decoded differently
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), w.master))
    assert decode_batch(model, tok, texts, 6) == base


@pytest.mark.parametrize("rank", [1, 3])
def test_update_is_the_sum_of_the_low_rank_terms_and_frozen_tensors_stay(model_path, rank):
    model, w, noise, lr = build(model_path, "layers", rank)
    theta0 = [m.clone() for m in w.master]
    coeffs = np.array([0.7, -1.3, 0.0, 2.1])
    plan = UpdatePlan(coeffs, 8, 0.05, 1 / 8)
    lr.apply_update(6, plan, SGD(w.names), 0.05)
    for i, (t0, t1) in enumerate(zip(theta0, w.master)):
        if lr.kinds[i] == FROZEN:
            assert torch.equal(t0, t1), w.names[i]
            continue
        m_, n_ = t0.shape
        want = t0.double() + 0.05 / math.sqrt(rank) * sum(
            c * (noise.factor(6, k, i, 0, m_, rank).double() @ noise.factor(6, k, i, 1, n_, rank).double().t())
            for k, c in enumerate(coeffs) if c)
        assert torch.allclose(t1.double(), want, atol=1e-6), w.names[i]
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), w.master))  # working = cast(master) again


def test_lowrank_update_bits_do_not_depend_on_the_block_size(model_path):
    """The update of a matrix is the same bits whatever its row blocks (a GEMM over the blocks was not)."""
    import es_mpi.engine.lowrank as L

    model, w, noise, lr = build(model_path, "all")
    i = max((j for j, k in enumerate(lr.kinds) if k == LOWRANK), key=lambda j: w.master[j].numel())
    coeffs = [0.5, -1.0, 2.0]
    whole = torch.cat([acc.clone() for _, _, acc in lr.lowrank_blocks(noise, 1, i, coeffs)])
    old = L.BLOCK
    try:
        L.BLOCK = w.shapes[i][1] * 3              # three rows per block
        parts = [(s, e, acc.clone()) for s, e, acc in lr.lowrank_blocks(noise, 1, i, coeffs)]
    finally:
        L.BLOCK = old
    assert len(parts) > 1 and torch.equal(torch.cat([a for _, _, a in parts]), whole)
