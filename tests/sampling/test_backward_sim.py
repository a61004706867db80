import pytest
import torch

from anyflow_ray.sampling.rollouts import STEP_BUDGETS, backward_simulation, draw_budget
from anyflow_ray.sampling.schedule import as_batch_time, jump, sampling_grid
from tests.probes import ExactStraightFlowMap


def _rollout(model, z, context, n, k):
    """The first k jumps of the N-step sampler."""
    grid = sampling_grid(n)
    for i in range(k):
        T, R = as_batch_time(grid[i], z.shape[0]), as_batch_time(grid[i + 1], z.shape[0])
        z = jump(z, model(z, T, context, R)[0], T, R)
    return z


@pytest.mark.parametrize("n", [2, 4, 8, 50])
def test_at_most_three_calls_and_states_match_the_n_step_rollout(n):
    model = ExactStraightFlowMap()
    noise = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(n))
    context = torch.tensor([0.5, -1.0]).reshape(2, 1, 1).expand(2, 3, 4).clone()
    for k in range(n):
        model.calls = 0
        state, x_hat = backward_simulation(model, noise, context, n, k)
        assert model.calls == (1 if k == 0 else 2) + (0 if k == n - 1 else 1)
        assert model.calls <= 3
        # z_k equals the state of the N-step sampler after k steps
        assert torch.allclose(state.z_k, _rollout(model, noise, context, n, k), atol=1e-5)
        assert torch.allclose(x_hat, context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1).expand_as(x_hat), atol=1e-4)


def test_budget_draws_cover_the_reference_budgets():
    g = torch.Generator().manual_seed(0)
    draws = [draw_budget(g) for _ in range(400)]
    assert {n for n, _ in draws} == set(STEP_BUDGETS)
    assert all(0 <= k < n for n, k in draws)
    with pytest.raises(ValueError, match="k=4"):
        backward_simulation(ExactStraightFlowMap(), torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1), 4, 4)


class ScaledFlowMap(ExactStraightFlowMap):
    """The exact map with a trainable scale on its velocity: a parameter each call's gradient reaches."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.9))  # not exact: x_hat then depends on z

    def forward(self, z, T, context, timestep_r=None, return_dict=False):
        return (self.scale * super().forward(z, T, context, timestep_r)[0],)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_detach_step_lets_the_gradient_reach_the_jump_to_zero_only(k):
    """distill.grad_scope=jump: x_hat's gradient does not reach the k-th step (nor z_k through it), except
    when that step is itself the jump to 0 (k = N - 1)."""
    from anyflow_ray.sampling.rollouts import finish, prefix

    model, n = ScaledFlowMap(), 4
    noise = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(k))
    context = torch.tensor([0.5, -1.0]).reshape(2, 1, 1).expand(2, 3, 4).clone()
    with torch.no_grad():
        state = prefix(model, noise, context, n, k)
    grads = {}
    for detach in (False, True):
        state.z_k = state.z_k.detach().requires_grad_(True)
        z_next, x_hat = finish(model, state, context, detach_step=detach)
        (z_grad,) = torch.autograd.grad(x_hat.sum(), [state.z_k], allow_unused=True)
        grads[detach] = z_grad
        with torch.no_grad():  # the same values either way: only the gradient's path differs
            assert torch.allclose(x_hat, finish(model, state, context)[1])
    assert grads[False] is not None and grads[False].abs().sum() > 0
    if k == n - 1:
        assert torch.allclose(grads[True], grads[False])
    else:
        assert grads[True] is None
