"""`anyflow-ray make-tiny [OUT]`: write a complete tiny model folder in the diffusers layout."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.jobs.common import log, prepare
from anyflow_ray.models.architectures import count_parameters
from anyflow_ray.models.loading import load_transformer, make_tiny


def run(cfg: DictConfig, out: str | None = None) -> Path:
    target = Path(out or cfg.model.base)
    prepare(cfg, target.parent / "make-tiny")
    make_tiny(target, cfg.model.tiny, channels=3, seed=cfg.run.seed)
    params = count_parameters(load_transformer(target))
    log.info("wrote tiny model (%d transformer parameters) to %s", params, target)
    return target
