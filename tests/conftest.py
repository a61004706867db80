"""Shared fixtures: a tiny model folder written by the same code as `anyflow-ray make-tiny`."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg():
    from anyflow_ray.config import load_config

    return load_config(None, ["model.tiny.num_layers=2", "model.tiny.ffn_dim=64"])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_cfg):
    from anyflow_ray.models.loading import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "base-model", tiny_cfg.model.tiny)
