"""The consistency-style rollout of the rollout ablation: its states are the consistency sampler's own."""

import pytest
import torch

from anyflow_ray.sampling.rollouts import consistency_finish, consistency_prefix
from anyflow_ray.sampling.samplers import consistency_sample
from tests.probes import ExactStraightFlowMap


class DriftingFlowMap(ExactStraightFlowMap):
    """Not exact (its x0 prediction depends on T), so re-noising moves the state off the ODE."""

    def forward(self, z, T, context, timestep_r=None, return_dict=False):
        self.calls += 1
        return (z * (1.0 + T.reshape(-1, 1, 1, 1, 1) / 2000) - context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1),)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_k_calls_and_the_state_the_consistency_sampler_reaches(n):
    model = DriftingFlowMap()
    noise = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(n))
    context = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    for k in range(n):
        states = []
        consistency_sample(model, noise, context, n, generator=torch.Generator().manual_seed(7),
                           on_step=lambda i, T, z, c, u: (states.append(z.clone()), (z, c, u))[1])
        model.calls = 0
        state = consistency_prefix(model, noise, context, n, k, generator=torch.Generator().manual_seed(7))
        assert model.calls == k
        assert torch.equal(state.z_k, noise if k == 0 else states[k - 1])  # the sampler's state before step k
        x_hat = consistency_finish(model, state, context)
        assert model.calls == k + 1
        if k == n - 1:  # the last prediction is the sample itself
            assert torch.equal(x_hat, states[k])
    with pytest.raises(ValueError, match="k=2"):
        consistency_prefix(model, noise, context, 2, 2)


def test_an_exact_flow_map_predicts_the_data_from_any_state():
    """For the exact map every x0 prediction is the data, so z_k is on the forward process of the data."""
    model = ExactStraightFlowMap()
    noise = torch.randn(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    context = torch.tensor([0.5, -1.0]).reshape(2, 1, 1).expand(2, 3, 4).clone()
    state = consistency_prefix(model, noise, context, 4, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(consistency_finish(model, state, context),
                          torch.tensor([0.5, -1.0]).reshape(2, 1, 1, 1, 1).expand_as(noise), atol=1e-5)
