"""`anyflow-ray demo`: the whole tiny pipeline end to end, skipping stages whose outputs already exist.

make-tiny -> data -> teacher -> Stage 1 -> Stage 2 -> samples -> evaluation, all under ``run.output_dir``;
each folder of ``eval.consistency_models`` is first trained as the consistency baseline (Stage 2 from the
same Stage 1 with the same steps and batch, ``distill.rollout=consistency``; docs/method.md §5).
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.jobs import data, distill, evaluate, make_tiny, pretrain, sample, teacher
from anyflow_ray.jobs.common import log


def run(cfg: DictConfig) -> Path:
    start = time.time()
    stages = [
        ("make-tiny", Path(cfg.model.base) / "transformer" / "config.json", lambda: make_tiny.run(cfg)),
        ("data", Path(cfg.data.root) / "heldout" / "manifest.json", lambda: data.run(cfg)),
        ("teacher", Path(cfg.teacher.output) / "model_index.json", lambda: teacher.run(cfg)),
        ("stage 1", Path(cfg.pretrain.output) / "model_index.json", lambda: pretrain.run(cfg)),
        ("stage 2", Path(cfg.distill.output) / "model_index.json", lambda: distill.run(cfg)),
        *[(f"consistency baseline ({folder})", Path(folder) / "model_index.json",
           lambda folder=folder: distill.run(_consistency_baseline(cfg, folder))) for folder in cfg.eval.consistency_models],
        # `anyflow-ray sample sample.models=[teacher, stage 1, stage 2]`: samples/{teacher,stage1,stage2}/
        ("samples", None, lambda: sample.run(cfg, [cfg.teacher.output, cfg.pretrain.output, cfg.distill.output])),
        ("evaluate", None, lambda: evaluate.run(cfg)),
    ]
    for name, done_marker, stage in stages:
        if done_marker is not None and done_marker.exists():
            log.info("demo: %s already done (%s exists), skipping", name, done_marker)
            continue
        log.info("demo: %s", name)
        stage()
    log.info("demo finished in %.1f min; outputs under %s", (time.time() - start) / 60, cfg.run.output_dir)
    return Path(cfg.run.output_dir)


def _consistency_baseline(cfg: DictConfig, folder: str) -> DictConfig:
    """Stage 2's config with consistency rollouts, written to ``folder``."""
    return OmegaConf.merge(cfg, {"distill": {"rollout": "consistency", "output": str(folder)}})
