"""Samplers (docs/method.md §7): the any-step flow-map sampler, the teacher's Euler/CFG sampler and the
consistency sampler used as a baseline.

One loop serves the first two: on the grid T_i = 1000 sigma_s(1 - i/N), each step is the jump
``z <- z - (T_i - T_{i+1})/1000 u(z, T_i, T_{i+1}, c)``. For a flow map u is the average velocity
over [T_{i+1}, T_i]; for a single-time model it is the instantaneous velocity at T_i, i.e. Euler.
Deterministic, no re-noising. Guidance > 1 mixes conditional and unconditional outputs (CFG).

**Causal (FAR) sampling.** Chunk-by-chunk any-step sampling of the causal flow map (docs/method.md §6, §7).

Each chunk runs the N-step sampler of §7 (grid T_i = 1000 sigma_s(1 - i/N), one jump T_i -> T_{i+1}
per step) while reading a KV cache of the chunks before it, encoded at T = R = 0 from the model's own
outputs. The re-encode of chunk j is fused into chunk j + 1's first call (``cache_states``), so a chunk
costs N calls whatever came before, and one video of n chunks N n calls plus one for fixed context.

Conditioning: ``fixed`` holds clean leading latent frames kept as given (I2V: the image's latent frame,
V2V: leading chunks). Whole fixed chunks go into the cache in one call and are not sampled; a chunk the
fixed frames end inside is sampled with its fixed frames replaced, after every jump, by the same
frames noised to the new time (``(1 - R/1000) x + (R/1000) eps``, so they end exactly as given).

Streaming: ``noise`` may cover more frames than the model was trained on; chunks past
``sum(causal_chunks)`` take the last chunk size, and ``cache_chunks > 0`` keeps only that many of the
newest chunks in the cache (the rolling window; RoPE positions stay absolute).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from anyflow_ray.models.causal import KVCache
from anyflow_ray.models.flowmap import call_model, unwrap_model
from anyflow_ray.sampling.schedule import add_noise, as_batch_time, jump, sampling_grid, x0_from_velocity

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


ChunkHook = Callable[[int, torch.Tensor], None]  # (chunk index, finished chunk (B, C, f, H, W))


@torch.no_grad()
def causal_sample(model: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, num_steps: int,
                  shift: float = 5.0, fixed: torch.Tensor | None = None, cache_chunks: int = 0,
                  guidance_scale: float = 1.0, uncond_context: torch.Tensor | None = None,
                  on_chunk: ChunkHook | None = None, progress: bool = False) -> torch.Tensor:
    """Sample ``noise`` (B, C, F, H, W) chunk by chunk in ``num_steps`` flow-map jumps per chunk.

    ``fixed`` (B, C, Ff, H, W): clean leading frames kept as given. ``cache_chunks``: chunks kept in the
    KV cache (0: all). ``guidance_scale`` != 1 mixes conditional and ``uncond_context`` outputs as
    ``sampling.guided_output`` does, one batched call (the cache then holds both branches).
    ``on_chunk(j, chunk)`` runs as each chunk is finished, fixed ones included.
    """
    core = unwrap_model(model)
    grid = sampling_grid(num_steps, shift).to(noise.device)
    batch, frames = noise.shape[0], noise.shape[2]
    bounds = core.chunk_bounds(frames)
    fixed_frames = _check_fixed(fixed, noise)
    fixed = None if fixed is None else fixed.to(device=noise.device, dtype=noise.dtype)
    if cache_chunks < 0:
        raise ValueError(f"cache_chunks must be >= 0 (0: keep every chunk), got {cache_chunks}")
    guided = guidance_scale != 1.0
    if guided and uncond_context is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_context")
    if guided:  # both branches in one batch, the cache included
        uncond = uncond_context.expand(batch, *uncond_context.shape[1:]).to(context.dtype)
        context = torch.cat([context, uncond])

    def branches(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if guided else x

    def velocity(z, T, cache, cache_states, R) -> torch.Tensor:
        both = model(branches(z), branches(T), context, timestep_r=branches(R), kv_cache=cache,
                     cache_states=None if cache_states is None else branches(cache_states), return_dict=False)[0]
        if not guided:
            return both
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    out = noise.clone()
    cache: KVCache = core.new_cache()
    whole_fixed = [j for j, (_, end) in enumerate(bounds) if end <= fixed_frames]
    if whole_fixed:  # V2V / I2V context: one call, then never sampled
        end = bounds[whole_fixed[-1]][1]
        out[:, :, :end] = fixed[:, :, :end]
        core.append_to_cache(cache, branches(out[:, :, :end]), context)
        for j in whole_fixed:
            _emit(on_chunk, j, out, bounds[j])
    pending = None  # the last finished chunk, not yet in the cache: fused into the next chunk's first call
    for j in tqdm(range(len(whole_fixed), len(bounds)), desc=f"chunks ({num_steps} steps each)",
                  disable=not progress, leave=False):
        start, end = bounds[j]
        if cache_chunks:
            cache.trim(cache_chunks - (pending is not None))
        z = noise[:, :, start:end]
        for i in range(num_steps):
            T = as_batch_time(grid[i], batch, noise.device)
            R = as_batch_time(grid[i + 1], batch, noise.device)
            z = jump(z, velocity(z, T, cache, pending, R), T, R)
            pending = None
            if start < fixed_frames:  # the chunk the fixed frames end inside: keep them on their path
                z[:, :, :fixed_frames - start] = add_noise(fixed[:, :, start:], noise[:, :, start:fixed_frames], R)
        out[:, :, start:end] = z
        pending = z
        _emit(on_chunk, j, out, bounds[j])
    return out


def _check_fixed(fixed: torch.Tensor | None, noise: torch.Tensor) -> int:
    """Frames of ``fixed`` (0 when None), after checking it fits ``noise``."""
    if fixed is None:
        return 0
    if fixed.ndim != 5 or fixed.shape[:2] != noise.shape[:2] or fixed.shape[3:] != noise.shape[3:] \
            or fixed.shape[2] > noise.shape[2]:
        raise ValueError(f"fixed {tuple(fixed.shape)} must be (B, C, Ff, H, W) with Ff <= F for noise "
                         f"{tuple(noise.shape)}")
    return fixed.shape[2]


def _emit(on_chunk: ChunkHook | None, j: int, out: torch.Tensor, bounds: tuple[int, int]) -> None:
    if on_chunk is not None:
        on_chunk(j, out[:, :, bounds[0]:bounds[1]])


__all__ = ["causal_sample"]
