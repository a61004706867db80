"""The stages of `anyflow-ray prepare` (``jobs/prepare.py`` runs them): decode tasks, the VAE and text-encoder
actor pools and their sizes, and the c_null task.

Memory per decode task: one work item (a clip file or one tar member) at a time, decoded by ffmpeg to
exactly ``data.frames x data.height x data.width`` uint8 (``data/clip_decode.py``); the task yields each
clip as it is decoded (a generator: Ray Data cuts its output into blocks as they fill), so a task holds
about one decoded clip and one output block, whatever the number of clips in its block of work items.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
from omegaconf import DictConfig

from anyflow_ray.data.video import ClipError, ClipSize, decode_clip, iter_clips, stable_seed

log = logging.getLogger("anyflow_ray")
# A bf16 VAE is used when its latents of an actor's first batch are within this relative RMS error of
# the fp32 VAE's (||z_bf16 - z_fp32|| / ||z_fp32||); above it the actor stays in fp32 and says so. Measured
# on the tiny random VAE (CPU): see tests/data/test_prepare_memory.py::test_bf16_vae_*.
BF16_VAE_TOLERANCE = 0.01
GPUS_PER_TEXT_ACTOR = 32  # `auto`: one text-encoder actor per this many cluster GPUs (UMT5 is far faster than the VAE)


def skip_record(error: ClipError) -> dict:
    return {"key": error.key, "source": error.source, "reason": error.reason}


def decode_rows(item: dict, size: ClipSize, report: Callable[[list[dict]], None]) -> Iterator[dict]:
    """The decoded clip(s) of one work item, one at a time; the ones that cannot be used go to ``report``."""
    for clip in iter_clips(item):
        try:
            if isinstance(clip, ClipError):
                raise clip
            pixels, source_fps = decode_clip(clip, size)
        except ClipError as error:
            report([skip_record(error)])
            continue
        yield {"key": clip.key, "source": clip.source, "caption": clip.caption, "pixels": pixels,
               "source_fps": source_fps}


def decode_task(item: dict, size: ClipSize, skip_log) -> Iterator[dict]:
    """Ray Data flat_map: ``decode_rows`` with the skips sent to the SkipLog actor."""
    import ray

    yield from decode_rows(item, size, lambda records: ray.get(skip_log.add.remote(records)))


def index_task(path: str) -> list:
    """Ray task: a tar shard's clips as work items (``data.video.index_tar``; errors as skip records)."""
    from anyflow_ray.data.video import index_tar

    return [skip_record(entry) if isinstance(entry, ClipError) else entry for entry in index_tar(path)]


def pool_sizes(cfg: DictConfig, cluster_gpus: float) -> tuple[int, int]:
    """(VAE actors, text-encoder actors): the config's numbers, or for ``auto`` sized from the cluster's GPUs:
    one text-encoder actor per ``GPUS_PER_TEXT_ACTOR`` GPUs (at least one), and the VAE (the slow stage)
    on every GPU left, ``prepare.vae_gpus`` each; one of each on a cluster without GPUs."""
    pc = cfg.prepare
    if str(pc.text_concurrency) != "auto":
        text = int(pc.text_concurrency)
    else:
        text = max(1, int(cluster_gpus // GPUS_PER_TEXT_ACTOR)) if pc.text_gpus > 0 else 1
    if str(pc.vae_concurrency) != "auto":
        vae = int(pc.vae_concurrency)
    elif pc.vae_gpus > 0 and cluster_gpus > 0:
        vae = max(1, int((cluster_gpus - text * pc.text_gpus) // pc.vae_gpus))
    else:
        vae = 1
    return vae, text


def _actor_device(cfg: DictConfig):
    """This actor's device, from the GPUs Ray gave it (never the driver's hardware)."""
    import ray

    from anyflow_ray.run.device import resolve_device, set_threads

    set_threads(cfg.run.threads)
    return resolve_device(cfg.run.device, len(ray.get_gpu_ids()))


def relative_error(approx, exact) -> float:
    """||approx - exact|| / ||exact|| (float64)."""
    exact, approx = exact.double(), approx.double()
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


class VaeStage:
    """Actor: uint8 pixels (B, 3, F, H, W) -> normalised posterior-mean latents (B, C, F', H', W').

    ``prepare.vae_dtype``: fp32; bf16 (its first batch is encoded in fp32 too and the bf16 VAE kept only
    within ``BF16_VAE_TOLERANCE``); auto: bf16 on a GPU, fp32 on the CPU."""

    def __init__(self, cfg: DictConfig):
        import torch

        from anyflow_ray.data.encode import latent_shape, load_vae

        device = _actor_device(cfg)
        wanted = cfg.prepare.vae_dtype
        self.bf16 = wanted == "bf16" or wanted == "auto" and device.type == "cuda"
        self.vae = load_vae(cfg.model.base).to(device)
        self.vae_bf16 = load_vae(cfg.model.base, dtype=torch.bfloat16).to(device) if self.bf16 else None
        self.checked = not self.bf16
        self.shape = latent_shape(self.vae, cfg.data.frames, cfg.data.height, cfg.data.width)

    def __call__(self, batch: dict) -> dict:
        from anyflow_ray.data.encode import encode_video
        from anyflow_ray.data.video import to_model_range

        pixels = to_model_range(np.stack(batch.pop("pixels")))
        if not self.checked:  # the first batch: bf16 against fp32
            exact, approx = encode_video(self.vae, pixels), encode_video(self.vae_bf16, pixels)
            error = relative_error(approx, exact)
            self.checked = True
            if error <= BF16_VAE_TOLERANCE:
                log.info("prepare: bf16 VAE within %.2e of fp32 (tolerance %g): using it", error, BF16_VAE_TOLERANCE)
                self.vae, self.vae_bf16 = self.vae_bf16, None
            else:
                log.warning("prepare: bf16 VAE latents are %.2e from fp32's (> %g): staying in fp32", error,
                            BF16_VAE_TOLERANCE)
                self.vae_bf16 = None
            latents = exact
        else:
            latents = encode_video(self.vae, pixels)
        return {**batch, "latents": latents.cpu().numpy()}


class TextStage:
    """Actor: captions -> UMT5 embeddings (as the Wan pipeline encodes them); emits shard rows."""

    def __init__(self, cfg: DictConfig):
        from anyflow_ray.models.loading import load_text_encoder, text_max_length
        from anyflow_ray.run.device import resolve_dtype

        device = _actor_device(cfg)
        self.tokenizer, encoder = load_text_encoder(cfg.model.base, resolve_dtype(cfg.run.precision, device))
        self.encoder = encoder.to(device)
        self.max_length = text_max_length(cfg.model.base)
        self.size = ClipSize(cfg.data.frames, cfg.data.fps, cfg.data.height, cfg.data.width)
        self.format = int(cfg.data.shard_format)

    def __call__(self, batch: dict):
        from anyflow_ray.data.shard_writer import prepared_table
        from anyflow_ray.models.text import encode_prompts

        prompts = [str(c) for c in batch["caption"]]
        embeddings = encode_prompts(self.tokenizer, self.encoder, prompts, self.max_length).numpy()
        keys = [str(k) for k in batch["key"]]
        return prepared_table(np.stack(batch["latents"]), embeddings, prompts, keys, [str(s) for s in batch["source"]],
                              [stable_seed(k) for k in keys], self.size.frames, self.size.fps, self.size.height,
                              self.size.width, format_version=self.format)


def encode_c_null(cfg: DictConfig) -> tuple[np.ndarray, str, int, str]:
    """Ray task (on a text-encoder GPU): (c_null (1, L, D), prompt, L, encoder fingerprint) of
    ``model.negative_prompt``, encoded as TextStage encodes captions."""
    from anyflow_ray.data.uncond import encoder_fingerprint
    from anyflow_ray.models.loading import load_text_encoder, text_max_length
    from anyflow_ray.models.text import encode_prompts
    from anyflow_ray.run.device import resolve_dtype

    device = _actor_device(cfg)
    tokenizer, encoder = load_text_encoder(cfg.model.base, resolve_dtype(cfg.run.precision, device))
    prompt, max_length = str(cfg.model.negative_prompt), text_max_length(cfg.model.base)
    embedding = encode_prompts(tokenizer, encoder.to(device), [prompt], max_length).numpy()
    return embedding, prompt, max_length, encoder_fingerprint(cfg.model.base)


class SkipLog:
    """A Ray actor collecting the skip records of the decode tasks (any node; no shared disk needed)."""

    def __init__(self):
        self._records: list[dict] = []

    def add(self, records: list[dict]) -> None:
        self._records.extend(records)

    def records(self) -> list[dict]:
        return list(self._records)
