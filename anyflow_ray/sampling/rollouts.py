"""Every rollout kind of Stage 2 (docs/method.md §5, §6): on-policy states of an N-step rollout.

**Flow-map backward simulation.** For a step budget N and a step index k on the grid
T_i = 1000 sigma_s(1 - i/N), from noise eps:
    z_k     = Phi(eps;     T_0 -> T_k)       (skipped when k = 0)
    z_{k+1} = Phi(z_k;     T_k -> T_{k+1})   (the real k-th step)
    x_hat   = Phi(z_{k+1}; T_{k+1} -> 0)     (skipped when k = N - 1)
Conditional only, no CFG, at most 3 calls whatever N. A rollout actor runs the prefix without gradient;
the learner re-runs the k-th step and the final jump with gradient from the actor's z_k. ``prefix`` and
``finish`` take any flow-map callable.

**Causal (FAR) student**, chunk by chunk. One draw (N, k) per trajectory, shared by every chunk (as the
reference's rollout). The actor generates the chunks in order with the KV cache of the model's own
previous outputs, without gradient; each of the three calls above attends to the cached chunks < j.
x_hat_j, re-encoded at T = R = 0, joins the cache in the first call of chunk j + 1 (``cache_states``), so
a chunk costs at most 3 calls. The learner re-runs the k-th step and the final jump of every chunk at once,
with gradient, through the teacher-forcing forward: noisy chunk j sees the clean copy of the actor's x_hat
of chunks < j, which is what it saw in the cache, so the re-run equals the actor's x_hat for the same
weights. No gradient reaches the context (the cache and the clean copy are detached).

**Consistency-style rollout**, the baseline of the paper's rollout ablation (§8): same (N, k) draw and
grid, but the state is reached the way a consistency model samples, from z_0 = eps:
    x0_i    = Phi(z_i; T_i -> 0)
    z_{i+1} = (1 - T_{i+1}/1000) x0_i + (T_{i+1}/1000) eps_{i+1}      (eps_{i+1} fresh)
so z_k costs k calls (no gradient, in the actor) and leaves the probability-flow ODE. The learner re-runs
the last prediction with gradient, x_hat = Phi(z_k; T_k -> 0): one call. DMD, the critic and co-training
are those of Stage 2, so the two rollouts differ only in how the student's states are made.

``training/distill.py::rollout_strategy`` picks one of these once from the config, for the rollout actor
and the learner alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anyflow_ray.models.flowmap import call_model, unwrap_model
from anyflow_ray.sampling.schedule import add_noise, as_batch_time, jump, sampling_grid

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


def phi(model, z, T0: float, T1: float, context) -> torch.Tensor:
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
    z_k = noise if skip else phi(model, noise, float(grid[0]), float(grid[k]), context)
    B = noise.shape[0]
    return RolloutState(num_steps, k, as_batch_time(grid[k], B, noise.device), as_batch_time(grid[k + 1], B, noise.device), z_k)


def finish(model, state: RolloutState, context: torch.Tensor, uniform_calls: bool = False,
           detach_step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_{k+1}, x_hat) from z_k: the real k-th step and the jump to 0 (the part the learner re-runs).
    ``uniform_calls``: two network calls whatever k (for k = N - 1 the identity jump 0 -> 0), as ``prefix``.
    ``detach_step``: x_hat's gradient reaches the jump to 0 only, not the k-th step before it (the k-th
    step keeps its gradient when it is the jump to 0 itself, k = N - 1)."""
    z_next = phi(model, state.z_k, float(state.T_k[0]), float(state.T_next[0]), context)
    if state.k == state.num_steps - 1 and not uniform_calls:
        return z_next, z_next
    start = z_next.detach() if detach_step else z_next
    return z_next, phi(model, start, float(state.T_next[0]), 0.0, context)


def backward_simulation(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int,
                        shift: float = 5.0) -> tuple[RolloutState, torch.Tensor]:
    """(state, x_hat) with at most 3 network calls, whatever N."""
    state = prefix(model, noise, context, num_steps, k, shift)
    return state, finish(model, state, context)[1]


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


class _PerChunk:
    """The student with FAR's compressed context on all noisy chunks: chunk j on a KV cache of the clean
    chunks < j of ``clean`` (the oldest compressed as chunk j saw them in the actor), one call per chunk, as
    the reference's rollout with gradient. One teacher-forced call cannot do it: every chunk has its own
    compressed split. The caches carry no gradient and serve every call on the same ``clean``."""

    def __init__(self, model, clean: torch.Tensor):
        self.module, self.clean, self.caches = model, clean, {}

    def __call__(self, z, T, context, timestep_r=None, return_dict=False):
        causal = unwrap_model(self.module)
        outs = []
        for j, (start, end) in enumerate(causal.chunk_bounds(z.shape[2])):
            if j not in self.caches:
                self.caches[j] = causal.new_cache()
                if start:
                    causal.append_to_cache(self.caches[j], self.clean[:, :, :start], context)
            T_j = T if T.ndim == 1 else T[:, j]
            R_j = timestep_r if timestep_r is None or timestep_r.ndim == 1 else timestep_r[:, j]
            outs.append(self.module(z[:, :, start:end], T_j, context, timestep_r=R_j, kv_cache=self.caches[j],
                                    return_dict=False)[0])
        return (torch.cat(outs, dim=2),)


def _forced(model, clean: torch.Tensor):
    """The learner's re-run of every chunk on ``clean``: one teacher-forced call, or per chunk on caches
    when FAR's compressed context makes old chunks differ by chunk (``_PerChunk``)."""
    causal = unwrap_model(model)
    limit = getattr(causal.config, "full_chunk_limit", None)
    if limit and len(causal.chunk_bounds(clean.shape[2])) > limit:
        return _PerChunk(model, clean)
    return _TeacherForced(model, clean)


def causal_rollout(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int,
                   shift: float = 5.0) -> CausalRollout:
    """The actor's no-grad rollout of every chunk of ``noise`` (B, C, F, H, W) for one (N, k): <= 3 calls
    per chunk, the first fusing the re-encode of the previous chunk's x_hat into the cache."""
    causal = unwrap_model(model)
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
    ``uniform_calls`` as ``prefix``."""
    return prefix(_forced(model, context_chunks), noise, context, num_steps, k, shift, uniform_calls)


def causal_finish(model, state: RolloutState, context_chunks: torch.Tensor, context: torch.Tensor,
                  uniform_calls: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_{k+1}, x_hat) of every chunk from the actor's z_k, with gradient: the k-th step and the jump to 0
    through the teacher-forcing forward on the actor's x_hat (two calls, one when k = N - 1 unless
    ``uniform_calls``, as ``finish``)."""
    return finish(_forced(model, context_chunks.detach()), state, context, uniform_calls)


def consistency_prefix(model, noise: torch.Tensor, context: torch.Tensor, num_steps: int, k: int, shift: float = 5.0,
                       generator: torch.Generator | None = None) -> RolloutState:
    """z_k of a consistency-style N-step rollout (k calls; z_0 = eps). The fresh noise is drawn from
    ``generator`` on the CPU (one draw per step, so a seed reproduces the trajectory on any device)."""
    if not 0 <= k < num_steps:
        raise ValueError(f"k={k} must be in [0, {num_steps})")
    grid = sampling_grid(num_steps, shift)
    batch, z = noise.shape[0], noise
    for i in range(k):
        x0 = phi(model, z, float(grid[i]), 0.0, context)
        fresh = torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(noise.device, noise.dtype)
        z = add_noise(x0, fresh, as_batch_time(grid[i + 1], batch, noise.device))
    return RolloutState(num_steps, k, as_batch_time(grid[k], batch, noise.device),
                        as_batch_time(grid[k + 1], batch, noise.device), z)


def consistency_finish(model, state: RolloutState, context: torch.Tensor) -> torch.Tensor:
    """x_hat = Phi(z_k; T_k -> 0): the consistency model's prediction at step k (the learner's one call)."""
    return phi(model, state.z_k, float(state.T_k[0]), 0.0, context)
