"""`anyflow-ray make-tiny [OUT]`: write a complete tiny model folder in the diffusers layout (with a tiny
random Wan VAE when ``model.pixel_space=false``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.models.architectures import count_parameters
from anyflow_ray.models.loading import load_transformer, make_tiny

TINY_LATENT_CHANNELS = 4  # model.pixel_space=false: a tiny random Wan VAE with 4 latent channels (Wan's: 16)


def run(cfg: DictConfig, out: str | None = None) -> Path:
    target = Path(out or cfg.model.base)
    prepare(cfg, target.parent / "make-tiny")
    pixel_space = bool(cfg.model.pixel_space)
    channels = 3 if pixel_space else TINY_LATENT_CHANNELS
    make_tiny(target, cfg.model.tiny, channels=channels, seed=cfg.run.seed, pixel_space=pixel_space,
              sample_size=(cfg.data.frames, cfg.data.height, cfg.data.width))
    params = count_parameters(load_transformer(target))
    log.info("wrote tiny model (%d transformer parameters) to %s", params, target)
    return target
