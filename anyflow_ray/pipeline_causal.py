"""``AnyFlowPipeline`` with a causal transformer: conditioning and chunk-by-chunk output (docs/method.md §6).

One causal checkpoint serves three tasks: text-to-video, image-to-video (the image's latent frame is
fixed) and video-to-video continuation (the clip's latent frames are fixed). The image or clip is
resized to the call's size; pixel-space models take it as their latents, latent models encode it with
the Wan VAE. Chunks are decoded as they are finished and handed to ``callback_on_chunk_end``, so a
caller can write the video while it is made, also past the training length.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from anyflow_ray.causal_sampling import causal_sample


def media_to_pixels(media, kind: str, height: int, width: int) -> torch.Tensor:
    """An image or a video in [0, 1] (uint8 arrays in [0, 255]) -> (B, 3, F, height, width) in [-1, 1].

    image: a PIL image, an (H, W, 3) array, a (3, H, W) or (B, 3, H, W) tensor.
    video: a list of PIL images or (H, W, 3) arrays, an (F, H, W, 3) array, an (F, 3, H, W) or
    (B, F, 3, H, W) tensor. Resized (bilinear, antialiased) when the size differs.
    """
    if isinstance(media, list):
        media = np.stack([np.asarray(frame) for frame in media])
    if not isinstance(media, torch.Tensor):  # PIL or numpy, channels last
        array = np.asarray(media)
        array = array[..., :3] if array.shape[-1] in (3, 4) else np.repeat(array[..., None], 3, axis=-1)  # RGBA, gray
        media = torch.from_numpy(np.array(array)).movedim(-1, -3)  # (..., 3, H, W)
    frames = media.float() / 255.0 if media.dtype == torch.uint8 else media.float()
    expected = {"image": (3, 4), "video": (4, 5)}[kind]
    if frames.ndim not in expected or frames.shape[-3] != 3:
        raise ValueError(f"{kind} of shape {tuple(frames.shape)}: expected 3 channels, "
                         f"{'(3, H, W) or (B, 3, H, W)' if kind == 'image' else '(F, 3, H, W) or (B, F, 3, H, W)'}")
    if kind == "image":
        frames = frames.unsqueeze(-4)  # one frame
    if frames.ndim == 4:
        frames = frames.unsqueeze(0)  # (B, F, 3, H, W)
    batch, count = frames.shape[:2]
    if frames.shape[-2:] != (height, width):
        frames = F.interpolate(frames.flatten(0, 1), size=(height, width), mode="bilinear", antialias=True,
                               align_corners=False).unflatten(0, (batch, count))
    return (frames.clamp(0, 1) * 2 - 1).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)


def conditioning_latents(pipe, image, video, batch: int, height: int, width: int) -> torch.Tensor | None:
    """Fixed leading latents (batch, C, Ff, H', W') of ``image`` or ``video`` (not both), or None."""
    if image is not None and video is not None:
        raise ValueError("pass `image` (image-to-video) or `video` (video-to-video), not both")
    if image is None and video is None:
        return None
    kind, media = ("image", image) if image is not None else ("video", video)
    pixels = media_to_pixels(media, kind, height, width)
    if pipe.vae is None:
        latents = pixels
    else:
        from anyflow_ray.data.encode import encode_video

        ft = pipe.temporal_factor
        if (pixels.shape[2] - 1) % ft:
            raise ValueError(f"video of {pixels.shape[2]} frames: the Wan VAE encodes 1 + {ft}k frames")
        latents = encode_video(pipe.vae, pixels)
    if latents.shape[0] not in (1, batch):
        raise ValueError(f"{kind} holds {latents.shape[0]} clips for {batch} videos (give 1 or {batch})")
    return latents.expand(batch, *latents.shape[1:]).to(pipe._execution_device, pipe.transformer.dtype)


def pixel_frames(pipe, latent_frames: int) -> int:
    """Video frames decoded from the first ``latent_frames`` latent frames (Wan VAE: 1 + 4 (n - 1))."""
    ft = pipe.temporal_factor
    return latent_frames if ft == 1 or latent_frames == 0 else 1 + ft * (latent_frames - 1)


def causal_call(pipe, noise: torch.Tensor, context: torch.Tensor, num_steps: int, guidance_scale: float,
                uncond: torch.Tensor | None, fixed: torch.Tensor | None, cache_chunks: int, callback, progress: bool):
    """``causal_sample`` for the pipeline; ``callback(pipe, j, frames)`` gets each chunk's new frames as
    (B, f, H, W, 3) in [0, 1]. The Wan VAE is causal in time, so a chunk's frames are decoded from the
    latents up to its end (exact; the cost grows with the video)."""
    if fixed is not None and fixed.shape[2] > noise.shape[2]:
        raise ValueError(f"the conditioning covers {fixed.shape[2]} latent frames but the video has "
                         f"{noise.shape[2]}: ask for more num_frames")
    done: list[torch.Tensor] = []

    def on_chunk(j: int, chunk: torch.Tensor) -> None:
        done.append(chunk)
        if pipe.vae is None:
            video = pipe.decode(chunk)
        else:
            frames = sum(c.shape[2] for c in done)
            start = pixel_frames(pipe, frames - chunk.shape[2])
            video = pipe.decode(torch.cat(done, dim=2))[:, :, start:pixel_frames(pipe, frames)]
        callback(pipe, j, pipe.postprocess(video, "np"))

    return causal_sample(pipe.transformer, noise, context, num_steps, pipe.config.shift, fixed=fixed,
                         cache_chunks=cache_chunks, guidance_scale=guidance_scale, uncond_context=uncond,
                         on_chunk=on_chunk if callback is not None else None, progress=progress)


__all__ = ["causal_call", "conditioning_latents", "media_to_pixels", "pixel_frames"]
