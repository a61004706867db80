"""``AnyFlowRayPipeline``: a diffusers ``DiffusionPipeline`` sampling a flow map (or a teacher) in N steps.

    pipe = AnyFlowRayPipeline.from_pretrained("outputs/tiny/teacher")
    frames = pipe("a red circle moving left", num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0)).frames   # (B, F, H, W, 3) in [0, 1]

With a ``WanFlowMapTransformer3DModel`` each step is one flow-map jump; with a plain
``WanTransformer3DModel`` (a teacher) it is an Euler step; a ``WanCausalFlowMapTransformer3DModel`` samples
chunk by chunk, also from an image or a leading clip and past its training length (below).
Latent models decode with the Wan VAE (``AutoencoderKLWan``); pixel-space models (the tiny default,
``vae=None``) use the identity.

**With a causal transformer** (docs/method.md §6) one causal checkpoint serves three tasks: text-to-video, image-to-video (the image's latent frame is
fixed) and video-to-video continuation (the clip's latent frames are fixed). The image or clip is
resized to the call's size; pixel-space models take it as their latents, latent models encode it with
the Wan VAE. Chunks are decoded as they are finished and handed to ``callback_on_chunk_end``, so a
caller can write the video while it is made, also past the training length.

It is named apart from diffusers' own ``AnyFlowPipeline``, which the project's latent exports are
(``formats``): ``from_pretrained`` reads those, diffusers' and NVIDIA's AnyFlow folders, Wan2.1 and the
project's own folders, component by component (``formats.open_folder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from anyflow_ray.models.causal import is_causal
from anyflow_ray.models.text import UNCONDITIONAL_PROMPT, encode_prompts
from anyflow_ray.sampling.samplers import causal_sample, consistency_sample, sample

WAN_SAMPLE_SIZE = (81, 480, 832)  # (frames, height, width): WanPipeline's defaults, for models that store none
OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class AnyFlowRayPipelineOutput(BaseOutput):
    # "np": (B, F, H, W, 3) float32 in [0, 1]; "pt": (B, F, 3, H, W) in [0, 1]; "pil": B lists of F images;
    # "latent": the raw latents (B, C, F', H', W'), as diffusers' WanPipeline returns them
    frames: np.ndarray | torch.Tensor | list


class AnyFlowRayPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "scheduler"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, transformer, text_encoder, tokenizer, scheduler=None, vae=None,
                 text_max_length: int = 512, shift: float = 5.0, negative_prompt: str = UNCONDITIONAL_PROMPT,
                 sample_size: list[int] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vae=vae)
        # c_null of the run that trained the model, so sampling with CFG uses the same unconditional branch;
        # sample_size: (frames, height, width) of the videos the model was trained on, the call's defaults
        self.register_to_config(text_max_length=text_max_length, shift=shift, negative_prompt=negative_prompt,
                                sample_size=list(sample_size) if sample_size else None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype: torch.dtype = torch.float32, **kwargs):
        """A local pipeline folder of any kind ``formats.open_folder`` reads, its components in ``dtype``
        (the VAE in fp32). Nothing is downloaded; other ``from_pretrained`` options are refused."""
        from anyflow_ray.formats import open_folder

        dtype = kwargs.pop("torch_dtype", dtype)
        kwargs.pop("local_files_only", None)
        if kwargs:
            raise TypeError(f"AnyFlowRayPipeline.from_pretrained takes a local folder and dtype, not {sorted(kwargs)}")
        return open_folder(pretrained_model_name_or_path, dtype)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def temporal_factor(self) -> int:
        return self.vae.config.scale_factor_temporal if self.vae is not None else 1

    @property
    def spatial_factor(self) -> int:
        return self.vae.config.scale_factor_spatial if self.vae is not None else 1

    @property
    def default_sample_size(self) -> tuple[int, int, int]:
        """(frames, height, width) of a call that gives none: the model's own, else (a Wan VAE pipeline) Wan's
        81 x 480 x 832. A pixel-space pipeline without a stored size has no sensible default: refused."""
        stored = self.config.get("sample_size")
        if stored:
            return tuple(int(v) for v in stored)
        if self.vae is None:
            raise ValueError("this pipeline stores no sample_size (its model folder was written without one): "
                             "pass num_frames, height and width")
        return WAN_SAMPLE_SIZE

    @property
    def num_timesteps(self) -> int:
        """Steps of the current (or last) call, as diffusers callbacks read it."""
        return getattr(self, "_num_timesteps", 0)

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

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                     callback_on_step_end_tensor_inputs, output_type: str) -> None:
        """The argument errors diffusers' WanPipeline raises, plus the embedding width and output type."""
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                             f"got {unknown}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`: pass only one of the two")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`; both are undefined")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`: pass only one")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"`{name}` has to be of type `str` or `list` but is {type(value)}")
        width = self.transformer.config.text_dim
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.ndim != 3 or embeds.shape[-1] != width):
                raise ValueError(f"`{name}` of shape {tuple(embeds.shape)} is {embeds.shape[-1]} wide, but the "
                                 f"transformer reads text embeddings {width} wide (B, L, {width})")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")

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

    @staticmethod
    def postprocess(video: torch.Tensor, output_type: str):
        """(B, 3, F, H, W) in [0, 1] -> ``output_type``, with the shapes diffusers' VideoProcessor gives."""
        frames = video.permute(0, 2, 1, 3, 4).float().cpu()  # (B, F, 3, H, W)
        if output_type == "pt":
            return frames
        arrays = frames.permute(0, 1, 3, 4, 2).numpy()  # (B, F, H, W, 3)
        if output_type == "np":
            return arrays
        return [VaeImageProcessor.numpy_to_pil(clip) for clip in arrays]

    # -- call ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 4,
                 guidance_scale: float = 1.0, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, sampler: str = "flowmap", output_type: str = "np",
                 prompt_embeds: torch.Tensor | None = None, progress: bool = False, return_dict: bool = True,
                 negative_prompt: str | list[str] | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 num_videos_per_prompt: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), image=None, video=None,
                 cache_chunks: int = 0, callback_on_chunk_end=None):
        """Sample videos in ``num_inference_steps`` steps (any N >= 1); deterministic given ``generator``.

        As diffusers' WanPipeline: ``prompt`` or ``prompt_embeds`` (not both); ``negative_prompt`` (default:
        the one the model was trained with) or ``negative_prompt_embeds``, used when ``guidance_scale > 1``;
        ``num_frames``/``height``/``width`` default to the model's own size (``config.sample_size``, else
        81 x 480 x 832); ``num_videos_per_prompt`` videos per prompt, a prompt's videos next to each other;
        ``output_type`` in np / pt / pil / latent; ``callback_on_step_end(pipe, i, t, kwargs) -> dict`` after
        every step, with ``kwargs`` holding ``callback_on_step_end_tensor_inputs``; the latents and embeddings
        it returns replace the current ones.
        ``sampler="consistency"`` uses x0-prediction + re-noising instead of the flow-map trajectory.

        A causal transformer (docs/method.md §6) samples chunk by chunk, N steps per chunk, for any
        ``num_frames`` (past the training length the chunks stream on a KV cache of ``cache_chunks`` chunks,
        0: all); ``image`` (image-to-video) or ``video`` (continuation) fixes the leading frames (see
        ``media_to_pixels`` for the accepted forms); ``callback_on_chunk_end(pipe, j, frames)``
        gets each chunk's new frames, (B, f, H, W, 3) in [0, 1], as it is finished.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, output_type)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        causal = is_causal(self.transformer)
        if not causal and (image is not None or video is not None or callback_on_chunk_end is not None):
            raise ValueError("image=, video= and callback_on_chunk_end need a causal transformer "
                             "(WanCausalFlowMapTransformer3DModel)")
        if causal and (sampler != "flowmap" or callback_on_step_end is not None):
            raise ValueError("a causal transformer samples with sampler='flowmap' and callback_on_chunk_end, "
                             "not callback_on_step_end")
        if sampler not in ("flowmap", "consistency"):
            raise ValueError(f"sampler must be 'flowmap' or 'consistency', got {sampler!r}")
        if not (num_frames and height and width):
            default_frames, default_height, default_width = self.default_sample_size
            num_frames, height, width = num_frames or default_frames, height or default_height, width or default_width
        device, dtype = self._execution_device, self.transformer.dtype

        # text: (B * num_videos_per_prompt, L, D), the videos of one prompt next to each other
        prompts = [prompt] if isinstance(prompt, str) else prompt
        context = prompt_embeds.to(device, dtype) if prompt_embeds is not None else self.encode_prompt(prompts)
        batch = context.shape[0]
        context = context.repeat_interleave(num_videos_per_prompt, dim=0)
        uncond = None
        if guidance_scale > 1.0:
            uncond = self._negative_embeds(negative_prompt, negative_prompt_embeds, batch)
            uncond = uncond.to(device, dtype).repeat_interleave(num_videos_per_prompt, dim=0) \
                if uncond.shape[0] > 1 else uncond.to(device, dtype)

        if latents is None:
            shape = self.latent_shape(batch * num_videos_per_prompt, num_frames, height, width)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = latents.to(device=device, dtype=dtype)
        on_step = None
        if callback_on_step_end is not None:
            on_step = self._step_hook(callback_on_step_end, list(callback_on_step_end_tensor_inputs))
        self._num_timesteps = num_inference_steps
        shift = self.config.shift
        if causal:
            fixed = conditioning_latents(self, image, video, noise.shape[0], height, width)
            out = causal_call(self, noise, context, num_inference_steps, guidance_scale, uncond, fixed, cache_chunks,
                              callback_on_chunk_end, progress)
        elif sampler == "flowmap":
            out = sample(self.transformer, noise, context, num_inference_steps, shift, guidance_scale, uncond,
                         progress, on_step=on_step)
        else:
            out = consistency_sample(self.transformer, noise, context, num_inference_steps, shift, generator,
                                     guidance_scale, uncond, on_step=on_step)
        frames = out if output_type == "latent" else self.postprocess(self.decode(out), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return AnyFlowRayPipelineOutput(frames=frames)

    def _negative_embeds(self, negative_prompt, negative_prompt_embeds, batch: int) -> torch.Tensor:
        """c_null: (1, L, D) for one negative prompt (broadcast over the batch) or (B, L, D) for a list of B."""
        if negative_prompt_embeds is not None:
            return negative_prompt_embeds
        if negative_prompt is None:
            negative_prompt = self.config.get("negative_prompt", UNCONDITIONAL_PROMPT)
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} prompts but `prompt` has {batch}")
        return self.encode_prompt([negative_prompt] if isinstance(negative_prompt, str) else negative_prompt)

    def _step_hook(self, callback, names: list[str]):
        """Adapt a diffusers ``callback_on_step_end`` to the samplers' per-step hook."""

        def on_step(i, t, z, context, uncond):
            current = {"latents": z, "prompt_embeds": context, "negative_prompt_embeds": uncond}
            returned = callback(self, i, t, {k: current[k] for k in names}) or {}
            return (returned.get("latents", z), returned.get("prompt_embeds", context),
                    returned.get("negative_prompt_embeds", uncond))

        return on_step


def save_as_pipeline(transformer: torch.nn.Module, base: str, out: str, negative_prompt: str = UNCONDITIONAL_PROMPT,
                     shift: float = 5.0) -> str:
    """Save ``transformer`` as a pipeline folder with the base folder's text encoder, tokenizer and VAE
    (when it has one), the run's negative prompt (the c_null sampling with CFG uses by default) and the
    base's video size (a tiny model's ``anyflow.json``; none for Wan, whose pipelines default to 81x480x832):
    diffusers' ``AnyFlowPipeline`` / ``WanPipeline`` for latent models, this class otherwise (``formats``)."""
    from anyflow_ray.formats import write_folder

    return str(write_folder(transformer, base, out, negative_prompt, shift))


def pipeline_files(folder: str | Path) -> list[str]:
    """What ``save_pretrained`` wrote into ``folder``: model_index.json and one sub-folder per component."""
    import json

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return ["model_index.json", *sorted(k for k in index if not k.startswith("_") and (Path(folder) / k).is_dir())]


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
