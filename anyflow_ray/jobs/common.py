"""Shared set-up of every job: threads, seeds, output folder with the resolved config, model parts."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from anyflow_ray.run.config import save_config
from anyflow_ray.run.device import resolve_device, resolve_dtype, set_threads
from anyflow_ray.run.storage import Storage

log = logging.getLogger("anyflow_ray")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig, out_dir: str | Path, write_config: bool = True) -> tuple[Path, torch.device, torch.dtype]:
    """Threads, seeds, ``out_dir`` with ``config.yaml`` (``write_config=False``: a resumed run, whose record
    is rewritten only once it has trained: ``record_config``); returns (out_dir, device, dtype)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    set_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    out = Path(out_dir)
    if write_config:
        record_config(cfg, out)
    device = resolve_device(cfg.run.device)
    return out, device, resolve_dtype(cfg.run.precision, device)


def record_config(cfg: DictConfig, out_dir: str | Path) -> None:
    """``config.yaml`` of the run in ``out_dir``, and its copy in ``run.storage``."""
    Storage.of(cfg).upload(save_config(cfg, Path(out_dir)))


def progress(iterable, **kwargs):
    """A tqdm bar; when stderr is not a terminal (logs, `ray job logs`) it redraws every 10 s only."""
    import sys

    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def train_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.root) / "train"


def heldout_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.root) / "heldout"
