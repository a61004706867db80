"""``AnyFlowPipeline``: a diffusers ``DiffusionPipeline`` sampling a flow map (or a teacher) in N steps.

    pipe = AnyFlowPipeline.from_pretrained("outputs/tiny/teacher")
    frames = pipe("a red circle moving left", num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0)).frames   # (B, F, H, W, 3) in [0, 1]

With a ``WanFlowMapTransformer3DModel`` each step is one flow-map jump; with a plain
``WanTransformer3DModel`` (a teacher) it is an Euler step. Latent models decode with the Wan VAE
(``AutoencoderKLWan``); pixel-space models (the tiny default, ``vae=None``) use the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from anyflow_ray.models.text import UNCONDITIONAL_PROMPT, encode_prompts
from anyflow_ray.sampling import consistency_sample, sample


@dataclass
class AnyFlowPipelineOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor  # (B, F, H, W, 3) in [0, 1] ("np") or the raw latents ("latent")


class AnyFlowPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "scheduler"]

    def __init__(self, transformer, text_encoder, tokenizer, scheduler=None, vae=None,
                 text_max_length: int = 512, shift: float = 5.0):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vae=vae)
        self.register_to_config(text_max_length=text_max_length, shift=shift)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal if self.vae is not None else 1

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.scale_factor_spatial if self.vae is not None else 1

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """(B, C, F', H', W') of the latents for videos of ``num_frames`` x ``height`` x ``width``."""
        ft, fs = self.temporal_factor, self.spatial_factor
        _, p_h, p_w = self.transformer.config.patch_size
        if height % (fs * p_h) or width % (fs * p_w):
            raise ValueError(f"height={height} and width={width} must be multiples of {fs * p_h}x{fs * p_w}")
        if ft > 1 and (num_frames - 1) % ft:
            raise ValueError(f"num_frames={num_frames}: num_frames - 1 must be divisible by {ft}")
        frames = (num_frames - 1) // ft + 1 if ft > 1 else num_frames
        return (batch, self.transformer.config.in_channels, frames, height // fs, width // fs)

    # -- text ---------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts, self.config.text_max_length)
        return embeds.to(device=self._execution_device, dtype=self.transformer.dtype)

    # -- decode -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> videos (B, 3, F, H, W) in [0, 1]."""
        if self.vae is None:
            video = latents.float()
        else:
            cfg = self.vae.config
            mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, cfg.z_dim, 1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=latents.device).view(1, cfg.z_dim, 1, 1, 1)
            latents = latents.to(self.vae.dtype) * std.to(self.vae.dtype) + mean.to(self.vae.dtype)
            video = self.vae.decode(latents, return_dict=False)[0].float()
        return ((video.clamp(-1, 1) + 1) / 2)

    # -- call ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 4, guidance_scale: float = 1.0,
                 num_frames: int = 8, height: int = 16, width: int = 16, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, sampler: str = "flowmap", output_type: str = "np",
                 prompt_embeds: torch.Tensor | None = None, progress: bool = False, return_dict: bool = True):
        """Sample videos in ``num_inference_steps`` steps (any N >= 1); deterministic given ``generator``.

        ``sampler="consistency"`` uses x0-prediction + re-noising instead of the flow-map trajectory.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if sampler not in ("flowmap", "consistency"):
            raise ValueError(f"sampler must be 'flowmap' or 'consistency', got {sampler!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device, dtype = self._execution_device, self.transformer.dtype
        context = prompt_embeds.to(device, dtype) if prompt_embeds is not None else self.encode_prompt(prompts)
        uncond = self.encode_prompt([UNCONDITIONAL_PROMPT]) if guidance_scale != 1.0 else None
        if latents is None:
            shape = self.latent_shape(context.shape[0], num_frames, height, width)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = latents.to(device=device, dtype=dtype)
        shift = self.config.shift
        if sampler == "flowmap":
            out = sample(self.transformer, noise, context, num_inference_steps, shift, guidance_scale, uncond, progress)
        else:
            out = consistency_sample(self.transformer, noise, context, num_inference_steps, shift, generator,
                                     guidance_scale, uncond)
        if output_type == "latent":
            frames = out
        else:
            video = self.decode(out)  # (B, 3, F, H, W)
            frames = video.permute(0, 2, 3, 4, 1)
            frames = frames.cpu().numpy() if output_type == "np" else frames
        if not return_dict:
            return (frames,)
        return AnyFlowPipelineOutput(frames=frames)


def save_as_pipeline(transformer: torch.nn.Module, base: str, out: str) -> str:
    """Save ``transformer`` as an AnyFlowPipeline folder with the base folder's text encoder and tokenizer."""
    from anyflow_ray.models.loading import load_text_encoder, text_max_length

    tokenizer, encoder = load_text_encoder(base)
    pipe = AnyFlowPipeline(transformer=transformer, text_encoder=encoder, tokenizer=tokenizer,
                           text_max_length=text_max_length(base))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def pipeline_files(folder: str | Path) -> list[str]:
    """What ``save_pretrained`` wrote into ``folder``: model_index.json and one sub-folder per component."""
    import json

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return ["model_index.json", *sorted(k for k in index if not k.startswith("_") and (Path(folder) / k).is_dir())]
