"""Flow-map backward simulation (docs/method.md §5): on-policy states of an N-step rollout in <= 3 calls.

For a step budget N and a step index k on the grid T_i = 1000 sigma_s(1 - i/N), from noise eps:
    z_k     = Phi(eps;     T_0 -> T_k)       (skipped when k = 0)
    z_{k+1} = Phi(z_k;     T_k -> T_{k+1})   (the real k-th step)
    x_hat   = Phi(z_{k+1}; T_{k+1} -> 0)     (skipped when k = N - 1)
Conditional only, no CFG. A rollout actor runs the prefix without gradient; the learner re-runs the
k-th step and the final jump with gradient from the actor's z_k. ``prefix`` and ``finish`` take any
flow-map callable: ``causal_backward_sim.py`` runs them per chunk on a KV cache for the causal student
(docs/method.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anyflow_ray.models.flowmap import call_model
from anyflow_ray.schedule import as_batch_time, jump, sampling_grid

STEP_BUDGETS = (2, 4, 8, 16, 50)


@dataclass
class RolloutState:
    """One backward-simulation draw: times are (B,) on the 0..1000 scale."""
    num_steps: int
    k: int
    T_k: torch.Tensor
    T_next: torch.Tensor
    z_k: torch.Tensor


def draw_budget(generator: torch.Generator, budgets=STEP_BUDGETS) -> tuple[int, int]:
    """N uniform over ``budgets`` and k ~ U{0..N-1}."""
    n = int(budgets[int(torch.randint(len(budgets), (), generator=generator))])
    return n, int(torch.randint(n, (), generator=generator))


def _phi(model, z, T0: float, T1: float, context) -> torch.Tensor:
    T = as_batch_time(T0, z.shape[0], z.device)
    R = as_batch_time(T1, z.shape[0], z.device)
    return jump(z, call_model(model, z, T, context, R), T, R)


def prefix(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int, shift: float = 5.0,
           uniform_calls: bool = False) -> RolloutState:
    """z_k = Phi(eps; T_0 -> T_k) (z_0 = eps when k = 0); the no-grad part a rollout actor runs.
    ``uniform_calls``: one network call whatever k (for k = 0 the identity jump T_0 -> T_0), for ranks
    that must all make the same calls (ZeRO-3 gathers the weights of each call from every rank)."""
    if not 0 <= k < num_steps:
        raise ValueError(f"k={k} must be in [0, {num_steps})")
    grid = sampling_grid(num_steps, shift)
    skip = k == 0 and not uniform_calls
    z_k = noise if skip else _phi(model, noise, float(grid[0]), float(grid[k]), context)
    B = noise.shape[0]
    return RolloutState(num_steps, k, as_batch_time(grid[k], B, noise.device), as_batch_time(grid[k + 1], B, noise.device), z_k)


def finish(model, state: RolloutState, context: torch.Tensor, uniform_calls: bool = False,
           detach_step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_{k+1}, x_hat) from z_k: the real k-th step and the jump to 0 (the part the learner re-runs).
    ``uniform_calls``: two network calls whatever k (for k = N - 1 the identity jump 0 -> 0), as ``prefix``.
    ``detach_step``: x_hat's gradient reaches the jump to 0 only, not the k-th step before it (the k-th
    step keeps its gradient when it is the jump to 0 itself, k = N - 1)."""
    z_next = _phi(model, state.z_k, float(state.T_k[0]), float(state.T_next[0]), context)
    if state.k == state.num_steps - 1 and not uniform_calls:
        return z_next, z_next
    start = z_next.detach() if detach_step else z_next
    return z_next, _phi(model, start, float(state.T_next[0]), 0.0, context)


def backward_simulation(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int,
                        shift: float = 5.0) -> tuple[RolloutState, torch.Tensor]:
    """(state, x_hat) with at most 3 network calls, whatever N."""
    state = prefix(model, noise, context, num_steps, k, shift)
    return state, finish(model, state, context)[1]
