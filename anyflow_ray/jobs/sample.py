"""`anyflow-ray sample`: for each prompt and step count, a GIF (and MP4 where ffmpeg is present), plus one
contact-sheet PNG with every step count side by side."""

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


def run(cfg: DictConfig, model_dir: str | None = None, out_dir: str | None = None) -> Path:
    """Sample ``model_dir`` (default ``sample.model``, else the teacher) into ``out_dir`` (``sample.output``)."""
    sc = cfg.sample
    out, device, dtype = prepare(cfg, out_dir or sc.output)
    model_dir = model_dir or sc.model or cfg.teacher.output
    pipe = AnyFlowPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    guidance = sc.guidance_scale if not is_flow_map(pipe.transformer) else 1.0
    prompts = list(sc.prompts)
    videos: dict[tuple[str, int], np.ndarray] = {}
    for n in tqdm(list(sc.steps), desc="sampling step counts"):
        frames = pipe(prompts, num_inference_steps=int(n), guidance_scale=guidance, num_frames=cfg.data.frames,
                      height=cfg.data.height, width=cfg.data.width,
                      generator=torch.Generator().manual_seed(sc.seed)).frames
        for prompt, clip in zip(prompts, frames):
            videos[(prompt, int(n))] = clip
            save_video(clip, out / f"{_slug(prompt)}_{int(n)}steps")
    sheet = write_contact_sheet(videos, prompts, [int(n) for n in sc.steps], out / "contact_sheet.png",
                                title=f"{Path(model_dir).name} (guidance {guidance})")
    log.info("wrote %d clips and %s", len(videos), sheet)
    return out


def _slug(prompt: str) -> str:
    return "_".join(prompt.lower().split())
