"""Starting or joining Ray: a job joins the cluster it runs on, else starts a local one."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from anyflow_ray.jobs.common import log


def init_ray(cfg: DictConfig) -> None:
    """``ray.init()`` against RAY_ADDRESS / a running cluster when there is one, else a local instance."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": os.environ.get("WANDB_MODE", cfg.run.wandb_mode)}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    try:
        ray.init(address="auto", runtime_env=env)
        log.info("joined the running Ray cluster")
    except ConnectionError:
        ray.init(runtime_env=env, include_dashboard=False, num_cpus=max(2, os.cpu_count() or 2))
        log.info("started a local Ray instance")
