"""`anyflow-ray teacher`: train the single-time flow-matching teacher from scratch (docs/method.md §3).

Runs on the learner group (Ray actors, DeepSpeed ranks) like every training job: the transformer
of ``model.base`` trained on the train shards; the EMA weights are saved as a pipeline folder (``formats``: diffusers' ``WanPipeline`` for latent models) in
``teacher.output``, with checkpoints, metrics JSONL and a wandb run (offline by default).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.jobs.train_loop import run_job


def run(cfg: DictConfig) -> Path:
    return run_job(cfg, "teacher")
