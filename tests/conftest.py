"""Shared fixtures: a tiny model folder written by the same code as `anyflow-ray make-tiny`, and a local Ray
instance shared by the tests of a module."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg():
    from anyflow_ray.run.config import load_config

    return load_config(None, ["model.tiny.num_layers=2", "model.tiny.ffn_dim=64"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_cfg):
    from anyflow_ray.models.loading import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "base-model", tiny_cfg.model.tiny, sample_size=(8, 16, 16))


@pytest.fixture(scope="module")
def ray_module():
    """A private local Ray instance (2 CPUs, wandb off) for one test module's jobs."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"WANDB_MODE": "disabled"}})
    yield ray
    ray.shutdown()
