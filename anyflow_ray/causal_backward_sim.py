"""Backward simulation of the causal (FAR) student, chunk by chunk (docs/method.md §5, §6).

One draw (N, k) per trajectory, shared by every chunk (as the reference's rollout). The rollout actor
generates the chunks in order with the KV cache of the model's own previous outputs, without gradient:
for chunk j, from its noise eps_j,
    z_k     = Phi(eps_j;   T_0     -> T_k)      (skipped when k = 0)
    z_{k+1} = Phi(z_k;     T_k     -> T_{k+1})
    x_hat_j = Phi(z_{k+1}; T_{k+1} -> 0)        (skipped when k = N - 1)
each call attending to the cached chunks < j. x_hat_j, re-encoded at T = R = 0, joins the cache in the
first call of chunk j + 1 (``cache_states``), so a chunk costs at most 3 calls whatever N, as the
bidirectional backward simulation, and nothing after the last chunk.

The learner re-runs the k-th step and the final jump of every chunk at once, with gradient, through the
teacher-forcing forward: noisy chunk j sees the clean copy of the actor's x_hat of chunks < j, which is
what it saw in the cache (the model's equivalence of the two paths), so the re-run equals the actor's
x_hat for the same weights. No gradient reaches the context: the cache is detached in the actor, the
clean copy is the actor's detached output on the learner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anyflow_ray.backward_sim import RolloutState, finish, prefix
from anyflow_ray.models.flowmap import _unwrap


@dataclass
class CausalRollout:
    """A causal draw: ``state.z_k`` holds every chunk's z_k along frames (B, C, F, H, W) with the shared
    (N, k) and times; ``x_hat`` the actor's x_hat of every chunk (the clean context of later chunks)."""
    state: RolloutState
    x_hat: torch.Tensor


class _OnCache:
    """The student on the next chunk with the KV cache of the chunks before it. ``pending`` (the chunk just
    finished) is re-encoded at T = R = 0 and appended to the cache by the first call that follows."""

    def __init__(self, model, cache):
        self.module, self.cache, self.pending = model, cache, None

    def __call__(self, z, T, context, timestep_r=None, return_dict=False):
        pending, self.pending = self.pending, None
        return self.module(z, T, context, timestep_r=timestep_r, kv_cache=self.cache, cache_states=pending,
                           return_dict=False)


class _TeacherForced:
    """The student on all noisy chunks at once, chunk j attending to the clean chunks < j of ``clean``."""

    def __init__(self, model, clean: torch.Tensor):
        self.module, self.clean = model, clean

    def __call__(self, z, T, context, timestep_r=None, return_dict=False):
        return self.module(z, T, context, timestep_r=timestep_r, clean_states=self.clean, return_dict=False)


def causal_rollout(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int,
                   shift: float = 5.0) -> CausalRollout:
    """The actor's no-grad rollout of every chunk of ``noise`` (B, C, F, H, W) for one (N, k): <= 3 calls
    per chunk, the first fusing the re-encode of the previous chunk's x_hat into the cache."""
    causal = _unwrap(model)
    on_cache = _OnCache(model, causal.new_cache())
    z_ks, x_hats = [], []
    with torch.no_grad():
        for start, end in causal.chunk_bounds(noise.shape[2]):
            state = prefix(on_cache, noise[:, :, start:end], context, num_steps, k, shift)
            x_hat = finish(on_cache, state, context)[1]
            z_ks.append(state.z_k)
            x_hats.append(x_hat)
            on_cache.pending = x_hat
    whole = RolloutState(num_steps, k, state.T_k, state.T_next, torch.cat(z_ks, dim=2))
    return CausalRollout(whole, torch.cat(x_hats, dim=2))


def causal_prefix(model, noise: torch.Tensor, context_chunks: torch.Tensor, context: torch.Tensor,
                  num_steps: int, k: int, shift: float = 5.0, uniform_calls: bool = False) -> RolloutState:
    """z_k of every chunk in one teacher-forced call (``distill.grad_scope: all``: the prefix with gradient);
    ``uniform_calls`` as ``backward_sim.prefix``."""
    return prefix(_TeacherForced(model, context_chunks), noise, context, num_steps, k, shift, uniform_calls)


def causal_finish(model, state: RolloutState, context_chunks: torch.Tensor, context: torch.Tensor,
                  uniform_calls: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_{k+1}, x_hat) of every chunk from the actor's z_k, with gradient: the k-th step and the jump to 0
    through the teacher-forcing forward on the actor's x_hat (two calls, one when k = N - 1 unless
    ``uniform_calls``, as ``backward_sim.finish``)."""
    return finish(_TeacherForced(model, context_chunks.detach()), state, context, uniform_calls)
