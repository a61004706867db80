"""FAR's compressed context: chunks older than ``full_chunk_limit`` as a quarter of the tokens (§6).

The reference (and diffusers' ``AnyFlowFARTransformer3DModel``) reads old chunks through a second patch
embedding, ``far_patch_embedding`` (1x4x4 patches on the latents: a quarter of the 1x2x2 tokens),
with RoPE averaged over the full-size positions each compressed token covers:

- teacher forcing over ``n`` chunks: the oldest ``n - full_chunk_limit`` are compressed clean context
  (at T = R = 0; they are denoised by no one), the rest noisy with their clean copy;
- sampling: before chunk ``j`` the finished chunks are encoded at T = R = 0 with the oldest
  ``j - (full_chunk_limit - 1)`` compressed, so the chunk being made sees at most ``full_chunk_limit``
  chunks (itself included) at full size. Which chunks are compressed moves on with every chunk, and the
  cached K/V of every later chunk depend on it, so the cache is encoded again from the clean latents each
  time (the reference's cache step; here inside the chunk's first call, see ``models.causal``).

This module holds the arithmetic: how many chunks are compressed, the patch embedding's initial
weights, and the pooled RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compressed_count(chunks: int, limit: int | None, caching: bool = False) -> int:
    """How many of the oldest ``chunks`` are compressed: beyond ``limit`` in a teacher-forced call,
    beyond ``limit - 1`` finished chunks when encoding the cache (the chunk being made is the last one)."""
    if not limit:
        return 0
    full = limit - 1 if caching else limit
    return max(0, chunks - full)


def far_patch_weights(weight: torch.Tensor, bias: torch.Tensor, compressed: tuple[int, int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed patch embedding's initial (weight, bias): the full one's kernel resized trilinearly
    to ``compressed`` (the reference's and diffusers' warm start), the same bias."""
    out_channels, in_channels = weight.shape[:2]
    resized = F.interpolate(weight.detach().float().reshape(-1, 1, *weight.shape[2:]), size=tuple(compressed),
                            mode="trilinear", align_corners=False)
    return resized.reshape(out_channels, in_channels, *compressed).to(weight.dtype), bias.detach().clone()


def pooled_rope(rope, first: int, frames: int, height: int, width: int, patch: tuple[int, int, int],
                compressed: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1, S, 1, head_dim), of the compressed tokens of latent frames [first, first + frames)
    of size ``height`` x ``width``: per axis, Wan's rotation averaged over the ``compressed // patch``
    full-size positions a token covers and renormalised to unit length (complex average pooling)."""
    factors = [c // p for c, p in zip(compressed, patch)]
    if any(c % p for c, p in zip(compressed, patch)):
        raise ValueError(f"compressed_patch_size {tuple(compressed)} must be a multiple of patch_size {tuple(patch)}")
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    grid = [(first // compressed[0], frames // compressed[0]), (0, height // compressed[1]),
            (0, width // compressed[2])]
    cos_axes, sin_axes = [], []
    for cos, sin, factor, (start, count) in zip(rope.freqs_cos.split(sizes, dim=1), rope.freqs_sin.split(sizes, dim=1),
                                                factors, grid):
        rows = slice(start * factor, (start + count) * factor)
        c = cos[rows].double().reshape(count, factor, -1).mean(1)
        s = sin[rows].double().reshape(count, factor, -1).mean(1)
        norm = torch.sqrt(c * c + s * s)
        cos_axes.append(c / norm)
        sin_axes.append(s / norm)
    (nf, _), (nh, _), (nw, _) = ((g[1], 0) for g in grid)

    def spread(axes):
        f = axes[0].view(nf, 1, 1, -1).expand(nf, nh, nw, -1)
        h = axes[1].view(1, nh, 1, -1).expand(nf, nh, nw, -1)
        w = axes[2].view(1, 1, nw, -1).expand(nf, nh, nw, -1)
        return torch.cat([f, h, w], dim=-1).reshape(1, nf * nh * nw, 1, -1).to(rope.freqs_cos.dtype)

    return spread(cos_axes), spread(sin_axes)
