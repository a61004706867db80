"""Starting or joining Ray: a job joins the cluster it is given (RAY_ADDRESS), else starts a local one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.config import ConfigError
from anyflow_ray.jobs.common import log

# the runtime env that `ray job submit` hands the driver (Ray merges it with ray.init's own)
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_env_vars(environ: dict[str, str]) -> dict[str, str]:
    """The env vars a submitted job's runtime env already sets (empty outside ``ray job submit``)."""
    raw = environ.get(JOB_CONFIG_VAR)
    if not raw:
        return {}
    runtime_env = (json.loads(raw).get("runtime_env") or {})
    return dict(runtime_env.get("env_vars") or {})


def driver_runtime_env(cfg: DictConfig, environ: dict[str, str]) -> dict:
    """What the driver adds to the job's runtime env: only the env vars the job does not set itself.

    Ray refuses to start a driver whose ``ray.init`` runtime env sets a key the submitted job's env
    also sets, so a ``--runtime-env`` that names ``WANDB_MODE`` must win without a clash.
    """
    wanted = {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": environ.get("WANDB_MODE", cfg.run.wandb_mode)}
    taken = job_env_vars(environ)
    env_vars = {k: v for k, v in wanted.items() if k not in taken}
    return {"env_vars": env_vars} if env_vars else {}


# every input and output folder a job's actors open: on a cluster they must name the same place on every node
PATH_KEYS = ("run.output_dir", "model.base", "data.root", "teacher.output", "pretrain.output", "pretrain.init",
             "distill.output", "distill.init", "distill.teacher")


def shared_paths(cfg: DictConfig, environ: dict[str, str], num_nodes: int, cwd: Path) -> DictConfig:
    """The config with folders every node resolves alike, or a ConfigError naming the key.

    A relative path means the driver's folder to the driver and each actor's own working dir to the
    actor. On one node it is made absolute (the same disk). In a submitted job it would land in Ray's
    temporary copy of the working dir, and on several nodes on a disk the others do not see: refused.
    """
    if cfg.run.storage:  # a staging mirror: each process resolves it in its own folder, storage maps it alike
        return cfg
    relative = {key: OmegaConf.select(cfg, key) for key in PATH_KEYS}
    relative = {k: v for k, v in relative.items() if v and "://" not in v and not Path(v).is_absolute()}
    if not relative:
        return cfg
    key, value = next(iter(relative.items()))
    if JOB_CONFIG_VAR in environ or num_nodes > 1:
        where = "a submitted job" if JOB_CONFIG_VAR in environ else f"a cluster of {num_nodes} nodes"
        raise ConfigError(f"{key}={value!r} is a relative path; in {where} every node would resolve it in its own "
                          f"working dir. Give an absolute path on storage all nodes mount (e.g. "
                          f"run.output_dir=/mnt/shared/anyflow/run1), as every key of {sorted(relative)} needs")
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key, value in relative.items():
        section, name = key.split(".")
        plain[section][name] = str((cwd / value).resolve())
    out = OmegaConf.create(plain)
    OmegaConf.set_readonly(out, True)
    return out


def init_ray(cfg: DictConfig) -> DictConfig:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` picks the
    ``ray start`` cluster of this machine), else start a private local instance. A local instance never
    attaches to another process's cluster, nor to a stale address file left by one that died.

    Returns the config the job's actors should get: its folders made absolute where that is safe
    (``shared_paths``)."""
    import ray

    if not ray.is_initialized():
        env = driver_runtime_env(cfg, dict(os.environ))
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env=env or None)
            log.info("joined the Ray cluster at %s", address)
        else:
            ray.init(address="local", runtime_env=env, include_dashboard=False,
                     num_cpus=max(2, os.cpu_count() or 2))
            log.info("started a local Ray instance (set RAY_ADDRESS to use a running cluster)")
    num_nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return shared_paths(cfg, dict(os.environ), num_nodes, Path.cwd())
