"""Starting or joining Ray: a job joins the cluster it is given (RAY_ADDRESS), else starts a local one."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from anyflow_ray.jobs.common import log


def init_ray(cfg: DictConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` picks the
    ``ray start`` cluster of this machine), else start a private local instance. A local instance never
    attaches to another process's cluster, nor to a stale address file left by one that died."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": os.environ.get("WANDB_MODE", cfg.run.wandb_mode)}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        log.info("joined the Ray cluster at %s", address)
        return
    ray.init(address="local", runtime_env=env, include_dashboard=False, num_cpus=max(2, os.cpu_count() or 2))
    log.info("started a local Ray instance (set RAY_ADDRESS to use a running cluster)")
