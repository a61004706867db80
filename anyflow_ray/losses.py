"""Losses: teacher flow matching (ALGORITHM §3).

Random draws come from an explicit ``torch.Generator`` (on the CPU, moved to the model's device) so
that a run is reproducible and resumable.
"""

from __future__ import annotations

import torch

from anyflow_ray.models.flowmap import call_model
from anyflow_ray.schedule import T_SCALE, add_noise, sample_logit_normal, velocity_target


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def drop_prompts(context: torch.Tensor, uncond: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each sample's prompt embedding by the unconditional one with probability ``prob``."""
    drop = (torch.rand(context.shape[0], generator=generator) < prob).to(context.device)
    return torch.where(drop[:, None, None], uncond.to(context.dtype).expand_as(context), context)


def teacher_loss(model: torch.nn.Module, x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                 generator: torch.Generator, shift: float = 5.0, uncond_prob: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Single-time flow matching: logit-normal t then sigma_s, 10% unconditional, unweighted MSE to v."""
    batch = x0.shape[0]
    T = T_SCALE * sample_logit_normal(batch, generator, shift).to(x0.device)
    context = drop_prompts(context, uncond, uncond_prob, generator)
    noise = randn_like(x0, generator)
    z = add_noise(x0, noise, T)
    pred = call_model(model, z, T, context)
    loss = (pred.float() - velocity_target(x0, noise).float()).pow(2).mean()
    return loss, {"t_mean": float(T.mean()) / T_SCALE}
