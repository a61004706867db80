"""Samplers (docs/method.md §7): the any-step flow-map sampler, the teacher's Euler/CFG sampler and the
consistency sampler used as a baseline.

One loop serves the first two: on the grid T_i = 1000 sigma_s(1 - i/N), each step is the jump
``z <- z - (T_i - T_{i+1})/1000 u(z, T_i, T_{i+1}, c)``. For a flow map u is the average velocity
over [T_{i+1}, T_i]; for a single-time model it is the instantaneous velocity at T_i, i.e. Euler.
Deterministic, no re-noising. Guidance > 1 mixes conditional and unconditional outputs (CFG).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from anyflow_ray.models.flowmap import call_model
from anyflow_ray.schedule import add_noise, as_batch_time, jump, sampling_grid, x0_from_velocity

# after step i: (i, T_i, z, context, uncond_context) -> (z, context, uncond_context) for the next step
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"],
                    "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]"]


def guided_output(model: torch.nn.Module, z: torch.Tensor, T: torch.Tensor, context: torch.Tensor,
                  R: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  uncond_context: torch.Tensor | None = None) -> torch.Tensor:
    """u = u_null + g (u_c - u_null) when g != 1 (one batched call), else the conditional output."""
    if guidance_scale == 1.0:
        return call_model(model, z, T, context, R)
    if uncond_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_context")
    uncond = uncond_context.expand(z.shape[0], *uncond_context.shape[1:]).to(context.dtype)
    both = call_model(model, torch.cat([z, z]), torch.cat([T, T]), torch.cat([context, uncond]),
                      None if R is None else torch.cat([R, R]))
    cond_out, uncond_out = both.chunk(2)
    return uncond_out + guidance_scale * (cond_out - uncond_out)


@torch.no_grad()
def sample(model: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, num_steps: int, shift: float = 5.0,
           guidance_scale: float = 1.0, uncond_context: torch.Tensor | None = None,
           progress: bool = False, on_step: StepHook | None = None) -> torch.Tensor:
    """N-step flow-map sampling (or Euler for a single-time model) from ``noise`` at T = 1000 to T = 0.

    ``on_step(i, T_i, z, context, uncond_context)`` runs after step i and returns the (possibly replaced)
    ``(z, context, uncond_context)`` the next step uses.
    """
    grid = sampling_grid(num_steps, shift).to(noise.device)
    z = noise
    batch = noise.shape[0]
    for i in tqdm(range(num_steps), desc=f"sampling {num_steps} steps", disable=not progress, leave=False):
        T = as_batch_time(grid[i], batch, noise.device)
        R = as_batch_time(grid[i + 1], batch, noise.device)
        u = guided_output(model, z, T, context, R, guidance_scale, uncond_context)
        z = jump(z, u, T, R)
        if on_step is not None:
            z, context, uncond_context = on_step(i, grid[i], z, context, uncond_context)
    return z


@torch.no_grad()
def consistency_sample(model: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, num_steps: int,
                       shift: float = 5.0, generator: torch.Generator | None = None, guidance_scale: float = 1.0,
                       uncond_context: torch.Tensor | None = None, on_step: StepHook | None = None) -> torch.Tensor:
    """Consistency-style sampling: predict x0, re-noise with fresh noise to the next grid time.

    Its trajectory leaves the probability-flow ODE; shown as the baseline whose quality falls with N.
    """
    grid = sampling_grid(num_steps, shift).to(noise.device)
    z = noise
    batch = noise.shape[0]
    x0 = z
    for i in range(num_steps):
        T = as_batch_time(grid[i], batch, noise.device)
        zero = torch.zeros_like(T)
        x0 = jump(z, guided_output(model, z, T, context, zero, guidance_scale, uncond_context), T, zero)
        if i + 1 < num_steps:
            fresh = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            z = add_noise(x0, fresh, as_batch_time(grid[i + 1], batch, noise.device))
        if on_step is not None:  # the state after step i: the re-noised z, or x0 after the last step
            state, context, uncond_context = on_step(i, grid[i], z if i + 1 < num_steps else x0, context, uncond_context)
            if i + 1 < num_steps:
                z = state
            else:
                x0 = state
    return x0


def draw_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise from a CPU generator seeded with ``seed`` (identical on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


__all__ = ["sample", "consistency_sample", "guided_output", "draw_noise", "x0_from_velocity"]
