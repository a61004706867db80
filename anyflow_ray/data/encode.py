"""Pixels <-> Wan latents with ``AutoencoderKLWan``, and a tiny random VAE for laptops and tests.

Latents are the posterior mean (``latent_dist.mode()``: no sampling noise in the data set) normalised
per channel with the VAE config's ``latents_mean`` / ``latents_std``, ``(z - mean) / std``, exactly as
the Wan pipeline does before its transformer sees them; ``decode_latents`` undoes it. The VAE is read
from ``<base>/vae`` (the Wan2.1-*-Diffusers layout), never downloaded; ``make_tiny_vae`` writes a random
one with the same class into the same place so that the whole path runs on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

TINY_VAE_BASE_DIM = 8  # Wan2.1's is 96


def load_vae(base: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """``AutoencoderKLWan`` from ``<base>/vae`` (local files only), in eval mode."""
    folder = Path(base) / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"VAE not found at {folder} (expected an AutoencoderKLWan folder with config.json: "
                                f"point model.base at Wan2.1-T2V-*-Diffusers, or write a tiny one with make_tiny_vae)")
    return AutoencoderKLWan.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()


def make_tiny_vae(base: str | Path, z_dim: int, seed: int = 0, base_dim: int = TINY_VAE_BASE_DIM) -> Path:
    """Write a random ``AutoencoderKLWan`` with Wan's down-sampling (4x in time, 8x in space) and
    ``z_dim`` latent channels to ``<base>/vae``. Its latent statistics are not 0/1, so a test of the
    normalisation sees it."""
    torch.manual_seed(seed)
    channels = torch.arange(z_dim, dtype=torch.float32)
    vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           latents_mean=(0.05 * channels - 0.1).tolist(), latents_std=(0.5 + 0.1 * channels).tolist())
    out = Path(base) / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    return out


def latent_stats(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, z_dim, 1, 1, 1) float32, from the VAE config."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    return mean, std


def normalize_latents(z: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    mean, std = latent_stats(vae)
    return (z.float() - mean.to(z.device)) / std.to(z.device)


def denormalize_latents(latents: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    mean, std = latent_stats(vae)
    return latents.float() * std.to(latents.device) + mean.to(latents.device)


def latent_shape(vae: AutoencoderKLWan, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, F', H', W') of a clip's latents; ValueError naming the data key the VAE cannot encode."""
    ft, fs = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if (frames - 1) % ft:
        raise ValueError(f"data.frames={frames}: the Wan VAE encodes 1 + {ft}k frames (e.g. {1 + ft * (frames // ft)})")
    for key, side in (("data.height", height), ("data.width", width)):
        if side % fs:
            raise ValueError(f"{key}={side}: must be a multiple of the VAE's spatial factor {fs}")
    return (vae.config.z_dim, (frames - 1) // ft + 1, height // fs, width // fs)


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) pixels in [-1, 1] -> (B, C, F', H', W') normalised latents, float32."""
    device = next(vae.parameters()).device
    posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return normalize_latents(posterior.mode(), vae)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F', H', W') normalised latents -> (B, 3, F, H, W) pixels in [-1, 1], float32."""
    device = next(vae.parameters()).device
    z = denormalize_latents(latents.to(device), vae)
    return vae.decode(z.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)
