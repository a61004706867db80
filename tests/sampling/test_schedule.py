import math

import pytest
import torch

from anyflow_ray.sampling import schedule as S


def test_shift_matches_hand_computed_values():
    u = torch.tensor([0.0, 0.5, 1.0, 0.2])
    # sigma_5(0.5) = 2.5 / 3; sigma_5(0.2) = 1 / 1.8
    assert torch.allclose(S.shift_time(u, 5.0), torch.tensor([0.0, 2.5 / 3, 1.0, 1 / 1.8]))
    assert torch.allclose(S.shift_time(u, 1.0), u)


def test_sampling_grid_endpoints_and_values():
    grid = S.sampling_grid(2, 5.0)
    assert grid.dtype == torch.float32
    assert torch.allclose(grid, torch.tensor([1000.0, 2500.0 / 3, 0.0]))
    g4 = S.sampling_grid(4, 5.0)
    assert g4[0] == 1000 and g4[-1] == 0 and torch.all(g4[1:] < g4[:-1])
    assert math.isclose(float(g4[2]), 1000 * 2.5 / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        S.sampling_grid(0)


def test_beta08_constant_and_lookup():
    w = S.Beta08Weight(5.0)
    assert abs(w.constant - 3.657) < 5e-3
    assert abs(float(w.weights.sum()) - 1000.0) < 1e-2
    # nearest grid point: at T = 1000 the weight is 0 (sqrt(1 - 1)); in the middle it is C t sqrt(1-t)
    T = torch.tensor([1000.0, 500.0, 0.0])
    values = w(T)
    assert values[0] == 0 and values[2] == 0
    idx = (w.grid_T - 500.0).abs().argmin()
    t = float(w.grid_T[idx]) / 1000
    assert math.isclose(float(values[1]), w.constant * t * math.sqrt(1 - t), rel_tol=1e-5)


def test_noising_velocity_and_jump_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    T = torch.tensor([1000.0, 400.0, 0.0])
    z = S.add_noise(x0, eps, T)
    assert torch.allclose(z[0], eps[0]) and torch.allclose(z[2], x0[2])
    v = S.velocity_target(x0, eps)
    # the exact velocity jumps along the straight path: Phi(z_T; T -> R) = z_R
    R = torch.tensor([250.0, 100.0, 0.0])
    assert torch.allclose(S.jump(z, v, T, R), S.add_noise(x0, eps, R), atol=1e-6)
    assert torch.allclose(S.x0_from_velocity(z, v, T), x0, atol=1e-6)


def test_logit_normal_draws_are_shifted_and_seeded():
    a = S.sample_logit_normal(2000, torch.Generator().manual_seed(1))
    b = S.sample_logit_normal(2000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert 0 < float(a.min()) and float(a.max()) < 1
    assert float(a.median()) == pytest.approx(float(S.shift_time(torch.tensor(0.5))), abs=0.03)
