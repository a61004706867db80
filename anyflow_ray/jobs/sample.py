"""`anyflow-ray sample`: for each model, prompt and step count a GIF (and MP4 where ffmpeg is present), plus
one contact-sheet PNG per model with every step count side by side.

The models are ``sample.models`` (default: the final student, ``distill.output``; ``sample.model`` names a
single one instead); each is written to ``<sample.output>/<folder name>/``, e.g. ``samples/stage2/``.
``demo`` samples the teacher, Stage 1 and Stage 2 through the same code.

Causal students (docs/method.md §6) make ``sample.max_chunks`` chunks (0: the training length; more
streams past it on a KV cache of ``model.causal.cache_chunks`` chunks), each MP4 written chunk by chunk
as the chunks are finished, and take ``--image PATH`` (image-to-video) or ``--video PATH`` (continuation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from anyflow_ray.run.config import ConfigError
from anyflow_ray.evaluation.quality import is_flow_map
from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.models.causal import is_causal
from anyflow_ray.pipeline import AnyFlowRayPipeline
from anyflow_ray.training.export import open_pipeline
from anyflow_ray.pipeline import pixel_frames
from anyflow_ray.evaluation.plots import save_video, to_uint8, write_contact_sheet

FPS, SCALE = 4, 8  # as visualize.save_video writes them


def models_to_sample(cfg: DictConfig) -> list[str]:
    """``sample.model`` when set (the one-model form), else ``sample.models``."""
    sc = cfg.sample
    models = [sc.model] if sc.get("model") else [str(m) for m in sc.models]
    if not models:
        raise ValueError("sample.models is empty: name at least one pipeline folder, e.g. sample.models=[${distill.output}]")
    return models


def run(cfg: DictConfig, models: list[str] | None = None, image: str | None = None,
        video: str | None = None) -> list[Path]:
    """Sample each of ``models`` (default :func:`models_to_sample`) into ``<sample.output>/<folder name>/``;
    ``image`` / ``video``: a .png/.jpg or .mp4 file conditioning causal models."""
    conditioning = {"image": read_image(image) if image else None, "video": read_video(video) if video else None}
    models = models or models_to_sample(cfg)
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"sample.models {models}: two folders share a name, and each is written to "
                         f"{cfg.sample.output}/<folder name>/")
    return [sample_model(cfg, model_dir, Path(cfg.sample.output) / name, **conditioning)
            for model_dir, name in zip(models, names)]


def sample_model(cfg: DictConfig, model_dir: str, out_dir: str | Path, image: np.ndarray | None = None,
                 video: np.ndarray | None = None) -> Path:
    """Every prompt x step count of ``model_dir``: clips and ``contact_sheet.png`` in ``out_dir``."""
    sc = cfg.sample
    out, device, dtype = prepare(cfg, str(out_dir))
    pipe = open_pipeline(model_dir, dtype).to(device)  # an exported folder or a checkpoint
    guidance = sc.guidance_scale if not is_flow_map(pipe.transformer) else 1.0
    causal = is_causal(pipe.transformer)
    if not causal and (image is not None or video is not None):
        raise ConfigError(f"--image/--video condition causal models only; {model_dir} holds a bidirectional one")
    num_frames = causal_num_frames(pipe, cfg) if causal else cfg.data.frames
    prompts = list(sc.prompts)
    videos: dict[tuple[str, int], np.ndarray] = {}
    for n in tqdm(list(sc.steps), desc=f"sampling {Path(model_dir).name}"):
        stems = [out / f"{_slug(prompt)}_{int(n)}steps" for prompt in prompts]
        extra, writer = {}, None
        if causal:
            writer = ChunkWriter(stems)
            leading = None if video is None else video[:fitting_frames(pipe, len(video), num_frames)]
            extra = dict(image=image, video=leading, cache_chunks=cfg.model.causal.cache_chunks,
                         callback_on_chunk_end=writer)
        try:
            frames = pipe(prompts, num_inference_steps=int(n), guidance_scale=guidance, num_frames=num_frames,
                          height=cfg.data.height, width=cfg.data.width, negative_prompt=cfg.model.negative_prompt,
                          generator=torch.Generator().manual_seed(sc.seed), **extra).frames
        finally:
            if writer is not None:
                writer.close()
        for prompt, clip, stem in zip(prompts, frames, stems):
            videos[(prompt, int(n))] = clip
            if writer is not None and writer.streamed:  # the MP4 is written; the GIF needs the whole clip
                import imageio.v2 as imageio

                imageio.mimsave(stem.with_suffix(".gif"), list(to_uint8(clip, SCALE)), duration=1000 / FPS, loop=0)
            else:
                save_video(clip, stem)
    sheet = write_contact_sheet(videos, prompts, [int(n) for n in sc.steps], out / "contact_sheet.png",
                                title=f"{Path(model_dir).name} (guidance {guidance})")
    log.info("%s: wrote %d clips and %s", model_dir, len(videos), sheet)
    return out


def causal_num_frames(pipe: AnyFlowRayPipeline, cfg: DictConfig) -> int:
    """Video frames of ``sample.max_chunks`` chunks (0: ``data.frames``, the training length)."""
    chunks = int(cfg.sample.max_chunks)
    if chunks <= 0:
        return int(cfg.data.frames)
    sizes = pipe.transformer.config.causal_chunks
    latent_frames = pipe.transformer.chunk_bounds(sum(sizes) + chunks * sizes[-1])[chunks - 1][1]
    return pixel_frames(pipe, latent_frames)


def fitting_frames(pipe: AnyFlowRayPipeline, available: int, num_frames: int) -> int:
    """Leading frames of a conditioning clip to keep: fewer than the output's, 1 + 4k for the Wan VAE."""
    keep = min(available, num_frames - 1)
    ft = pipe.temporal_factor
    return keep if ft == 1 else 1 + (keep - 1) // ft * ft


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 of a .png/.jpg file."""
    import imageio.v3 as iio

    _require_file(path, "--image")
    return np.asarray(iio.imread(path))


def read_video(path: str) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of an .mp4 (or any clip imageio's ffmpeg plugin reads)."""
    import imageio.v2 as imageio

    _require_file(path, "--video")
    with imageio.get_reader(path) as reader:
        return np.stack([np.asarray(frame)[..., :3] for frame in reader])


def _require_file(path: str, flag: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{flag} {path}: no such file")


class ChunkWriter:
    """One MP4 per prompt, appended as the causal pipeline finishes each chunk (``callback_on_chunk_end``).
    Without imageio's ffmpeg plugin nothing is streamed (``streamed`` is False) and the clip is written whole."""

    def __init__(self, stems: list[Path]):
        self.stems, self.writers, self.streamed = stems, [], False
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401

            self.writers = [imageio.get_writer(stem.with_suffix(".mp4"), fps=FPS, macro_block_size=1)
                            for stem in stems]
            self.streamed = True
        except (ImportError, RuntimeError, OSError):
            self.close()
            self.writers = []

    def __call__(self, pipe, j: int, frames: np.ndarray) -> None:
        for writer, clip in zip(self.writers, frames):  # clip (f, H, W, 3) in [0, 1]
            for frame in to_uint8(clip, SCALE):
                h, w = frame.shape[:2]
                writer.append_data(np.pad(frame, ((0, (-h) % 16), (0, (-w) % 16), (0, 0))))  # codecs: multiples of 16

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _slug(prompt: str) -> str:
    return "_".join(prompt.lower().split())
