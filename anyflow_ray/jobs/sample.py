"""`anyflow-ray sample`: for each model, prompt and step count a GIF (and MP4 where ffmpeg is present), plus
one contact-sheet PNG per model with every step count side by side.

The models are ``sample.models`` (default: the final student, ``distill.output``; ``sample.model`` names a
single one instead); each is written to ``<sample.output>/<folder name>/``, e.g. ``samples/stage2/``.
``demo`` samples the teacher, Stage 1 and Stage 2 through the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from anyflow_ray.evaluate import is_flow_map
from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.pipeline import AnyFlowPipeline
from anyflow_ray.visualize import save_video, write_contact_sheet


def models_to_sample(cfg: DictConfig) -> list[str]:
    """``sample.model`` when set (the one-model form), else ``sample.models``."""
    sc = cfg.sample
    models = [sc.model] if sc.get("model") else [str(m) for m in sc.models]
    if not models:
        raise ValueError("sample.models is empty: name at least one pipeline folder, e.g. sample.models=[${distill.output}]")
    return models


def run(cfg: DictConfig, models: list[str] | None = None) -> list[Path]:
    """Sample each of ``models`` (default :func:`models_to_sample`) into ``<sample.output>/<folder name>/``."""
    models = models or models_to_sample(cfg)
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"sample.models {models}: two folders share a name, and each is written to "
                         f"{cfg.sample.output}/<folder name>/")
    return [sample_model(cfg, model_dir, Path(cfg.sample.output) / name) for model_dir, name in zip(models, names)]


def sample_model(cfg: DictConfig, model_dir: str, out_dir: str | Path) -> Path:
    """Every prompt x step count of ``model_dir``: clips and ``contact_sheet.png`` in ``out_dir``."""
    sc = cfg.sample
    out, device, dtype = prepare(cfg, str(out_dir))
    pipe = AnyFlowPipeline.from_pretrained(model_dir, dtype=dtype).to(device)
    guidance = sc.guidance_scale if not is_flow_map(pipe.transformer) else 1.0
    prompts = list(sc.prompts)
    videos: dict[tuple[str, int], np.ndarray] = {}
    for n in tqdm(list(sc.steps), desc=f"sampling {Path(model_dir).name}"):
        frames = pipe(prompts, num_inference_steps=int(n), guidance_scale=guidance, num_frames=cfg.data.frames,
                      height=cfg.data.height, width=cfg.data.width, negative_prompt=cfg.model.negative_prompt,
                      generator=torch.Generator().manual_seed(sc.seed)).frames
        for prompt, clip in zip(prompts, frames):
            videos[(prompt, int(n))] = clip
            save_video(clip, out / f"{_slug(prompt)}_{int(n)}steps")
    sheet = write_contact_sheet(videos, prompts, [int(n) for n in sc.steps], out / "contact_sheet.png",
                                title=f"{Path(model_dir).name} (guidance {guidance})")
    log.info("%s: wrote %d clips and %s", model_dir, len(videos), sheet)
    return out


def _slug(prompt: str) -> str:
    return "_".join(prompt.lower().split())
