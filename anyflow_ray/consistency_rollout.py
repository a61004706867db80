"""The consistency-style rollout: the baseline of the paper's rollout ablation (docs/method.md §5, §8).

Same (N, k) draw and grid as flow-map backward simulation, but the on-policy state is reached the way a
consistency model samples: from z_0 = eps, each step predicts x0 with a jump to 0 and re-noises it with
fresh noise to the next grid time,

    x0_i    = Phi(z_i; T_i -> 0)
    z_{i+1} = (1 - T_{i+1}/1000) x0_i + (T_{i+1}/1000) eps_{i+1}      (eps_{i+1} fresh)

so z_k costs k calls (no gradient, in the rollout actor) and leaves the probability-flow ODE. The learner
re-runs the last prediction with gradient, x_hat = Phi(z_k; T_k -> 0): one call. DMD, the critic and the
co-training loss are those of Stage 2, so the two rollouts differ only in how the student's states are
made and how it is sampled (``sampling.consistency_sample``): at equal compute per learner step.
"""

from __future__ import annotations

import torch

from anyflow_ray.backward_sim import RolloutState, _phi
from anyflow_ray.schedule import add_noise, as_batch_time, sampling_grid


def consistency_prefix(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int, shift: float = 5.0,
                       generator: torch.Generator | None = None) -> RolloutState:
    """z_k of a consistency-style N-step rollout (k calls; z_0 = eps). The fresh noise is drawn from
    ``generator`` on the CPU (one draw per step, so a seed reproduces the trajectory on any device)."""
    if not 0 <= k < num_steps:
        raise ValueError(f"k={k} must be in [0, {num_steps})")
    grid = sampling_grid(num_steps, shift)
    batch, z = noise.shape[0], noise
    for i in range(k):
        x0 = _phi(model, z, float(grid[i]), 0.0, context)
        fresh = torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(noise.device, noise.dtype)
        z = add_noise(x0, fresh, as_batch_time(grid[i + 1], batch, noise.device))
    return RolloutState(num_steps, k, as_batch_time(grid[k], batch, noise.device),
                        as_batch_time(grid[k + 1], batch, noise.device), z)


def consistency_finish(model, state: RolloutState, context: torch.Tensor) -> torch.Tensor:
    """x_hat = Phi(z_k; T_k -> 0): the consistency model's prediction at step k (the learner's one call)."""
    return _phi(model, state.z_k, float(state.T_k[0]), 0.0, context)
