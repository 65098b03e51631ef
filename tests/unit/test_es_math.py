"""Noise, shaping, update and optimizer maths, checked against hand computations."""
import numpy as np
import pytest
import torch

from es_mpi.engine.es import plan_update, shape_rewards
from es_mpi.engine.noise import NoiseSource, derive_seed, member_noise, prompt_batch
from es_mpi.engine.optim import SGD, Adam


def test_noise_is_deterministic_and_float32():
    a = NoiseSource(7).tensor(3, 5, 2, (1000,))
    b = NoiseSource(7).tensor(3, 5, 2, (1000,))
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


def test_noise_streams_are_independent():
    src = NoiseSource(7)
    base = src.tensor(0, 0, 0, (20000,))
    others = [src.tensor(0, 0, 1, (20000,)),   # another tensor, same member
              src.tensor(0, 1, 0, (20000,)),   # another member, same tensor
              src.tensor(1, 0, 0, (20000,)),   # another generation
              NoiseSource(8).tensor(0, 0, 0, (20000,))]  # another run seed
    for o in others:
        assert not torch.equal(base, o)
        corr = float(np.corrcoef(base.numpy(), o.numpy())[0, 1])
        assert abs(corr) < 0.03, corr
    # same-shaped tensors of one member must not share noise (the reference's flaw)
    assert not torch.equal(src.tensor(0, 0, 3, (64, 64)), src.tensor(0, 0, 4, (64, 64)))


def test_seed_derivation_has_no_additive_collisions():
    # seed + tensor_index style schemes collide: (seed=1, t=0) == (seed=0, t=1)
    assert derive_seed(1, 0, 0, 0) != derive_seed(0, 0, 0, 1)
    seeds = {derive_seed(s, g, m, t) for s in range(3) for g in range(5) for m in range(8) for t in range(10)}
    assert len(seeds) == 3 * 5 * 8 * 10


def test_antithetic_members_share_noise_with_opposite_signs():
    assert member_noise(4, True) == member_noise(5, True).__class__(2, 1)
    assert member_noise(5, True).sign == -1 and member_noise(5, True).index == 2
    assert member_noise(5, False).index == 5 and member_noise(5, False).sign == 1


def test_prompt_batch_is_a_pure_function_of_seed_and_generation():
    a = prompt_batch(3, 7, 100, 8)
    assert np.array_equal(a, prompt_batch(3, 7, 100, 8))
    assert not np.array_equal(a, prompt_batch(3, 8, 100, 8))
    assert len(set(a.tolist())) == 8 and a.max() < 100


def test_zscore_matches_hand_computation():
    r = np.array([1.0, 2.0, 3.0, 6.0])
    mean, std = 3.0, np.sqrt((4 + 1 + 0 + 9) / 4)
    z = shape_rewards(r, np.ones(4, bool), "zscore")
    assert np.allclose(z, (r - mean) / (std + 1e-8), rtol=0, atol=1e-15)


def test_centered_rank_matches_hand_computation():
    z = shape_rewards(np.array([10.0, -1.0, 5.0, 7.0]), np.ones(4, bool), "centered_rank")
    # ranks 3, 0, 1, 2 -> /3 - 0.5
    assert np.allclose(z, [0.5, -0.5, 1 / 3 - 0.5, 2 / 3 - 0.5])


def test_centered_rank_ties_share_their_rank():
    z = shape_rewards(np.array([1.0, 1.0, 1.0]), np.ones(3, bool), "centered_rank")
    assert np.array_equal(z, [0.0, 0.0, 0.0])
    z = shape_rewards(np.array([2.0, 1.0, 2.0, 0.0]), np.ones(4, bool), "centered_rank")
    # ranks: 2.5, 1, 2.5, 0 -> /3 - 0.5
    assert np.allclose(z, [2.5 / 3 - 0.5, 1 / 3 - 0.5, 2.5 / 3 - 0.5, -0.5])


def test_raw_and_invalid_members_are_left_out():
    r = np.array([1.0, np.nan, 3.0, 100.0])
    valid = np.array([True, False, True, False])
    z = shape_rewards(r, valid, "zscore")
    assert z[1] == 0 and z[3] == 0
    assert np.allclose(z[[0, 2]], [-1, 1], atol=1e-7)
    assert np.array_equal(shape_rewards(r, valid, "raw"), [1.0, 0, 3.0, 0])


def test_plan_update_paper_and_gradient_scales():
    z = np.array([1.0, -1.0, 0.5, -0.5])
    valid = np.ones(4, bool)
    p = plan_update(z, valid, False, alpha=0.1, sigma=0.01, step="paper")
    assert p.scale == pytest.approx(0.1 / 4) and np.array_equal(p.coeffs_K, z)
    g = plan_update(z, valid, False, alpha=0.1, sigma=0.01, step="gradient")
    assert g.scale == pytest.approx(0.1 / (4 * 0.01))
    a = plan_update(z, valid, True, alpha=0.1, sigma=0.01, step="paper")
    assert np.array_equal(a.coeffs_K, [2.0, 1.0])  # z0 - z1, z2 - z3
    empty = plan_update(np.zeros(4), np.zeros(4, bool), False, 0.1, 0.01, "paper")
    assert empty.empty and empty.n_valid == 0


def test_one_sgd_step_equals_hand_computation():
    """theta + alpha/N * sum z_n eps_n on a small parameter vector."""
    from es_mpi.engine.weights import Weights

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=True)
    w = Weights(model, torch.float32)
    theta0 = [m.clone() for m in w.master]
    src = NoiseSource(11)
    z = np.array([0.3, -1.2, 0.9])
    plan = plan_update(z, np.ones(3, bool), False, alpha=0.5, sigma=0.1, step="paper")
    w.apply_update(src, 4, plan, SGD(w.names), 0.5)
    for i, t0 in enumerate(theta0):
        eps = [src.tensor(4, k, i, t0.shape).double() for k in range(3)]
        expect = t0.double() + 0.5 / 3 * sum(float(z[k]) * eps[k] for k in range(3))
        assert torch.allclose(w.master[i].double(), expect, atol=1e-6)


def test_adam_state_matches_hand_computation():
    g = torch.tensor([0.5, -2.0])
    theta = torch.tensor([1.0, 1.0])
    opt = Adam(["p"], [(2,)], beta1=0.9, beta2=0.99, eps=1e-8)
    for t in (1, 2):
        opt.begin()
        theta = theta + opt.step_tensor(0, theta, g, 0.0, 1.0, alpha=0.1)
        m = (1 - 0.9 ** t) * g              # constant gradient: m_t = (1 - b1^t) g
        v = (1 - 0.99 ** t) * g * g
        assert torch.allclose(opt.m[0], m) and torch.allclose(opt.v[0], v)
    # bias-corrected step is alpha * sign(g) each time for a constant gradient
    assert torch.allclose(theta, torch.tensor([1.2, 0.8]), atol=1e-6)
    state = opt.state_dict()
    fresh = Adam(["p"], [(2,)], 0.9, 0.99, 1e-8)
    fresh.load_state_dict(state)
    assert fresh.t == 2 and torch.equal(fresh.m[0], opt.m[0]) and torch.equal(fresh.v[0], opt.v[0])
