"""Time convention, shift, grids, loss weights, noising and the flow-map jump (docs/method.md §1, §7).

Rectified flow with **t = 1 as noise**: ``z_t = (1 - t) x0 + t eps`` and ``v = eps - x0 = dz/dt``.
Networks see ``T = 1000 t``. All time arithmetic here is done in fp32.
"""

from __future__ import annotations

import torch

T_SCALE = 1000.0


def shift_time(u: torch.Tensor, shift: float = 5.0) -> torch.Tensor:
    """sigma_s(u) = s u / (1 + (s - 1) u): maps uniform draws on [0, 1] towards the noisy end."""
    u = u.float()
    return shift * u / (1.0 + (shift - 1.0) * u)


def sampling_grid(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """T_i = 1000 sigma_s(1 - i/N) for i = 0..N; (N + 1,) fp32, from 1000 down to 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    u = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return (T_SCALE * shift_time(u.double(), shift)).float()


def sample_logit_normal(n: int, generator: torch.Generator | None = None, shift: float = 5.0,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Teacher/critic time draw: t = sigma_s(sigmoid(N(0, 1))), returned in [0, 1] (fp32)."""
    normal = torch.randn(n, generator=generator, device=device)
    return shift_time(torch.sigmoid(normal), shift)


class Beta08Weight:
    """Loss weight w(tau) = C tau sqrt(1 - tau) on the grid tau_i = sigma_5(linspace(1, 0, 1001)).

    C normalises the weights to sum to 1000 over the grid (C ~= 3.657 at shift 5). ``__call__``
    looks up the nearest grid point for each T (0..1000 scale).
    """

    def __init__(self, shift: float = 5.0, grid_size: int = 1001):
        tau = shift_time(torch.linspace(1.0, 0.0, grid_size, dtype=torch.float64), shift)
        raw = tau * torch.sqrt(1.0 - tau)
        self.constant = float(1000.0 / raw.sum())
        self.grid_T = (T_SCALE * tau).float()
        self.weights = (self.constant * raw).float()

    def __call__(self, T: torch.Tensor) -> torch.Tensor:
        grid = self.grid_T.to(T.device)
        index = (T.float()[:, None] - grid[None, :]).abs().argmin(dim=1)
        return self.weights.to(T.device)[index]


def broadcast_time(T: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) times -> shape (B, 1, 1, ...) broadcastable against ``like``."""
    return T.float().reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """z_T = (1 - T/1000) x0 + (T/1000) eps. ``T``: (B,), or already broadcastable against ``x0`` (a causal
    clip's time per frame, 0 on its clean-context frames)."""
    t = (T.float() if T.ndim == x0.ndim else broadcast_time(T, x0)) / T_SCALE
    return ((1.0 - t) * x0.float() + t * noise.float()).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0."""
    return noise - x0


def jump(z: torch.Tensor, u: torch.Tensor, T: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Phi(z; T -> R) = z - ((T - R)/1000) u, with u the average velocity between T and R."""
    dt = broadcast_time(T - R, z) / T_SCALE
    return (z.float() - dt * u.float()).to(z.dtype)


def x0_from_velocity(z: torch.Tensor, v: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """x0 prediction from a velocity at time T: x0 = z - (T/1000) v."""
    return jump(z, v, T, torch.zeros_like(T))


def as_batch_time(T: float | torch.Tensor, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A scalar or (B,) time as a (B,) fp32 tensor."""
    T = torch.as_tensor(T, dtype=torch.float32, device=device)
    return T.expand(batch).clone() if T.ndim == 0 else T.float()
