"""`anyflow-ray teacher`: train the single-time flow-matching teacher from scratch (ALGORITHM §3).

Runs on the learner group (Ray actors, DeepSpeed ranks) like every training job: the transformer
of ``model.base`` trained on the train shards; the EMA weights are saved as an ``AnyFlowPipeline`` in
``teacher.output``, with checkpoints, metrics JSONL and a wandb run (offline by default).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from anyflow_ray.jobs.common import prepare
from anyflow_ray.jobs.train_loop import train_with_learners


def run(cfg: DictConfig) -> Path:
    tc = cfg.teacher
    out, _, _ = prepare(cfg, tc.output)
    return train_with_learners(cfg, "teacher", out, tc.steps, tc.save_every, tc.log_every, resume=True)
